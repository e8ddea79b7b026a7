"""Where B1b's gap to inference goes: the B1b population forward with several forms of the per-pair dot product,
member orders and ``esx.prepare``, timed side by side with inference.

B1b (``esx bench --cases B1b``): a width-512 tanh RNN ``h <- tanh(x_t W_x + h W_h + b)`` over 64 steps with a linear
read-out, N = 2048 members, one sequence per member, EGGROLL rank 1, ``hash`` noise, ``member_batch`` 512 and 1024.
Each member's correction needs ``x_t·a`` and ``h·a`` with its pair's factor ``a`` at every step: under the member
``vmap`` a batched dot product over pairs. The forms:

* ``dot`` (the engine's): ``jnp.dot(x, a_k)`` per rank column;
* ``mulred``: ``jnp.sum(x * a_k)`` (an elementwise product and a reduction instead of a batched dot);
* ``matrix``: ``(x @ a) @ bᵀ`` (the matrix form with ``a: [m, 1]``);

each with ``member_order`` ``signs_outer`` (the default) and ``pairs_outer``, and with the member view used as it
is (``plain``) or resolved once by ``esx.prepare`` before the time loop (``prepared``). ``--hoisted`` adds the same
RNN written with its input projection ``x_t W_x + b`` computed for all steps before the loop (:func:`rnn_hoisted`,
the usual GPU form), inference and the engine's form, named ``hoisted/...``; ``--batches`` sets the member batches. Every form's fitness is
checked against the engine's default first (float32 rounding), then all are timed in interleaved rounds; the ratio
is the fastest inference form of each round (whole batch or chunked like ``member_batch``) / the form's time, the
median over rounds (as ``esx bench``).

    python scripts/b1b_forms.py --repeats 7 [--json out.json]    # about 3 minutes on 2 cores, most of it compiling
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import esx  # noqa: E402
from esx import ops  # noqa: E402
from esx_envs import bench  # noqa: E402


def _columns(u, v):
    us = u if isinstance(u, tuple) else tuple(u[:, k] for k in range(u.shape[-1]))
    vs = v if isinstance(v, tuple) else tuple(v[:, k] for k in range(v.shape[-1]))
    return us, vs


def row_mulred(x, u, v):
    """``Σ_k (Σ_i x_i u_ki) v_k``: the dot product as a multiply and a reduction."""
    out = None
    for uk, vk in zip(*_columns(u, v)):
        xu = jnp.sum(x * uk)
        out = xu * vk if out is None else out + xu * vk
    return out


def row_matrix(x, u, v):
    """``(x u) vᵀ`` with ``u: [m, r]``: the matrix form."""
    if isinstance(u, tuple):
        u, v = jnp.stack(u, -1), jnp.stack(v, -1)
    return (x @ u) @ v.T


def unprepared_rnn(params, xs):
    """The bench's RNN without ``esx.prepare`` (its rank-1 factors sliced inside the time loop)."""
    saved = esx.prepare
    try:
        bench.esx.prepare = lambda view: view
        return bench.rnn_forward(params, xs)
    finally:
        bench.esx.prepare = saved


