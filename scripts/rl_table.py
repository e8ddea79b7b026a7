"""EGGROLL vs OpenES vs PPO per environment at a budget of environment steps: a markdown table, JSON and one figure.

    python3 scripts/rl_table.py --configs paper-cartpole,navix-dynamic-obstacles --env-steps 200000 --seeds 3 \\
        --out runs/rl_table [--population 256 --width 64 --depth 2] [--methods eggroll,open_es,ppo] [--resume] \\
        [--member-batch 256]
    python3 scripts/rl_table.py --configs ... --minutes 2 --seeds 3 --out runs/rl_table   # equal wall-clock

Cells are (config, method, seed), run config by config, and within a config seed by seed with the methods in turn
(so load from other jobs falls on each method alike; every cell records the 1-minute load average at its start and
end). ``eggroll`` and ``open_es`` train the named config of ``esx train`` (its
population, rank, σ, optimizer and policy unless overridden here) with ``strategy=`` set, one generation at a time,
until the environment steps the population took (counted exactly: the steps every member acted, from the rollouts'
``ObsMoments``) reach ``--env-steps``, or until ``--minutes`` of generation time have passed (the first, compiling,
generation not counted; a run stops at the first generation boundary at or past it, so the method with longer
generations, OpenES, may overshoot by up to one generation; each cell records ``timed_s``; PPO then trains for the
environment steps the EGGROLL cell of the same seed took, and always runs after EGGROLL within a seed); the final
score is the greedy return of the unperturbed policy over
``--eval-episodes`` episodes. The wall-clock per environment step leaves out the first generation (compilation).
``ppo`` trains rejax's PPO (extra ``rl-ppo``; rejax's default hyperparameters and network) for the same number of
environment steps on the same environment as the ES cells: the config's adapter as a gymnax-style environment
(:class:`esx_envs.rl.gymnax_env.AdapterEnv`, auto-resetting, the config's ``max_steps``), with rejax's observation
normalisation where the config normalises observations. rejax's own wrappers failed on Brax 0.14, Jumanji and
Craftax (docs/rl.md); the adapter is written for every suite esx adapts (PPO through it is tested on Brax). The
score is the last of rejax's own evaluations (128 episodes, actions sampled from the policy, as rejax evaluates). A PPO failure is reported and skips
that environment's PPO cells.

Normalisation (as the paper reports returns relative to PPO): ``score = 1 + (R - R_PPO) / |R_PPO|``, which is
``R / R_PPO`` for positive PPO returns and stays increasing in ``R`` for negative ones (Pendulum); mean ± standard
error over seeds, normalised with PPO's mean. Without a PPO result for an environment the raw returns are shown.

Outputs in ``--out``: ``cells.json`` (every finished cell; ``--resume`` skips the cells it holds), ``table.md`` and
``table.png`` (normalised final return per environment and method; EGGROLL's and OpenES's µs per environment step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("eggroll", "open_es", "ppo")


def _key(cell: dict) -> str:
    return f"{cell['config']}|{cell['method']}|{cell['seed']}"


def load_cells(path: str, args: argparse.Namespace | None = None) -> dict:
    """``{"config|method|seed": cell}`` from ``cells.json`` (empty when the file does not exist).

    Raises:
      SystemExit: ``args`` asks for another budget than the file's cells were run at (a table mixes no budgets).
    """
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if args is not None:
        have = (data.get("budget_env_steps"), data.get("budget_minutes"))
        if have != (args.env_steps, args.minutes):
            raise SystemExit(f"{path} holds cells run at env_steps={have[0]}, minutes={have[1]}; this call asks for "
                             f"env_steps={args.env_steps}, minutes={args.minutes}: use the same budget to resume, "
                             "or another --out")
    return {_key(c): c for c in data["cells"]}


def save_cells(path: str, cells: dict, args: argparse.Namespace) -> None:
    """Writes ``cells`` merged with what ``path`` holds now (another table process sharing ``--out`` may have added
    cells since this one read it: theirs are kept, and added to ``cells``), under an exclusive lock on
    ``path + ".lock"`` where the platform has ``fcntl``, through a temporary file and an atomic rename."""
    try:
        import fcntl
    except ImportError:         # not Unix: no lock (one process per --out)
        fcntl = None
    with open(path + ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        for key, cell in load_cells(path, args).items():
            cells.setdefault(key, cell)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"budget_env_steps": args.env_steps, "budget_minutes": args.minutes,
                       "cells": list(cells.values())}, f, indent=1)
        os.replace(tmp, path)


def es_config(name: str, method: str, seed: int, args: argparse.Namespace):
    """The named config with the table's overrides (strategy, seed, and population / rank / width / depth /
    max_steps where given)."""
    from esx_envs import configs

    overrides = [f"strategy={method}", f"seed={seed}", f"final_eval_episodes={args.eval_episodes}"]
    for field in ("population", "width", "depth", "max_steps", "rank", "member_batch"):
        value = getattr(args, field)
        if value is not None:
            overrides.append(f"{'population_size' if field == 'population' else field}={value}")
    return configs.apply_overrides(configs.get_config(name), overrides)


def run_es(name: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """One ES cell: train until ``args.env_steps`` environment steps (or ``args.minutes`` of generation time after
    the first, compiling, generation), then the greedy final return."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from esx.noise import stream_key
    from esx.run import RunState
    from esx_envs.rl import update_obs_stats

    cfg = es_config(name, method, seed, args)
    setup = cfg.setup()
    strategy, fitness = setup.strategy, setup.parts.fitness

    @jax.jit
    def generation(es_state, stats, run_key):
        key = stream_key(run_key, "data", es_state.generation)
        returns, moments = strategy.evaluate(es_state, fitness, key, stats, has_aux=True)
        es_state, _ = strategy.tell(es_state, returns)
        stats = update_obs_stats(stats, moments) if cfg.obs_norm else stats
        return es_state, stats, jnp.sum(moments.count)

    state = setup.initial_state()
    es_state, stats, run_key = state.es, state.carry, state.key
    steps, gens, timed_steps, timed_s = 0, 0, 0, 0.0
    start = time.perf_counter()
    def more() -> bool:
        if args.minutes is not None:
            return gens == 0 or timed_s < 60.0 * args.minutes
        return steps < args.env_steps

    while more():
        t = time.perf_counter()
        es_state, stats, n = generation(es_state, stats, run_key)
        n = int(n)
        if gens > 0:                       # the first generation includes compilation
            timed_steps, timed_s = timed_steps + n, timed_s + time.perf_counter() - t
        steps, gens = steps + n, gens + 1
    wall = time.perf_counter() - start
    # the runner's own final evaluation (its key: what `esx train` would report at this state, `esx eval` repeats)
    _, returns = setup.evaluate(RunState(es_state, stats, run_key), True)
    return {"final_return": float(np.mean(returns)), "env_steps": steps, "generations": gens, "wall_s": wall,
            "us_per_env_step": (timed_s / timed_steps * 1e6) if timed_steps else None, "timed_s": timed_s,
            "population_size": cfg.population_size, "policy": f"{cfg.depth}x{cfg.width}"}


