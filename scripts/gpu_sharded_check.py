"""One short sharded generation on whatever devices exist (a GPU is enough for the code path).

    python scripts/gpu_sharded_check.py [--population 4096] [--width 512] [--depth 3] [--generations 5]

For each placement ("gather", "reduce") it runs ``esx.distributed.sharded_step`` over a mesh of all devices,
reports the first-call time (compile + run) and the mean time of the following generations, checks that the
parameters are finite and compares them with the unsharded ``esx.step``. Prints the report and writes it to
``$OUT/sharded.txt`` when ``OUT`` is set. Exit status 1 if any parameter is not finite.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=4096)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--generations", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import esx
    from esx import distributed as dist

    lines: list[str] = []

    def report(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    devices = jax.devices()
    report(f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}")
    report(f"devices ({len(devices)}): {', '.join(f'{d.platform}:{d.device_kind}' for d in devices)}")
    w, depth = args.width, args.depth
    keys = jax.random.split(jax.random.key(7), depth + 1)
    params = {f"layer{i}": {"w": jax.random.normal(keys[i], (w, w), jnp.float32) / np.sqrt(w),
                            "b": jnp.zeros((w,), jnp.float32)} for i in range(depth)}
    data = jax.random.normal(keys[-1], (args.batch, w), jnp.float32)
    target = jnp.tanh(data[:, ::-1])

    def fitness(view, key, data):
        h = data
        for i in range(depth):
            h = jnp.tanh(esx.dense(h, view[f"layer{i}"]["w"]) + esx.value(view[f"layer{i}"]["b"]))
        return -jnp.mean((h - target) ** 2)

    strategy = esx.eggroll(population_size=args.population, sigma=0.02, rank=args.rank,
                           optimizer=optax.adam(1e-3))
    mesh = dist.make_mesh()
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    report(f"model: MLP {depth}x{w} ({num_params:,} params), population {args.population}, rank {args.rank}, "
           f"mesh {dict(mesh.shape)}")

    def run(step):
        state = strategy.init(jax.random.key(0), params)
        key = jax.random.key(1)
        times = []
        for _ in range(args.generations):
            key, k_eval = jax.random.split(key)
            t0 = time.perf_counter()
            state, metrics = step(state, k_eval)
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - t0)
        return dist.to_host(state.params), metrics, times

    ok = True
    ref, _, ref_times = run(lambda s, k: esx.step(strategy, s, fitness, k, data))
    report(f"esx.step (unsharded): first call {ref_times[0]:.2f} s, then "
           f"{1e3 * np.mean(ref_times[1:]):.2f} ms/generation")
    for placement in dist.PLACEMENTS:
        out, metrics, times = run(lambda s, k: dist.sharded_step(strategy, s, fitness, k, data, mesh=mesh,
                                                                 placement=placement))
        finite = all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))
        ok &= finite
        rel = max(float(np.linalg.norm(out[k]["w"] - ref[k]["w"]) / np.linalg.norm(ref[k]["w"])) for k in ref)
        bitwise = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(out),
                                                            jax.tree_util.tree_leaves(ref)))
        comm = dist.communication_bytes(strategy, params, len(devices), placement)
        report(f"sharded_step placement={placement}: first call {times[0]:.2f} s, then "
               f"{1e3 * np.mean(times[1:]):.2f} ms/generation; params finite: {finite}; "
               f"vs esx.step: bitwise {bitwise}, max rel diff {rel:.2e}; "
               f"fitness_mean {float(dist.to_host(metrics.fitness_mean)):.5f}; "
               f"bytes sent per device per generation {comm['sent_bytes_per_device']:,}")
    report("OK" if ok else "FAIL: non-finite parameters")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sharded.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
