"""Subprocess worker for tests/test_distributed.py (XLA_FLAGS must be set by the caller before this starts).

    python tests/_dist_worker.py single OUT_DIR     # one process, 8 host devices: devices / noise / errors
    python tests/_dist_worker.py matrix OUT_DIR     # one process, 8 host devices: strategy x shaping x devices
    python tests/_dist_worker.py multi OUT_DIR      # under scripts/launch_local.sh (jax.distributed)

Writes ``OUT_DIR/<scenario>[_<process>].json`` (and ``.npz`` parameter files) for the test to check.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import numpy as np

GENERATIONS = 5


def problem(noise_source="hash"):
    import jax
    import jax.numpy as jnp
    import optax

    import esx

    params = {"w": jnp.linspace(-0.5, 0.5, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.zeros(4, jnp.float32)}
    data = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)

    def fitness(view, key, data):
        y = jnp.tanh(esx.dense(data, view["w"]) + esx.value(view["b"]))
        # the key term checks that each member gets its own (global) group's key wherever it is evaluated
        return -jnp.sum((y - 0.5) ** 2) + 1e-3 * (jax.random.key_data(key)[-1] % 13).astype(jnp.float32)

    # "hash" noise and SGD keep the compile time of the test small; the noise check uses "normal" noise
    strategy = esx.eggroll(population_size=16, sigma=0.1, optimizer=optax.sgd(0.2), rank=2,
                           noise_source=noise_source)
    return strategy, params, data, fitness


def run(step, strategy, params, data):
    """``GENERATIONS`` generations of ``step(state, key) -> (state, metrics)``; returns host params."""
    import jax

    from esx import distributed as dist

    state = strategy.init(jax.random.key(0), params)
    key = jax.random.key(1)
    for _ in range(GENERATIONS):
        key, k_eval = jax.random.split(key)
        state, _ = step(state, k_eval)
    return dist.to_host(state.params)


def compare(out, ref):
    bitwise = all(np.array_equal(out[k], ref[k]) for k in ref)
    rel = max(float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref)
    return {"bitwise": bitwise, "rel": rel}


def single(out_dir):
    import jax
    import jax.numpy as jnp

    import esx
    from esx import distributed as dist

    strategy, params, data, fitness = problem()
    result = {"num_devices": jax.device_count()}
    ref = run(lambda s, k: esx.step(strategy, s, fitness, k, data), strategy, params, data)
    np.savez(os.path.join(out_dir, "reference.npz"), **ref)
    result["moved"] = max(float(np.max(np.abs(ref[k] - np.asarray(v)))) for k, v in params.items())

    for placement in dist.PLACEMENTS:
        for n in (1, 2, 4, 8):
            mesh = dist.make_mesh(jax.devices()[:n])
            if n == 8:  # compile explicitly, so the collectives of the compiled HLO can be read
                state0 = dist.replicate(strategy.init(jax.random.key(0), params), mesh)
                args = dist.replicate((state0, jax.random.key(1), data), mesh)
                compiled = dist._sharded_step.lower(
                    strategy, args[0], fitness, args[1], args[2], mesh=mesh, axis="pop", placement=placement,
                    data_per_group=False).compile()
                result[f"hlo_{placement}"] = dist.collective_bytes(compiled.as_text())
                result[f"model_{placement}"] = dist.communication_bytes(strategy, params, n, placement)

                def step(s, k, compiled=compiled, mesh=mesh):
                    s, k = dist.replicate((s, k), mesh)
                    return compiled(s, k, args[2])
            else:
                def step(s, k, mesh=mesh, placement=placement):
                    return dist.sharded_step(strategy, s, fitness, k, data, mesh=mesh, placement=placement)
            out = run(step, strategy, params, data)
            result[f"{placement}_{n}"] = compare(out, ref)

    # The composable path (as a driver uses it): a lax.scan over generations inside one replicated map, with
    # evaluate's aux all-gathered; must equal esx.step bit for bit.
    mesh = dist.make_mesh(jax.devices()[:4])
    sharded = dist.shard_strategy(strategy, placement="gather")
    with_aux = lambda view, key, data: (fitness(view, key, data), view["b"].eps[:1])  # noqa: E731

    def generation(state, k_eval):
        fit, aux = sharded.evaluate(state, with_aux, k_eval, data, has_aux=True)
        state, metrics = sharded.tell(state, fit)
        return state, (metrics.fitness_mean, aux)

    chunk = jax.jit(dist.replicated_map(lambda s, keys: jax.lax.scan(generation, s, keys), mesh=mesh))
    keys, key = [], jax.random.key(1)
    for _ in range(GENERATIONS):
        key, k_eval = jax.random.split(key)
        keys.append(k_eval)
    state0 = strategy.init(jax.random.key(0), params)
    state, (_, aux) = chunk(*dist.replicate((state0, jnp.stack(keys)), mesh))
    result["scan_4"] = compare(dist.to_host(state.params), ref)
    result["scan_aux_shape"] = list(aux.shape)

    # A member's noise does not depend on the device: read every pair's factors back through evaluate's aux,
    # with the device order of the mesh reversed (pair block 0 on the last device) and compare with ask().
    strategy = problem("normal")[0]
    state = strategy.init(jax.random.key(0), params)
    state = state.replace(generation=jnp.asarray(3, jnp.int32))
    expected = strategy.ask(state).noise
    probe = lambda view, key, data: (jnp.zeros(()), (view["w"].a, view["w"].b, view["b"].eps))  # noqa: E731
    same = []
    for devices in (jax.devices()[::-1], jax.devices()[:2]):
        mesh = dist.make_mesh(devices)
        sharded = dist.shard_strategy(strategy)
        gather = jax.jit(dist.replicated_map(
            lambda s, k: sharded.evaluate(s, probe, k, None, has_aux=True)[1], mesh=mesh))
        a, b, eps = dist.to_host(gather(dist.replicate(state, mesh), dist.replicate(jax.random.key(2), mesh)))
        # members 2k and 2k+1 share pair k's draw; leaves are flattened in key order: b, w
        ok = (np.array_equal(a[0::2], np.asarray(expected[1][0])) and np.array_equal(a[1::2], a[0::2])
              and np.array_equal(b[0::2], np.asarray(expected[1][1]))
              and np.array_equal(eps[0::2], np.asarray(expected[0])))
        same.append(bool(ok))
    result["noise_same"] = same

    # A population whose pairs do not divide over the devices is an error, before anything is compiled.
    odd = esx.eggroll(population_size=12, sigma=0.1, optimizer=strategy.config.optimizer, rank=2)
    strategy, params, data, fitness = problem()
    try:
        dist.sharded_step(odd, odd.init(jax.random.key(0), params), fitness, jax.random.key(1), data,
                          mesh=dist.make_mesh(jax.devices()[:4]))
        result["nondivisible_error"] = None
    except ValueError as err:
        result["nondivisible_error"] = str(err)
    with open(os.path.join(out_dir, "single.json"), "w") as f:
        json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# strategy x shaping x device count: placement="gather" against esx.step, bit for bit

MATRIX_GENERATIONS = 3
MATRIX_DEVICES = (1, 2, 4, 8)


def matrix_problems():
    """``{name: (strategy, params, data, fitness)}``: every registered shaping on eggroll and open_es, and the
    integer strategy, on 32 members (4 per device on 8 devices).

    The float fitness ends in ``a + 1e-3 * k``: in ``esx.step`` XLA fused that last multiply-add into the kernel
    of the shaping's mean and recomputed it there, and before the fix z_score / group_z_score differed from the
    sharded run on every device count (at XLA's default optimisation level). Each member's work is
    elementwise on its own perturbed weights, so the fitness values do not depend on how many members a device
    evaluates together (a product of shared data with per-member factors, ``esx.dense(x, w)``, would: XLA picks
    its matrix kernel by size; docs/distributed.md).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import esx
    from esx import int_eggroll as ie

    params = {"w": jnp.linspace(-0.5, 0.5, 64, dtype=jnp.float32).reshape(8, 8), "b": jnp.zeros(8, jnp.float32)}
    data = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32).reshape(4, 8)

    def fitness(view, key, data):
        y = jnp.tanh(esx.value(view["w"])[:4] * data + esx.value(view["b"]))
        return -jnp.sum((y - 0.5) ** 2) + 1e-3 * (jax.random.key_data(key)[-1] % 13).astype(jnp.float32)

    shapings = sorted([*esx.shaping.SHAPINGS, "group_z_score"])
    out = {}
    for make in (esx.eggroll, esx.open_es):
        for shaping in shapings:
            kw = {"rank": 2} if make is esx.eggroll else {}
            strategy = make(population_size=32, sigma=0.1, optimizer=optax.adam(0.05), shaping=shaping,
                            group_size=4 if shaping == "group_z_score" else 1, noise_source="hash", **kw)
            out[f"{make.__name__}-{shaping}"] = (strategy, params, data, fitness)

    if "member_batch" in inspect.signature(esx.eggroll).parameters:
        # A fitness whose values do depend on the member count XLA batches (esx.dense of shared data: one matrix
        # product over the members): with member_batch dividing N/D, esx.step and every device evaluate chunks of
        # the same member_batch members, so the fitness (and everything after it) is the same again.
        wide = {"w": jnp.linspace(-0.5, 0.5, 256, dtype=jnp.float32).reshape(16, 16),
                "b": jnp.zeros(16, jnp.float32)}
        wide_data = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(4, 16)

        def dense_fitness(view, key, data):
            y = jnp.tanh(esx.dense(data, view["w"]) + esx.value(view["b"]))
            return -jnp.sum((y - 0.5) ** 2) + 1e-3 * (jax.random.key_data(key)[-1] % 13).astype(jnp.float32)

        strategy = esx.eggroll(population_size=32, sigma=0.1, optimizer=optax.adam(0.05), rank=2, shaping="z_score",
                               member_batch=4)
        out["eggroll_dense_member_batch_4-z_score"] = (strategy, wide, wide_data, dense_fitness)

    int_params = {"w": jnp.zeros((8, 4), jnp.int8), "b": jnp.zeros((4,), jnp.int8)}

    def int_fitness(view, key, data):
        y = ie.int_dense(data, view["w"]) + ie.int_value(view["b"]).astype(jnp.int32)
        return -jnp.sum(jnp.abs(y - 20))

    strategy = ie.int_eggroll(population_size=32, sigma_shift=2, alpha=0.2)
    out["int_eggroll-pair_signs"] = (strategy, int_params, jnp.full((2, 8), 16, jnp.int8), int_fitness)
    return out