def run_ppo(name: str, seed: int, args: argparse.Namespace, env_steps: int) -> dict | None:
    """One PPO cell with rejax on the config's environment through :class:`esx_envs.rl.gymnax_env.AdapterEnv` (the
    same adapter and episode limit as the ES cells; observation normalisation as the config's ``obs_norm``), or
    ``None`` when rejax is not installed."""
    try:
        import jax
        from rejax import PPO
    except ImportError:
        return None
    from esx_envs.rl import make_adapter
    from esx_envs.rl.gymnax_env import AdapterEnv

    cfg = es_config(name, "eggroll", seed, args)
    env = AdapterEnv(make_adapter(cfg.env, max_steps=cfg.max_steps or None))   # 0: the suite's limit, as ES
    algo = PPO.create(env=env, env_params=env.default_params, total_timesteps=env_steps,
                      eval_freq=env_steps, skip_initial_evaluation=True, num_envs=args.ppo_envs,
                      num_steps=args.ppo_steps, normalize_observations=bool(cfg.obs_norm))
    start = time.perf_counter()
    _, (lengths, returns) = jax.jit(algo.train)(jax.random.key(seed))
    returns.block_until_ready()
    return {"final_return": float(returns[-1].mean()), "env_steps": int(env_steps), "wall_s":
            time.perf_counter() - start, "us_per_env_step": None, "env": cfg.env, "max_steps": env.adapter.max_steps}