def rnn_hoisted(params, xs):
    """The bench's RNN with the input projection of every step computed before the time loop (the same function)."""
    params = esx.prepare(params)
    wo = esx.value(params["wo"])
    xw = esx.dense(xs, params["wx"]) + esx.value(params["b"])      # [T, width]

    def step(h, u):
        h = jnp.tanh(u + esx.dense(h, params["wh"]))
        return h, jnp.dot(h, wo)

    _, ys = jax.lax.scan(step, jnp.zeros(np.shape(params["b"]), xs.dtype), xw)
    return jnp.mean(ys)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--batches", default=None, help="comma-separated member batches (default 512,1024)")
    p.add_argument("--hoisted", action="store_true", help="also the RNN with its input projection hoisted")
    args = p.parse_args(argv)
    width, d_in, steps, pop = (32, 8, 8, 64) if args.quick else (512, 64, 64, 2048)
    batches = (16,) if args.quick else (512, 1024)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    params = bench.rnn_params(jax.random.key(0), width=width, d_in=d_in)
    data = jax.random.normal(jax.random.key(2), (pop, steps, d_in), jnp.float32)

    fns = {}
    inference = jax.jit(lambda p, d: jax.vmap(lambda x: bench.rnn_forward(p, x))(d)).lower(params, data).compile()
    fns["inference"] = lambda: inference(params, data)
    for k in batches:
        chunked = bench._chunked_inference(bench.rnn_forward, k).lower(params, data).compile()
        fns[f"inference/chunk {k}"] = (lambda c=chunked: c(params, data))
    engine_row = ops._row_lowrank
    try:
        for form, row in (("dot", engine_row), ("mulred", row_mulred), ("matrix", row_matrix)):
            ops._row_lowrank = row          # read when the forms below are traced (compiled here, eagerly)
            for view, forward in (("prepared", bench.rnn_forward), ("plain", unprepared_rnn)):
                if form != "dot" and view == "plain":
                    continue
                fitness = bench._fitness(forward)
                for k in batches:
                    for order in ("signs_outer", "pairs_outer"):
                        strategy = bench._strategy(population_size=pop, rank=1, source="hash", member_batch=k,
                                                   member_order=order)
                        state = strategy.init(jax.random.key(0), params)
                        f = jax.jit(lambda st, d, s=strategy, fit=fitness: s.evaluate(
                            st, fit, jax.random.key(1), d, data_per_group=True)).lower(state, data).compile()
                        fns[f"{form}/{view}/{order}/member_batch {k}"] = (lambda f=f, st=state: f(st, data))
    finally:
        ops._row_lowrank = engine_row
    if args.hoisted:
        hoisted = jax.jit(lambda p, d: jax.vmap(lambda x: rnn_hoisted(p, x))(d)).lower(params, data).compile()
        fns["hoisted/inference"] = lambda: hoisted(params, data)
        for k in batches:
            chunked = bench._chunked_inference(rnn_hoisted, k).lower(params, data).compile()
            fns[f"hoisted/inference/chunk {k}"] = (lambda c=chunked: c(params, data))
            strategy = bench._strategy(population_size=pop, rank=1, source="hash", member_batch=k,
                                       member_order="pairs_outer")
            state = strategy.init(jax.random.key(0), params)
            f = jax.jit(lambda st, d, s=strategy: s.evaluate(st, bench._fitness(rnn_hoisted), jax.random.key(1), d,
                                                             data_per_group=True)).lower(state, data).compile()
            fns[f"hoisted/dot/prepared/pairs_outer/member_batch {k}"] = (lambda f=f, st=state: f(st, data))
    reference = np.asarray(fns[f"dot/prepared/signs_outer/member_batch {batches[0]}"]())
    for name, fn in fns.items():
        if "inference" not in name:
            diff = float(np.max(np.abs(np.asarray(fn()) - reference)))
            assert diff <= 1e-5 * max(1.0, float(np.max(np.abs(reference)))), (name, diff)
    load_start = os.getloadavg()
    times = bench.time_interleaved(fns, repeats=args.repeats)
    load_end = os.getloadavg()
    inference_names = [k for k in times if k.startswith(("inference", "hoisted/inference"))]
    best = np.array([min(times[k][r] for k in inference_names) for r in range(args.repeats)])
    out = {"load_start": load_start, "load_end": load_end, "repeats": args.repeats, "forms": {}}
    print(f"load average at the start {load_start[0]:.2f}, at the end {load_end[0]:.2f}")
    for name, ts in times.items():
        ratio = float(np.median(best / np.asarray(ts)))
        out["forms"][name] = {"median_s": float(np.median(ts)), "ratio": ratio}
        print(f"{name:44s} {np.median(ts) * 1e3:9.1f} ms   ratio {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
