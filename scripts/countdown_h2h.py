"""Countdown head-to-head: EGGROLL vs GRPO at an equal budget of model token-passes (issue #24, item 2).

Subcommands (each writes into ``--out``: ``h2h.json`` with every raw record, ``h2h.md`` the table, ``h2h.png`` the
figure, ``cells/`` the run directories)::

    python scripts/countdown_h2h.py calibrate --out runs/h2h --minutes 30   # GRPO's token-passes in 30 min: the budget
    python scripts/countdown_h2h.py tune --out runs/h2h --trials 6 --tune-budget 0.25x   # 6 trials per method
    python scripts/countdown_h2h.py run --out runs/h2h --seeds 1 2 3 --eval-every 0.1x   # 3 seeds each, the budget
    python scripts/countdown_h2h.py report --out runs/h2h                   # table and figure again, from the JSON

* ``calibrate``: trains GRPO (settings: ``--grpo-settings``, else the chosen ones if tuning finished, else
  :class:`GRPOConfig`'s defaults) for ``--minutes`` of training time (the steps' own seconds, after a first step
  that compiles and is not counted; at least one counted step) and stores the token-passes of the counted steps as
  the budget (``calibration`` in the JSON). It depends on the machine and its load; later commands read it.
* ``tune``: ``--trials`` random-search trials per method (the same number for each), each trained from the base
  model with seed ``--tune-seed`` to ``--tune-budget`` token-passes on the training split and scored greedily on
  the *tuning* split at the end; ES searches ``--es-lr --es-sigma --es-population --es-prompts`` (learning rate, σ,
  population, prompts per member), GRPO ``--grpo-lr --grpo-group --grpo-prompts --grpo-clip`` (learning rate,
  group size, prompts per step, ratio clip); ranges ``lo:hi`` (log-uniform for learning rates and σ, uniform
  otherwise), choices ``a,b,c``. The chosen trial is the one with the best final tuning accuracy (ties: the earlier
  trial). A method's settings are chosen (``chosen`` in the JSON) as soon as all its trials are done.
* ``run``: for every seed of ``--seeds`` (default 1 2 3: not the tuning seed, so no run replays a chosen trial),
  both methods (alternating, so machine load falls on both alike) with the chosen settings (or ``--es-settings`` /
  ``--grpo-settings`` ``key=value,...``, which override them) to ``--budget`` token-passes, evaluating validation
  and tuning accuracy at 0 and every ``--eval-every`` token-passes. A method with neither chosen nor given settings
  is refused unless ``--allow-untuned`` (its defaults, with a warning). Every cell is checked against the JSON
  before anything is written: a refused invocation changes nothing.

``--budget``, ``--tune-budget`` and ``--eval-every``: a count of token-passes (``250000``, ``2.5e5``) or a multiple
of the calibrated budget (``0.25x``; ``--eval-every``: of the run's budget).

The shared problem: ``llm-countdown`` (``esx train llm-countdown``; SmolLM2-135M-Instruct, 2 numbers in [1, 40],
lenient scoring, 32 new tokens, hash-disjoint training / tuning / validation splits) with ``--model`` and any
``--set field=value`` of :class:`esx_envs.llm.config.LLMConfig` (``--set val_size=64``, ``--set system_prompt=none``);
both methods take the model, the task, the prompt and ``max_new_tokens`` from it. ``--model tiny`` (the random
2-layer model of the tests) is for smoke tests.

**Resume** (``--resume``): finished tuning trials and (method, seed) cells kept in the JSON are skipped; a partly
finished cell **continues from its checkpoint**, written at every evaluation point (ES: the runner's checkpoint, also
written on Ctrl-C / SIGTERM; GRPO: an ``.npz`` of parameters, Adam state and RNG state; both continue exactly; the
steps after the last checkpoint are redone). A calibration is one sitting (interrupted: run it again). A finished
cell's checkpoints are deleted unless ``--keep-checkpoints`` (SmolLM2: 1.6 GB each); its records stay. Without
``--resume`` a subcommand refuses to touch a JSON that already holds its part.
Every invocation appends ``{"command", "steps", "trained", "skipped"}`` to ``invocations`` in the JSON
(``steps``: training steps it took; 0 when everything was already done).

What is counted and how: see :mod:`esx_envs.llm.h2h` and ``docs/llm.md`` ("Head-to-head with GRPO: the command").
"""
from __future__ import annotations