def summarise(cells: dict, names: list[str], methods: list[str], seeds: int | None = None) -> dict:
    """Per config and method: ``n``, raw mean and s.e., normalised mean and s.e. (``None`` without PPO; the s.e. is
    the method's own over ``|R_PPO|``), µs per environment step; over the cells of seeds ``0 .. seeds - 1`` (all
    seeds when ``None``)."""
    out = {}
    cells = {k: c for k, c in cells.items() if seeds is None or c["seed"] < seeds}
    for name in names:
        row = {}
        for m in methods:
            rs = [c["final_return"] for c in cells.values() if c["config"] == name and c["method"] == m]
            us = [c["us_per_env_step"] for c in cells.values()
                  if c["config"] == name and c["method"] == m and c.get("us_per_env_step")]
            if not rs:
                continue
            mean = sum(rs) / len(rs)
            se = (math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1)) / math.sqrt(len(rs))
                  if len(rs) > 1 else 0.0)
            capped = any(c.get("capped_from_env_steps") for c in cells.values()
                         if c["config"] == name and c["method"] == m)
            row[m] = {"n": len(rs), "mean": mean, "se": se, "us_per_env_step": (sum(us) / len(us)) if us else None,
                      "capped": capped}
        ppo = row.get("ppo", {}).get("mean")
        for m, r in row.items():
            if ppo is not None and ppo != 0:
                r["norm_mean"], r["norm_se"] = 1 + (r["mean"] - ppo) / abs(ppo), r["se"] / abs(ppo)
            else:
                r["norm_mean"] = r["norm_se"] = None
        out[name] = row
    return out


