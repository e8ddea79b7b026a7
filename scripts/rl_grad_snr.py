"""The ES gradient estimates of EGGROLL and OpenES at an RL config's initial policy, side by side.

For each strategy the named config of ``esx train`` is built with ``strategy=`` set (same seed, so the same initial
policy and observation statistics) and ``--estimates`` independent estimates ``ĝ`` (``strategy.gradient`` of one
generation's evaluation, each with its own data key and generation, hence its own noise) are drawn at the initial
parameters. Per parameter leaf it prints:

* ``norm``: the mean of ``‖ĝ‖`` over the estimates (the same per-entry noise variance and shaping give the same
  expected norm for both strategies: a ratio far from 1 would be a scale bug, e.g. a missing ``1/√r``);
* ``cos``: the mean ± standard deviation of the cosine between independent estimates of the same strategy (near 0:
  the estimate is dominated by noise; near 1: every generation sees the same direction);
* ``cross``: the cosine between the two strategies' mean estimates.

Used for the CartPole question of docs/rl.md (why OpenES learned faster per generation than EGGROLL):

    python3 scripts/rl_grad_snr.py --config paper-cartpole --estimates 4 [--json out.json] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esx.noise import stream_key  # noqa: E402
from esx.run import core_config  # noqa: E402
from esx_envs import configs  # noqa: E402
from esx_envs.rl.rollout import ObsStats  # noqa: E402
from esx_envs.rl.task import _build  # noqa: E402

STRATEGIES = ("eggroll", "open_es")


def estimates(config_name: str, strategy: str, count: int, overrides: list[str]) -> list[dict[str, np.ndarray]]:
    """``count`` independent gradient estimates at the initial policy: ``[{leaf path: float[size]}]``."""
    cfg = configs.apply_overrides(configs.get_config(config_name), [*overrides, f"strategy={strategy}"])
    core = core_config(cfg)
    batch = None if cfg.member_batch in (None, "auto") else int(cfg.member_batch)
    adapter, policy, strat, fitness, _ = _build(core, 1, "gather", 1, batch)
    run_key = jax.random.key(cfg.seed)
    state = strat.init(stream_key(run_key, "noise"), policy.init(stream_key(run_key, "params")))
    stats = ObsStats.create(adapter.observation_shape)

    @jax.jit
    def one(st, key):
        returns, _ = strat.evaluate(st, fitness, key, stats, has_aux=True)
        return strat.gradient(st, returns)

    out = []
    for k in range(count):
        g = one(state.replace(generation=jnp.int32(k)), stream_key(run_key, "data", k))
        out.append({jax.tree_util.keystr(p): np.ravel(np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(g)})
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / den) if den > 0 else 0.0


def summarise(per_strategy: dict[str, list[dict[str, np.ndarray]]]) -> dict:
    """``{leaf: {strategy: {"norm", "cos_mean", "cos_std"}, "cross": cos of the mean estimates}}``."""
    leaves = list(next(iter(per_strategy.values()))[0])
    table = {}
    for leaf in leaves:
        row = {}
        for name, ests in per_strategy.items():
            cos = [_cos(a[leaf], b[leaf]) for a, b in itertools.combinations(ests, 2)]
            row[name] = {"norm": float(np.mean([np.linalg.norm(e[leaf]) for e in ests])),
                         "cos_mean": float(np.mean(cos)) if cos else float("nan"),
                         "cos_std": float(np.std(cos)) if cos else float("nan")}
        if len(per_strategy) == 2:
            a, b = (np.mean([e[leaf] for e in ests], 0) for ests in per_strategy.values())
            row["cross"] = _cos(a, b)
        table[leaf] = row
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper-cartpole")
    p.add_argument("--estimates", type=int, default=4)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--set", nargs="*", default=["member_batch=256"], metavar="KEY=VALUE",
                   help="config overrides (default: member_batch=256)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.estimates < 2:
        p.error("--estimates must be >= 2 (the cosines compare independent estimates)")
    names = [s for s in args.strategies.split(",") if s]
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; valid: {list(STRATEGIES)}")
    per = {s: estimates(args.config, s, args.estimates, list(args.set)) for s in names}
    table = summarise(per)
    print(f"{args.config}, {args.estimates} estimates per strategy at the initial policy ({' '.join(args.set)})")
    for leaf, row in table.items():
        cells = "  ".join(f"{s}: norm {row[s]['norm']:.4g} cos {row[s]['cos_mean']:+.3f}±{row[s]['cos_std']:.3f}"
                          for s in names)
        cross = f"  cross {row['cross']:+.3f}" if "cross" in row else ""
        print(f"{leaf:28s} {cells}{cross}")
    out = {"config": args.config, "estimates": args.estimates, "overrides": list(args.set), "leaves": table}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
