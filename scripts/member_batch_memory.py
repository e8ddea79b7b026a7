"""Peak host memory of one ``esx.step`` with and without member batching (docs/hyperscale.md).

A 2-layer MLP (256 -> 256 -> 256, float32, tanh), EGGROLL rank 1 with ``noise_source="hash"``, one input row per
member (drawn inside the fitness from the member's key, so the data takes no memory of its own). Each (N,
member_batch) runs in a fresh subprocess; it reports ``ru_maxrss`` (peak resident set size) after the imports and
``init`` (the baseline) and after compiling and running one ``esx.step``, and the step's wall time (compile
included, then one more step without it), XLA's own count of the step's temporary buffers
(``memory_analysis().temp_size_in_bytes`` of the compiled step, read after the peak), the step's whole buffer
count (temporaries, arguments and outputs) and the peak predicted by ``esx.memory_estimate`` for that
``member_batch`` (docs/hyperscale.md, "Memory model").

    python scripts/member_batch_memory.py                  # N = 2^12, 2^14, 2^16; K = none and 4096
    python scripts/member_batch_memory.py --log2n 12 14 16 18 --batch 4096
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, optax
import esx

n, k = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2]))
d = 256

def fitness(p, key, data):
    x = jax.random.normal(key, (d,))                       # one input row per member
    h = jnp.tanh(esx.dense(x, p["l1"]["w"]) + esx.value(p["l1"]["b"]))
    y = esx.dense(h, p["l2"]["w"]) + esx.value(p["l2"]["b"])
    return -jnp.mean((y - x) ** 2)

k1, k2 = jax.random.split(jax.random.key(0))
params = {"l1": {"w": jax.random.normal(k1, (d, d)) / 16, "b": jnp.zeros(d)},
          "l2": {"w": jax.random.normal(k2, (d, d)) / 16, "b": jnp.zeros(d)}}
strategy = esx.eggroll(population_size=n, sigma=0.05, optimizer=optax.adam(1e-3), rank=1, noise_source="hash",
                       group_size=1, member_batch=k)
state = strategy.init(jax.random.key(1), params)
jax.block_until_ready(state)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
state, metrics = esx.step(strategy, state, fitness, jax.random.key(2))
jax.block_until_ready(state)
first = time.perf_counter() - t
t = time.perf_counter()
state, metrics = esx.step(strategy, state, fitness, jax.random.key(3))
jax.block_until_ready(state)
second = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
compiled = esx.step.lower(strategy, state, fitness, jax.random.key(3)).compile()   # after the peak was read
m = compiled.memory_analysis()
temp = m.temp_size_in_bytes
step_bytes = temp + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
estimate = esx.memory_estimate(strategy, state, fitness, jax.random.key(3))      # the memory model's prediction
print(json.dumps(dict(n=n, k=k, base_kib=base, peak_kib=peak, first_s=first, second_s=second, temp_bytes=temp,
                      step_bytes=step_bytes, estimate_bytes=estimate.peak_bytes(k),
                      eval_bytes_per_member=estimate.eval_bytes_per_member,
                      update_bytes_per_member=estimate.update_bytes_per_member,
                      fitness_mean=float(metrics.fitness_mean))))
"""


def measure(n: int, k: int | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), "none" if k is None else str(k)], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return dict(n=n, k=k, error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, nargs="+", default=[12, 14, 16])
    parser.add_argument("--batch", type=int, default=4096, help="member_batch of the batched runs")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"# load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
          f" ({os.cpu_count()} cores)")
    rows = []
    header = (f"| {'N':>7} | {'member_batch':>12} | {'peak RSS MiB':>12} | {'above baseline MiB':>18} "
              f"| {'XLA temp MiB':>12} | {'XLA step MiB':>12} | {'estimate MiB':>12} | {'first step s':>12} "
              f"| {'next step s':>11} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for log2n in args.log2n:
        n = 1 << log2n
        for k in (None, args.batch):   # member_batch = N is one chunk: the unbatched program
            if k is not None and n % k:
                continue
            t = time.perf_counter()
            row = measure(n, k)
            row["wall_s"] = time.perf_counter() - t
            rows.append(row)
            kk = "none" if k is None else str(k)
            if "error" in row:
                print(f"| {n:>7} | {kk:>12} | error: {row['error']} |")
                continue
            print(f"| {n:>7} | {kk:>12} | {row['peak_kib'] / 1024:>12.0f} | "
                  f"{(row['peak_kib'] - row['base_kib']) / 1024:>18.0f} | {row['temp_bytes'] / 2**20:>12.1f} | "
                  f"{row['step_bytes'] / 2**20:>12.1f} | {row['estimate_bytes'] / 2**20:>12.1f} | "
                  f"{row['first_s']:>12.2f} | "
                  f"{row['second_s']:>11.2f} |", flush=True)
    print(f"# load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
