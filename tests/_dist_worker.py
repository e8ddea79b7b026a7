"""Subprocess worker for tests/test_distributed.py (XLA_FLAGS must be set by the caller before this starts).

    python tests/_dist_worker.py single OUT_DIR     # one process, 8 host devices: devices / noise / errors
    python tests/_dist_worker.py multi OUT_DIR      # under scripts/launch_local.sh (jax.distributed)

Writes ``OUT_DIR/<scenario>[_<process>].json`` (and ``.npz`` parameter files) for the test to check.
"""
from __future__ import annotations

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
    {"single": single, "multi": multi}[sys.argv[1]](sys.argv[2])
