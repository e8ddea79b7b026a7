"""Where B1a's gap to inference goes: the B1a population forward written several ways, timed side by side.

B1a (``esx bench --cases B1a``): a 3-layer tanh MLP of width 1024 with biases, N = 4096 members, one input row
per member, EGGROLL rank 1, ``hash`` noise. Every form below computes the same member outputs (checked against
the engine's ``strategy.evaluate`` first, within float32 rounding) and is timed in interleaved rounds against pure
batched inference; the ratio is inference time / form time (median over rounds).

* ``esx evaluate``: the engine, noise drawn on the fly (what B1a reports).
* ``esx pregenerated``: ``strategy.ask`` once (untimed), then ``strategy.view`` per member.
* ``hand, member order``: the same maths written by hand on pre-generated noise, members in their natural order
  (each pair's factors gathered to its two members), bias noise included.
* ``hand, pair-major``: members as ``[P, 2]`` (the pair's factors broadcast to its two signs), bias noise included.
* ``hand, no bias noise``: member order with the biases not perturbed (what the low-rank matrices alone cost).

    python scripts/b1a_forms.py --repeats 9
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esx_envs import bench  # noqa: E402


def hand_forms(width: int, layers: int, n: int, sigma: float):
    """``{name: fn(params, noise, x) -> float[N]}`` on ``ask``'s noise (``noise[layer]["w"] = (a [P, w, 1], b [P,
    w, 1])``, ``noise[layer]["b"] = eps [P, w]``)."""
    p = n // 2
    pair = jnp.arange(n) // 2
    sign = jnp.tile(jnp.array([1.0, -1.0]), p) * sigma
    sign2 = jnp.array([1.0, -1.0]) * sigma

    def member_order(params, noise, x, bias_noise=True):
        for i in range(layers):
            lp, ln = params[f"layer{i}"], noise[f"layer{i}"]
            a, b = ln["w"][0][..., 0][pair], ln["w"][1][..., 0][pair]
            h = x @ lp["w"] + lp["b"] + (jnp.sum(x * a, -1) * sign)[:, None] * b
            x = jnp.tanh(h + sign[:, None] * ln["b"][pair] if bias_noise else h)
        return jnp.mean(x, -1)

    def pair_major(params, noise, x):
        x = x.reshape(p, 2, width)
        for i in range(layers):
            lp, ln = params[f"layer{i}"], noise[f"layer{i}"]
            a, b = ln["w"][0][..., 0], ln["w"][1][..., 0]
            xa = jnp.einsum("psw,pw->ps", x, a) * sign2
            x = jnp.tanh(x @ lp["w"] + lp["b"] + sign2[:, None] * ln["b"][:, None] + xa[..., None] * b[:, None])
        return jnp.mean(x, -1).reshape(n)

    return {"hand, member order": member_order, "hand, pair-major": pair_major,
            "hand, no bias noise": lambda pr, nz, x: member_order(pr, nz, x, bias_noise=False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--population", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    w, L, n = args.width, args.layers, args.population
    params = bench.mlp_params(jax.random.key(0), width=w, layers=L, stacked=False)
    data = jax.random.normal(jax.random.key(2), (n, w), jnp.float32)
    strategy = bench._strategy(population_size=n, rank=1, source="hash")
    state = strategy.init(jax.random.key(0), params)
    inference, on_the_fly, _ = bench._throughput_fns(strategy, state, bench.mlp_forward, params, data,
                                                     pregenerated=False)
    _, pre, ask = bench._throughput_fns(strategy, state, bench.mlp_forward, params, data, pregenerated=True)
    pop = bench._block(ask(state))
    noise = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), jax.tree_util.tree_leaves(
        pop.noise, is_leaf=lambda x: isinstance(x, tuple)))
    sigma = float(state.sigma)   # rank 1: coef = σ · sign
    reference = np.asarray(on_the_fly(state, data))
    fns = {"inference": lambda: inference(params, data), "esx evaluate": lambda: on_the_fly(state, data),
           "esx pregenerated": lambda: pre(state, pop, data)}
    for name, f in hand_forms(w, L, n, sigma).items():
        jf = jax.jit(f)
        if name != "hand, no bias noise":   # the same outputs as the engine's
            err = float(np.max(np.abs(np.asarray(jf(params, noise, data)) - reference)))
            if err > 1e-4:
                raise SystemExit(f"{name}: differs from strategy.evaluate by {err}")
        fns[name] = (lambda jf=jf: jf(params, noise, data))
    load0 = os.getloadavg()
    times = bench.time_interleaved(fns, repeats=args.repeats)
    load1 = os.getloadavg()
    print(f"B1a forms: MLP {L}x{w}, N={n}, one row per member, rank 1, hash noise; {args.repeats} interleaved "
          f"rounds; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end ({os.cpu_count()} cpus)")
    print("| form | median ms | inference / form (median of rounds) | min-max ratio |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        rs = [a / b for a, b in zip(times["inference"], ts)]
        print(f"| {name} | {np.median(ts) * 1e3:.1f} | {np.median(rs):.3f} | {min(rs):.3f}-{max(rs):.3f} |")


if __name__ == "__main__":
    main()