def _metric_diffs(ms, ref_ms):
    """``{field: max relative difference}`` over the generations (0.0: bit-identical every generation)."""
    out = {}
    for field in ref_ms[0]._fields:
        a = np.stack([np.asarray(getattr(m, field), np.float64) for m in ms])
        b = np.stack([np.asarray(getattr(m, field), np.float64) for m in ref_ms])
        if np.array_equal(a, b):
            out[field] = 0.0
        else:
            out[field] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))
    return out


def matrix(out_dir):
    import jax
    import jax.numpy as jnp

    import esx
    from esx import distributed as dist

    def run(step, strategy, params):
        state = strategy.init(jax.random.key(0), params)
        key, metrics = jax.random.key(1), []
        for _ in range(MATRIX_GENERATIONS):
            key, k_eval = jax.random.split(key)
            state, m = step(state, k_eval)
            metrics.append(dist.to_host(m))
        return dist.to_host((state.params, state.opt_state)), metrics

    result = {"num_devices": jax.device_count()}
    meshes = {n: dist.make_mesh(jax.devices()[:n]) for n in MATRIX_DEVICES}
    for name, (strategy, params, data, fitness) in matrix_problems().items():
        (ref, ref_opt), ref_ms = run(lambda s, k: esx.step(strategy, s, fitness, k, data), strategy, params)
        placements = dist.PLACEMENTS if name.startswith("int_") else ("gather",)  # integer tallies: exact sums
        for placement in placements:
            for n, mesh in meshes.items():
                (out, out_opt), ms = run(lambda s, k: dist.sharded_step(strategy, s, fitness, k, data, mesh=mesh,
                                                                        placement=placement), strategy, params)
                same_opt = all(np.array_equal(a, b) for a, b in
                               zip(jax.tree_util.tree_leaves(out_opt), jax.tree_util.tree_leaves(ref_opt)))
                result[f"{name}/{placement}/{n}"] = {
                    "params": all(np.array_equal(out[k], ref[k]) for k in ref), "opt_state": same_opt,
                    "moved": max(float(np.max(np.abs(np.asarray(ref[k], np.float64) - np.asarray(v, np.float64))))
                                 for k, v in params.items()),
                    "metrics": _metric_diffs(ms, ref_ms)}

    # shard_strategy(...).evaluate passes data_per_member through: member i gets data[i] (global index) on every
    # device, and the gathered fitness equals the unsharded evaluate's.
    strategy, params, _, _ = matrix_problems()["eggroll-centered_rank"]
    state = strategy.init(jax.random.key(0), params)
    per_member = jnp.arange(32, dtype=jnp.float32) * 0.25

    def probe(view, key, row):
        return row + 1e-3 * jnp.sum(esx.value(view["b"]))

    expected = jax.jit(lambda s, k: strategy.evaluate(s, probe, k, per_member, data_per_member=True))(
        state, jax.random.key(2))
    sharded = dist.shard_strategy(strategy)
    mesh = meshes[4]
    got = jax.jit(dist.replicated_map(
        lambda s, k: sharded.evaluate(s, probe, k, per_member, data_per_member=True), mesh=mesh))(
        *dist.replicate((state, jax.random.key(2)), mesh))
    got = dist.to_host(got)
    result["data_per_member"] = {"equal": bool(np.array_equal(got, np.asarray(expected))),
                                 "rows": bool(np.allclose(got, np.asarray(per_member), atol=0.05))}
    with open(os.path.join(out_dir, "matrix.json"), "w") as f:
        json.dump(result, f, indent=1)


def multi(out_dir):
    from esx import distributed as dist

    cfg = dist.initialize_from_env()
    import jax

    strategy, params, data, fitness = problem()
    mesh = dist.make_mesh()
    info = {"process_id": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "config_source": None if cfg is None else cfg.source}
    for placement in dist.PLACEMENTS:
        out = run(lambda s, k: dist.sharded_step(strategy, s, fitness, k, data, mesh=mesh, placement=placement),
                  strategy, params, data)
        np.savez(os.path.join(out_dir, f"multi_{placement}_{jax.process_index()}.npz"), **out)
    with open(os.path.join(out_dir, f"multi_{jax.process_index()}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    {"single": single, "matrix": matrix, "multi": multi}[sys.argv[1]](sys.argv[2])