import argparse
import sys
import time

from esx.run import apply_overrides, to_dict
from esx_envs.configs import get_config
from esx_envs.llm import h2h

DEFAULT_SPACE = h2h.SEARCH_SPACE


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (h2h.json, h2h.md, h2h.png, cells/)")
    common.add_argument("--model", default=None, help="'smollm2' (llm-countdown's), 'tiny', a .gguf or HF folder")
    common.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an LLMConfig field of the shared problem (repeatable), e.g. --set val_size=64")
    common.add_argument("--data-seed", type=int, default=0, help="seed of the validation and tuning sets")
    common.add_argument("--eval-batch", type=int, default=16, help="problems per evaluation batch")
    common.add_argument("--resume", action="store_true", help="keep finished cells, continue partial ones")
    common.add_argument("--es-settings", default=None, help="ES settings key=value,... (override the chosen)")
    common.add_argument("--grpo-settings", default=None, help="GRPO settings key=value,... (override the chosen)")
    common.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the checkpoints of finished cells (default: deleted; the records stay)")
    common.add_argument("--quiet", action="store_true")
    p = argparse.ArgumentParser(description="EGGROLL vs GRPO on Countdown at an equal token-pass budget")
    sub = p.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", parents=[common], help="the budget: GRPO's token-passes in --minutes")
    cal.add_argument("--minutes", type=float, default=30.0)
    cal.add_argument("--seed", type=int, default=0)
    tune = sub.add_parser("tune", parents=[common], help="random search per method on the tuning split")
    tune.add_argument("--trials", type=int, default=6, help="trials per method")
    tune.add_argument("--tune-budget", default="0.25x",
                      help="token-passes per trial: a count, or a multiple of the calibrated budget (0.25x)")
    tune.add_argument("--tune-seed", type=int, default=0, help="training seed of every trial")
    for method, flags in (("es", {"learning_rate": "lr", "sigma": "sigma", "population_size": "population",
                                  "prompts_per_member": "prompts"}),
                          ("grpo", {"learning_rate": "lr", "group_size": "group", "prompts_per_step": "prompts",
                                    "clip_eps": "clip"})):
        for key, flag in flags.items():
            tune.add_argument(f"--{method}-{flag}", dest=f"space_{method}_{key}", default=DEFAULT_SPACE[method][key],
                              help=f"{method} {key}: 'lo:hi' or 'a,b,c' (default {DEFAULT_SPACE[method][key]})")
    run = sub.add_parser("run", parents=[common], help="the chosen settings × seeds at the budget")
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                     help="training seeds (default 1 2 3: not the tuning seed 0, whose first --tune-budget "
                          "token-passes a chosen trial has already seen)")
    run.add_argument("--allow-untuned", action="store_true",
                     help="run a method that has no tuned settings in the JSON with its defaults (else refused)")
    run.add_argument("--budget", default="1x",
                     help="token-passes per run: a count, or a multiple of the calibrated budget (1x)")
    run.add_argument("--eval-every", default="0.1x",
                     help="token-passes between evaluations: a count, or a multiple of the run's budget (0.1x)")
    sub.add_parser("report", parents=[common], help="write h2h.md and h2h.png from the JSON")
    return p


def base_config(args):
    base = get_config("llm-countdown")
    if args.model:
        base = base.replace(model=args.model)
    return apply_overrides(base, list(args.set)) if args.set else base


def amount(text: str, whole: int | None, what: str) -> int:
    """A token-pass count from a flag: ``"250000"`` (or ``"2.5e5"``) as it is, ``"0.25x"`` that multiple of
    ``whole`` (the calibrated budget; for ``--eval-every`` the run's budget)."""
    text = str(text).strip()
    try:
        value = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        raise SystemExit(f"{what}={text!r}: expected a token-pass count (250000) or a multiple (0.25x)") from None
    if not value > 0:
        raise SystemExit(f"{what}={text!r}: must be > 0")
    if not text.endswith("x"):
        return int(value)
    if whole is None:
        raise SystemExit(f"{what}={text!r} is a multiple of the calibrated budget, and there is none: run "
                         "'calibrate' first or give a token-pass count")
    return max(1, int(round(value * whole)))


def settings_for(method: str, data: dict, args, log) -> dict:
    """Given > chosen by tuning > untuned defaults."""
    given = h2h.parse_settings(getattr(args, f"{method}_settings"))
    chosen = data.get("chosen", {}).get(method)
    if chosen is None and not given:
        log(f"warning: no tuned {method} settings in the JSON and none given: untuned defaults")
    return {**h2h.default_settings(method), **(chosen or {}), **given}


