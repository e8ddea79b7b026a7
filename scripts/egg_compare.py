"""Measurements for docs/egg.md: population ablation and integer vs float twin at equal wall-clock.

    python scripts/egg_compare.py ablation --generations 300            # fixed data per step, equal generations
    python scripts/egg_compare.py twins --seconds 120                   # int EGGROLL / float EGGROLL / backprop
    python scripts/egg_compare.py throughput --dim 256 --population 1024 # member-bytes/s, int8 vs float twin
    python scripts/egg_compare.py ablation-time --populations 1024,...,65536 --seconds 180 --generations 12 \
        --streams 1 --length 16 --member-batch 4096 --json out.json     # equal wall-clock and equal generations

Ablation: every member of every population reads the same ``streams × length`` bytes per generation
(``group_size = population``), so data per step is fixed and only the population changes.
Ablation-time: the same fixed data per step, every population trained in one process for the same seconds of its
own generation time (compile excluded, evaluations excluded) and for at least ``--generations`` generations. The
populations take turns: the next generation always goes to the population with the least time so far, so load
from other jobs falls on all of them alike. Validation bits/byte is measured at a quarter, half and all of the
time budget and at generation ``--generations``; populations above ``--member-batch`` are evaluated in chunks of
that many members (``member_batch``, docs/hyperscale.md).
Twins: the same architecture and data stream layout, each trained for the same wall-clock seconds one after the
other in this process; validation bits/byte on the same validation subset. Prints Markdown tables.
Throughput: one generation (population forward over ``length`` bytes per member + update) of integer EGGROLL on the
int8 model and of float EGGROLL on the float32 twin, same ``N``, ``D`` and bytes, timed alternately (A B A B ...)
on the default JAX device; prints member-bytes (tokens) per second of each and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import esx  # noqa: E402
from esx import int_eggroll as ie  # noqa: E402
from esx_envs import egg  # noqa: E402
from esx_envs.egg import float_twin, text_data  # noqa: E402


def run_int(config, split, *, population, group_size, streams, length, alpha, alpha_decay, seed=0,
            generations=None, seconds=None):
    params = egg.init_params(jax.random.key(seed), config)
    strat = ie.int_eggroll(population_size=population, group_size=group_size, alpha=alpha, alpha_decay=alpha_decay,
                           labels=egg.labels(params))
    state = strat.init(jax.random.key(seed + 1), params)
    groups = population // group_size
    data = text_data.Streams(split.train, split.train_starts, num_streams=groups * streams, length=length, seed=seed)
    step = egg.make_generation(strat, config)
    hidden = egg.initial_hidden(population, streams, config)
    tok, res = data.batch(0)
    step(state, hidden, jnp.asarray(tok.reshape(groups, streams, -1)), jnp.asarray(res.reshape(groups, streams, -1)))
    t0, g = time.perf_counter(), 0
    while (generations is None or g < generations) and (seconds is None or time.perf_counter() - t0 < seconds):
        tok, res = data.batch(g)
        state, hidden, _ = step(state, hidden, jnp.asarray(tok.reshape(groups, streams, -1)),
                                jnp.asarray(res.reshape(groups, streams, -1)))
        g += 1
    jax.block_until_ready(state.params)
    return state.params, g, time.perf_counter() - t0


def _int_setup(config, split, *, population, streams, length, alpha, alpha_decay, member_batch, seed=0):
    """One population of the ablation: ``(step, state, hidden, data)`` with every member reading the same
    ``streams`` streams (``group_size = population``)."""
    params = egg.init_params(jax.random.key(seed), config)
    strat = ie.int_eggroll(population_size=population, group_size=population, alpha=alpha, alpha_decay=alpha_decay,
                           labels=egg.labels(params),
                           member_batch=member_batch if member_batch and population > member_batch else None)
    state = strat.init(jax.random.key(seed + 1), params)
    data = text_data.Streams(split.train, split.train_starts, num_streams=streams, length=length, seed=seed)
    return egg.make_generation(strat, config), state, egg.initial_hidden(population, streams, config), data


def ablation_time(config, split, *, populations, streams, length, alpha, alpha_decay, seconds, generations,
                  member_batch, val, seed=0, say=print):
    """Equal wall-clock and equal generations in one process (module docstring). Returns one record per
    population: ``{"population", "member_batch", "compile_s", "evals": [{"generation", "seconds", "bpb", "why"}]}``."""
    runs = []
    for pop in populations:
        step, state, hidden, data = _int_setup(config, split, population=pop, streams=streams, length=length,
                                               alpha=alpha, alpha_decay=alpha_decay, member_batch=member_batch,
                                               seed=seed)
        t0 = time.perf_counter()
        step.lower(state, hidden, *(jnp.asarray(x)[None] for x in data.batch(0))).compile()
        runs.append({"population": pop, "step": step, "state": state, "hidden": hidden, "data": data, "g": 0,
                     "t": 0.0, "marks": [seconds / 4, seconds / 2, seconds], "compile_s": time.perf_counter() - t0,
                     "evals": []})
        say(f"population {pop}: compiled in {runs[-1]['compile_s']:.1f} s")

    def evaluate(r, why):
        bpb = egg.bits_per_byte(r["state"].params, split.valid, config=config, **val)
        r["evals"].append({"generation": r["g"], "seconds": r["t"], "bpb": bpb, "why": why})
        say(f"population {r['population']}: generation {r['g']}, {r['t']:.1f} s: {bpb:.3f} bits/byte ({why})")

    for r in runs:
        evaluate(r, "start")
    active = list(runs)
    while active:
        r = min(active, key=lambda r: r["t"])
        tok, res = r["data"].batch(r["g"])
        t0 = time.perf_counter()
        r["state"], r["hidden"], _ = r["step"](r["state"], r["hidden"], jnp.asarray(tok)[None],
                                               jnp.asarray(res)[None])
        jax.block_until_ready(r["state"].params)
        r["t"] += time.perf_counter() - t0
        r["g"] += 1
        if r["g"] == generations:
            evaluate(r, f"generation {generations}")
        while r["marks"] and r["t"] >= r["marks"][0]:
            evaluate(r, f"{r['marks'].pop(0):g} s")
        if not r["marks"] and r["g"] >= generations:
            active.remove(r)
    return [{"population": r["population"], "member_batch": member_batch if r["population"] > member_batch else None,
             "compile_s": r["compile_s"], "evals": r["evals"]} for r in runs]


def plot_ablation(json_path, png_path):
    """Validation bits/byte against generations and against seconds of generation time, one line per population,
    from the records ``ablation-time --json`` wrote."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        rec = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rec["records"]:
        evals = sorted(r["evals"], key=lambda e: e["seconds"])
        label = f"N = {r['population']}"
        axes[0].plot([e["generation"] for e in evals], [e["bpb"] for e in evals], marker="o", label=label)
        axes[1].plot([e["seconds"] for e in evals], [e["bpb"] for e in evals], marker="o", label=label)
    axes[0].set_xscale("symlog", linthresh=10)
    axes[0].set_xlabel("generation")
    axes[1].set_xlabel("seconds of generation time (compile and evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("validation bits/byte")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    a = rec["args"]
    fig.suptitle(f"EGG D={a['dim']}: every member reads the same {a['streams']} x {a['length']} bytes per generation")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    print(f"wrote {png_path}")


def run_float_es(config, split, *, population, length, seconds, sigma=0.05, lr=0.02, seed=0):
    params = float_twin.init_params(jax.random.key(seed), config)
    strat = esx.eggroll(population_size=population, sigma=sigma, optimizer=optax.adam(lr), group_size=2,
                        labels=egg.labels(params))
    state = strat.init(jax.random.key(seed + 1), params)
    data = text_data.Streams(split.train, split.train_starts, num_streams=population // 2, length=length, seed=seed)
    step = float_twin.make_es_generation(strat, config)
    hidden = jnp.zeros((population, 1, config.layers, config.dim))
    tok, res = data.batch(0)
    step(state, hidden, jnp.asarray(tok)[:, None], jnp.asarray(res)[:, None])
    t0, g = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        tok, res = data.batch(g)
        state, hidden, _ = step(state, hidden, jnp.asarray(tok)[:, None], jnp.asarray(res)[:, None])
        g += 1
    jax.block_until_ready(state.params)
    return state.params, g


def run_backprop(config, split, *, batch, length, seconds, lr=3e-3, seed=0):
    params = float_twin.init_params(jax.random.key(seed), config)
    opt = optax.adam(lr)
    step = float_twin.make_backprop_step(opt, config)
    data = text_data.Streams(split.train, split.train_starts, num_streams=batch, length=length, seed=seed)
    hidden = jnp.zeros((batch, config.layers, config.dim))
    opt_state = opt.init(params)
    tok, res = data.batch(0)
    step(params, opt_state, hidden, jnp.asarray(tok), jnp.asarray(res))
    t0, g = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        tok, res = data.batch(g)
        params, opt_state, hidden, _ = step(params, opt_state, hidden, jnp.asarray(tok), jnp.asarray(res))
        g += 1
    jax.block_until_ready(params)
    return params, g


def throughput(config, split, *, population, length, repeats=5, seed=0):
    """``(int8 tokens/s, float tokens/s)`` of whole generations (see the module docstring)."""
    groups = population // 2
    data = text_data.Streams(split.train, split.train_starts, num_streams=groups, length=length, seed=seed)
    tok, res = data.batch(0)
    tok, res = jnp.asarray(tok)[:, None], jnp.asarray(res)[:, None]

    iparams = egg.init_params(jax.random.key(seed), config)
    istrat = ie.int_eggroll(population_size=population, group_size=2, labels=egg.labels(iparams))
    istep = egg.make_generation(istrat, config)
    ist = [istrat.init(jax.random.key(seed + 1), iparams), egg.initial_hidden(population, 1, config)]

    fparams = float_twin.init_params(jax.random.key(seed), config)
    fstrat = esx.eggroll(population_size=population, sigma=0.05, optimizer=optax.adam(0.02), group_size=2,
                         labels=egg.labels(fparams))
    fstep = float_twin.make_es_generation(fstrat, config)
    fst = [fstrat.init(jax.random.key(seed + 1), fparams), jnp.zeros((population, 1, config.layers, config.dim))]

    def run_int():
        ist[0], ist[1], _ = istep(ist[0], ist[1], tok, res)
        jax.block_until_ready(ist[0].params)

    def run_float():
        fst[0], fst[1], _ = fstep(fst[0], fst[1], tok, res)
        jax.block_until_ready(fst[0].params)

    run_int(), run_float()  # compile
    t_int, t_float = [], []
    for _ in range(repeats):
        for fn, out in ((run_int, t_int), (run_float, t_float)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    tokens = population * length
    return tokens / float(np.median(t_int)), tokens / float(np.median(t_float))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ablation", "ablation-time", "ablation-plot", "twins", "throughput"])
    ap.add_argument("--png", default=None, help="ablation-plot: the figure to write from --json")
    ap.add_argument("--member-batch", type=int, default=4096, help="ablation-time: member_batch above this size")
    ap.add_argument("--json", default=None, help="ablation-time: also write the records here")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--generations", type=int, default=300)
    ap.add_argument("--populations", default="2,16,256")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--population", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--alpha-decay", type=float, default=0.003)
    args = ap.parse_args(argv)
    config = egg.EggConfig(dim=args.dim, layers=1)
    split = text_data.load_split()
    val = dict(streams=16, length=1024)
    if args.what == "throughput":
        ti, tf = throughput(config, split, population=args.population, length=args.length)
        dev = jax.devices()[0]
        print(f"device {dev.platform}:{getattr(dev, 'device_kind', '')}; D={args.dim}, 1 layer, N={args.population}, "
              f"{args.length} bytes per member; median of 5 alternating generations")
        print("| model / trainer | member-bytes / s |")
        print("|---|---|")
        print(f"| int8 EGG, integer EGGROLL | {ti:,.0f} |")
        print(f"| float32 twin, float EGGROLL (rank 1) | {tf:,.0f} |")
        print(f"int8 / float ratio: {ti / tf:.2f}")
        return
    if args.what == "ablation-plot":
        plot_ablation(args.json, args.png)
        return
    if args.what == "ablation-time":
        import json
        import os
        pops = [int(p) for p in args.populations.split(",")]
        load0 = os.getloadavg()
        records = ablation_time(config, split, populations=pops, streams=args.streams, length=args.length,
                                alpha=args.alpha, alpha_decay=args.alpha_decay, seconds=args.seconds,
                                generations=args.generations, member_batch=args.member_batch, val=val)
        load1 = os.getloadavg()
        print(f"\nD={args.dim}, 1 layer; every member reads the same {args.streams} x {args.length} bytes per "
              f"generation; {args.seconds:.0f} s of generation time each; load average {load0[0]:.2f} at the start, "
              f"{load1[0]:.2f} at the end")
        print(f"| population | member_batch | bits/byte at generation {args.generations} | seconds to generation "
              f"{args.generations} | generations in {args.seconds:.0f} s | bits/byte at {args.seconds:.0f} s |")
        print("|---|---|---|---|---|---|")
        for rec in records:
            at_g = next(e for e in rec["evals"] if e["why"] == f"generation {args.generations}")
            at_t = next(e for e in rec["evals"] if e["why"] == f"{args.seconds:g} s")
            print(f"| {rec['population']} | {rec['member_batch'] or 'none'} | {at_g['bpb']:.3f} | "
                  f"{at_g['seconds']:.1f} | {at_t['generation']} | {at_t['bpb']:.3f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "loadavg_start": load0, "loadavg_end": load1, "records": records},
                          f, indent=1)
        return
    if args.what == "ablation":
        print(f"| population | generations | bytes/step (shared) | valid bits/byte | seconds |")
        print("|---|---|---|---|---|")
        for pop in [int(p) for p in args.populations.split(",")]:
            params, g, sec = run_int(config, split, population=pop, group_size=pop, streams=args.streams,
                                     length=args.length, alpha=args.alpha, alpha_decay=args.alpha_decay,
                                     generations=args.generations)
            bpb = egg.bits_per_byte(params, split.valid, config=config, **val)
            print(f"| {pop} | {g} | {args.streams * args.length} | {bpb:.3f} | {sec:.0f} |", flush=True)
    else:
        print("| model / trainer | steps in budget | valid bits/byte |")
        print("|---|---|---|")
        params, g, _ = run_int(config, split, population=args.population, group_size=2, streams=1,
                               length=args.length, alpha=args.alpha, alpha_decay=args.alpha_decay,
                               seconds=args.seconds)
        print(f"| int8 EGG, integer EGGROLL (N={args.population}) | {g} | "
              f"{egg.bits_per_byte(params, split.valid, config=config, **val):.3f} |", flush=True)
        params, g = run_float_es(config, split, population=args.population, length=args.length,
                                 seconds=args.seconds)
        print(f"| float twin, float EGGROLL (N={args.population}, Adam) | {g} | "
              f"{float_twin.bits_per_byte(params, split.valid, config=config, **val):.3f} |", flush=True)
        params, g = run_backprop(config, split, batch=32, length=args.length, seconds=args.seconds)
        print(f"| float twin, backprop (Adam, batch 32) | {g} | "
              f"{float_twin.bits_per_byte(params, split.valid, config=config, **val):.3f} |", flush=True)


if __name__ == "__main__":
    main()
