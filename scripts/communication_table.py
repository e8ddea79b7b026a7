"""Bytes communicated per generation by esx.distributed.sharded_step: analytic model vs compiled HLO.

    python scripts/communication_table.py [--devices 8] [--population 4096] [--width 1024] [--depth 3]

Runs on CPU with fake host devices (nothing is executed, the step is only compiled) and prints a markdown
table for docs/distributed.md. "HLO" columns are the payloads of the all-gather / all-reduce ops XLA emits.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--population", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rank", type=int, default=1)
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run this as a script: XLA_FLAGS must be set before jax is imported")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import optax

    import esx
    from esx import distributed as dist

    w = args.width
    params = {f"layer{i}": {"w": jnp.zeros((w, w), jnp.float32), "b": jnp.zeros((w,), jnp.float32)}
              for i in range(args.depth)}

    def fitness(view, key, data):
        h = data
        for i in range(args.depth):
            h = jnp.tanh(esx.dense(h, view[f"layer{i}"]["w"]) + esx.value(view[f"layer{i}"]["b"]))
        return jnp.mean(h)

    strategy = esx.eggroll(population_size=args.population, sigma=0.01, rank=args.rank,
                           optimizer=optax.adam(1e-3))
    mesh = dist.make_mesh()
    state = dist.replicate(strategy.init(jax.random.key(0), params), mesh)
    key, data = dist.replicate((jax.random.key(1), jnp.ones((1, w), jnp.float32)), mesh)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"MLP {args.depth}x{w} ({num_params:,} float32 parameters), population {args.population}, "
          f"{args.devices} devices, jax {jax.__version__}\n")
    print("| placement | all-gather payload (model / HLO) | all-reduce payload (model / HLO) "
          "| sent per device (ring) | sent, all devices |")
    print("|---|---|---|---|---|")
    for placement in dist.PLACEMENTS:
        model = dist.communication_bytes(strategy, params, args.devices, placement)
        hlo = dist.collective_bytes(dist._sharded_step.lower(
            strategy, state, fitness, key, data, mesh=mesh, axis="pop", placement=placement,
            data_per_group=False).compile().as_text())
        print(f"| {placement} | {model['fitness_allgather_bytes']:,} B / {hlo.get('all-gather', 0):,} B "
              f"| {model['gradient_allreduce_bytes']:,} B / {hlo.get('all-reduce', 0):,} B "
              f"| {model['sent_bytes_per_device']:,} B | {model['sent_bytes_total']:,} B |")


if __name__ == "__main__":
    main()