def write_markdown(path: str, summary: dict, methods: list[str], args: argparse.Namespace) -> str:
    def fmt(r, norm):
        if r is None:
            return "–"
        mark = " *" if r.get("capped") else ""
        if norm and r.get("norm_mean") is not None:
            return f"{r['norm_mean']:.2f} ± {r['norm_se']:.2f}{mark}"
        return f"{r['mean']:.1f} ± {r['se']:.1f} (n={r['n']}){mark}"

    budget = (f"{args.minutes:g} minutes of generation time per ES run (PPO: the environment steps EGGROLL took)"
              if args.minutes is not None else f"{args.env_steps} environment steps per run")
    lines = [f"Budget: {budget}; seeds 0–{args.seeds - 1} (n per cell in the raw columns); normalised by PPO's "
             "mean (1 + (R − R_PPO)/|R_PPO|, ± the method's s.e. / |R_PPO|; PPO's own spread is in its raw column) "
             "where PPO ran, raw returns otherwise.", "",
             "| config | " + " | ".join(methods) + " | raw returns (" + ", ".join(methods) +
             ") | µs / env step EGGROLL | OpenES | OpenES / EGGROLL |",
             "|---|" + "---|" * len(methods) + "---|---|---|---|"]
    for name, row in summary.items():
        us_e = row.get("eggroll", {}).get("us_per_env_step")
        us_o = row.get("open_es", {}).get("us_per_env_step")
        timing = " | ".join(f"{u:.1f}" if u else "–" for u in (us_e, us_o))
        timing += f" | {us_o / us_e:.2f}×" if us_e and us_o else " | –"
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(m), True) for m in methods) + " | "
                     + ", ".join(fmt(row.get(m), False) for m in methods) + f" | {timing} |")
    if any(r.get("capped") for row in summary.values() for r in row.values()):
        lines += ["", "\\* PPO trained for fewer environment steps than EGGROLL took: capped by --ppo-max-env-steps "
                  "(each cell's capped_from_env_steps in cells.json)."]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_figure(path: str, summary: dict, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 4), 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [summary[n].get(m, {}).get("norm_mean") for n in names]
        es = [summary[n].get(m, {}).get("norm_se") for n in names]
        if not any(y is not None for y in ys):   # no PPO anywhere: raw means
            ys = [summary[n].get(m, {}).get("mean") for n in names]
            es = [summary[n].get(m, {}).get("se") for n in names]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
        ax1.bar(xs, [y if y is not None else 0 for y in ys], width, yerr=[e or 0 for e in es], label=m, capsize=2)
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylabel("final greedy return (PPO = 1)")
    ax1.legend()
    for i, m in enumerate(("eggroll", "open_es")):
        ys = [summary[n].get(m, {}).get("us_per_env_step") or 0 for n in names]
        ax2.bar([j + (i - 0.5) * 0.4 for j in range(len(names))], ys, 0.4, label=m)
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax2.set_ylabel("µs per environment step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", required=True, help="comma-separated named configs of esx train")
    p.add_argument("--methods", default=",".join(METHODS))
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--env-steps", type=int, default=None, help="environment steps per run")
    budget.add_argument("--minutes", type=float, default=None,
                        help="minutes of generation time per ES run (after the compiling first generation); PPO "
                             "then trains for the environment steps the EGGROLL cell of its seed took")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="skip the cells already in OUT/cells.json")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write table.md and table.png from the cells OUT/cells.json holds")
    p.add_argument("--population", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--member-batch", type=int, default=None,
                   help="evaluate this many members at a time (memory; OpenES at the paper's populations)")
    p.add_argument("--eval-episodes", type=int, default=32)
    p.add_argument("--ppo-envs", type=int, default=16)
    p.add_argument("--ppo-steps", type=int, default=64)
    p.add_argument("--ppo-max-env-steps", type=int, default=None,
                   help="cap PPO's environment steps (with --minutes, EGGROLL's can reach tens of millions); a capped "
                        "cell records capped_from_env_steps and the table marks it")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    # PPO last: with --minutes it takes its step budget from the EGGROLL cell of its seed
    methods = sorted(dict.fromkeys(m for m in args.methods.split(",") if m), key=lambda m: m == "ppo")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; valid: {list(METHODS)}")
    if args.minutes is not None and "ppo" in methods and "eggroll" not in methods:
        p.error("--minutes with ppo needs eggroll too: PPO trains for the environment steps EGGROLL took")
    if (args.minutes is not None and args.minutes <= 0) or (args.env_steps is not None and args.env_steps <= 0):
        p.error("the budget (--env-steps or --minutes) must be positive")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cells.json")
    cells = load_cells(path, args) if args.resume or args.report else {}
    unavailable: set[tuple[str, str]] = set()
    for name in names:
        for seed in range(args.seeds):
            for method in methods:          # methods alternate within a seed: machine load falls on each alike
                cell = {"config": name, "method": method, "seed": seed}
                if args.report or _key(cell) in cells or (name, method) in unavailable:
                    continue
                load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                if method == "ppo":
                    steps = args.env_steps
                    if args.minutes is not None:   # PPO takes the environment steps EGGROLL took in the minutes
                        egg = cells.get(_key({"config": name, "method": "eggroll", "seed": seed}))
                        if egg is None:
                            print(f"{name} ppo seed {seed}: no EGGROLL cell to take the step budget from; skipped",
                                  flush=True)
                            continue
                        steps = egg["env_steps"]
                    capped_from = None
                    if args.ppo_max_env_steps is not None and steps > args.ppo_max_env_steps:
                        capped_from, steps = steps, args.ppo_max_env_steps
                    try:
                        result = run_ppo(name, seed, args, steps)
                        if result is not None and capped_from is not None:
                            result["capped_from_env_steps"] = capped_from
                    except Exception as e:  # rejax 0.1.3 fails on some suites (docs/rl.md); the ES cells go on
                        print(f"{name} ppo: rejax failed ({type(e).__name__}: {str(e)[:200]}); skipped", flush=True)
                        unavailable.add((name, method))
                        continue
                else:
                    result = run_es(name, method, seed, args)
                if result is None:
                    print(f"{name} {method}: not available (skipped)", flush=True)
                    unavailable.add((name, method))
                    continue
                if load_start is not None:
                    result["load_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
                cells[_key(cell)] = {**cell, **result}
                save_cells(path, cells, args)
                print(f"{name} {method} seed {seed}: return {result['final_return']:.2f} "
                      f"({result['env_steps']} steps, {result['wall_s']:.1f} s)", flush=True)
    summary = summarise(cells, names, methods, args.seeds)
    print(write_markdown(os.path.join(args.out, "table.md"), summary, methods, args))
    write_figure(os.path.join(args.out, "table.png"), summary, methods)
    return summary


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