class Session:
    """One invocation: the arguments, the JSON (``store``), this invocation's record, and the shared context
    (built on first need, so a ``--resume`` with nothing left to do loads no model)."""

    def __init__(self, args, argv, store: h2h.Store, base, log):
        self.args, self.store, self.data, self.base, self.log = args, store, store.data, base, log
        self.invocation = {"command": args.command, "argv": list(argv), "steps": 0, "trained": [], "skipped": [],
                           "started": time.time()}
        self.data.setdefault("invocations", []).append(self.invocation)
        self._context = None

    def context(self) -> h2h.Context:
        if self._context is None:
            self._context = h2h.context(self.base, self.args.data_seed, self.args.eval_batch)
            self.data.setdefault("problems", {s: [p.question for p in ps]
                                              for s, ps in self._context.problems.items()})
        return self._context

    def base_eval(self, splits) -> dict:
        """The untrained model's accuracies (once per JSON)."""
        be = self.data.setdefault("base_eval", {})
        for s in splits:
            if s not in be:
                be[s] = self.context().evaluate(self.context().params, s)
                self.store.save()
        return be

    def check(self, old: dict | None, spec: dict) -> None:
        """Refuses (``SystemExit``) to continue a recorded cell ``old`` without ``--resume`` or with another
        ``spec``; every cell of an invocation is checked before anything is written."""
        if old is None:
            return
        key = spec["key"]
        if not self.args.resume:
            raise SystemExit(f"{self.store.path} already holds {key}; pass --resume to keep it (finished cells "
                             "are skipped) or use another --out")
        if {k: old.get(k) for k in spec} != spec:
            raise SystemExit(f"{key} in {self.store.path} was started with {({k: old.get(k) for k in spec})}, "
                             f"now {spec}; use another --out")

    def cell(self, section: dict, index: str, spec: dict, splits) -> dict:
        """Trains (or skips, or continues) the cell ``section[index]`` described by ``spec``."""
        args, key = self.args, spec["key"]
        old = section.get(index)
        self.check(old, spec)
        if old is not None:
            if old.get("done"):
                self.invocation["skipped"].append(key)
                return old
        cell = section[index] = old or {**spec, "records": [], "done": False}
        self.log(f"{key}: {cell['settings']}, budget {cell['budget']} token-passes")
        steps = h2h.run_cell(self.context(), cell, self.store.out / "cells" / key, splits=splits,
                             base_eval=self.base_eval(splits), save=self.store.save, log=self.log,
                             keep_checkpoints=args.keep_checkpoints)
        self.invocation["steps"] += steps
        self.invocation["trained"].append(key)
        self.store.save()
        return cell

    def calibrate(self) -> None:
        args, data = self.args, self.data
        if "calibration" in data:
            if not args.resume:
                raise SystemExit(f"{self.store.path} already holds a calibration; pass --resume to keep it")
            self.invocation["skipped"].append("calibration")
            return
        settings = settings_for("grpo", data, args, self.log)
        progress = h2h.Progress(first={1})   # the first step (compilation) is not counted, as in the cells
        trainer = h2h.GRPOArm(self.context(), settings, args.seed, self.store.out / "cells" / "calibration").trainer
        first_passes = 0
        while progress.generation < 2 or progress.wall_s < 60.0 * args.minutes:   # one sitting, no checkpoints
            m = trainer.step()
            progress.add(m["generation"], m["token_passes"], m["seconds"])
            first_passes = first_passes or progress.token_passes
            self.invocation["steps"] += 1
        passes = progress.token_passes - first_passes   # the steps after the first, which took wall_s
        data["calibration"] = {"token_passes": passes, "minutes": args.minutes, "steps": progress.generation - 1,
                               "wall_s": progress.wall_s, "first_step_s": progress.first_steps_s,
                               "settings": settings, "seed": args.seed}
        self.invocation["trained"].append("calibration")
        self.log(f"calibration: GRPO spent {passes} token-passes in {progress.wall_s:.0f} s "
                 f"({progress.generation - 1} steps after the first, which took {progress.first_steps_s:.0f} s)")

    def tune(self) -> None:
        args, data = self.args, self.data
        if args.trials < 1:
            raise SystemExit(f"--trials={args.trials}: must be >= 1")
        budget = amount(args.tune_budget, self.calibrated, "--tune-budget")
        space = {m: {k: getattr(args, f"space_{m}_{k}") for k in DEFAULT_SPACE[m]} for m in h2h.METHODS}
        for m in h2h.METHODS:
            for k, v in space[m].items():
                h2h.parse_spec(k, v)   # errors before any training
        specs = {m: [{"key": f"tune-{m}-{i}", "method": m, "seed": args.tune_seed,
                      "settings": h2h.trial_settings(space[m], m, i, args.tune_seed),
                      "budget": budget, "eval_every": budget} for i in range(args.trials)] for m in h2h.METHODS}
        for m in h2h.METHODS:   # a refused invocation changes nothing in the JSON
            for i, spec in enumerate(specs[m]):
                self.check(data.get("tune", {}).get(m, {}).get(str(i)), spec)
        tune = data.setdefault("tune", {})
        data["tune_setup"] = {"trials": args.trials, "budget": budget, "seed": args.tune_seed, "space": space}
        for method in h2h.METHODS:
            section = tune.setdefault(method, {})
            for i, spec in enumerate(specs[method]):
                self.cell(section, str(i), spec, ("tune",))
            accuracy, neg = max((section[str(i)]["records"][-1]["tune_accuracy"], -i) for i in range(args.trials))
            best = section[str(-neg)]   # the best final tuning accuracy; ties: the earlier trial
            data.setdefault("chosen", {})[method] = best["settings"]
            self.log(f"{method}: chosen trial {-neg} (tuning accuracy {accuracy:.3f}): {best['settings']}")

    def run(self) -> None:
        args, data = self.args, self.data
        budget = amount(args.budget, self.calibrated, "--budget")
        eval_every = amount(args.eval_every, budget, "--eval-every")
        for m in h2h.METHODS:
            if m not in data.get("chosen", {}) and not getattr(args, f"{m}_settings") and not args.allow_untuned:
                raise SystemExit(f"run: {self.store.path} has no tuned {m} settings (finish 'tune' first), and none "
                                 f"are given with --{m}-settings; --allow-untuned runs {m} with its defaults")
        settings = {m: settings_for(m, data, args, self.log) for m in h2h.METHODS}
        specs = [(method, seed, {"key": f"run-{method}-seed{seed}", "method": method, "seed": seed,
                                 "settings": settings[method], "budget": budget, "eval_every": eval_every})
                 for seed in args.seeds for method in h2h.METHODS]   # alternating: load falls on both alike
        for method, seed, spec in specs:   # a refused invocation changes nothing in the JSON
            self.check(data.get("runs", {}).get(method, {}).get(str(seed)), spec)
        data["run_budget"] = {"budget": budget, "eval_every": eval_every}
        runs = data.setdefault("runs", {})
        for method, seed, spec in specs:
            self.cell(runs.setdefault(method, {}), str(seed), spec, ("val", "tune"))

    @property
    def calibrated(self) -> int | None:
        return self.data.get("calibration", {}).get("token_passes")


def main(argv=None) -> dict:
    """Runs one subcommand; returns this invocation's record (``steps``, ``trained``, ``skipped``, ``seconds``)
    with the paths of the table, the figure and the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    store = h2h.Store(args.out)
    if args.command == "report":
        md, png = h2h.write_report(store)
        log(md.read_text())
        return {"steps": 0, "trained": [], "skipped": [], "table": str(md), "figure": str(png)}
    base = base_config(args)
    data = store.data
    if data.get("config", to_dict(base)) != to_dict(base) or data.get("data_seed", args.data_seed) != args.data_seed:
        raise SystemExit(f"{store.path} was written for another problem config or data seed; use another --out")
    data["config"], data["data_seed"] = to_dict(base), args.data_seed
    session = Session(args, argv, store, base, log)
    store.save()
    invocation = session.invocation
    try:
        getattr(session, args.command)()
    except KeyboardInterrupt:
        invocation["interrupted"] = True
        log(f"interrupted; the records so far are in {store.path}: continue with --resume")
        raise
    finally:
        invocation["seconds"] = time.time() - invocation.pop("started")
        store.save()
    md, png = h2h.write_report(store)
    log(md.read_text())
    return {**invocation, "table": str(md), "figure": str(png), "json": str(store.path)}


if __name__ == "__main__":
    main(sys.argv[1:])
