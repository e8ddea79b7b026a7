"""The ``esx`` command line: ``esx train``, ``esx eval``, ``esx bench`` (console script ``esx``).

``esx train`` and ``esx eval`` are the command-line face of the runner (:mod:`esx.run`); ``esx bench`` runs
:mod:`esx_envs.bench`. ``esx --version`` prints the version.

::

    esx train cartpole                                  # the README's main command
    esx train pendulum population_size=1024 sigma=0.1   # overrides are field=value
    esx train cartpole --run-dir runs/cp --resume       # continue an interrupted run exactly
    esx train egg-shakespeare minutes=60                # the integer byte LM (esx_envs.egg)
    esx train llm-arithmetic                            # SmolLM2 on 2-digit addition (esx_envs.llm)
    esx eval runs/cp                                    # the run's final evaluation again (same keys, same number)
    esx eval runs/cp --episodes 1000 --seed 7           # RL: greedy return over other episodes

Errors in the input (unknown config, environment or field, an unusable checkpoint) end with a one-line message and
exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

COMMANDS = {
    "train": ("esx_envs.cli", "train_main", "train a named config or task kind (esx train --help)"),
    "eval": ("esx_envs.cli", "eval_main", "evaluate a run directory (esx eval --help)"),
    "bench": ("esx_envs.bench", "main", "run the benchmark suite (esx bench --help)"),
}


def main(argv: list[str] | None = None) -> int:
    """``esx <command> [options]``: dispatches to the command's module (imported only when used)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        import esx

        print(f"esx {esx.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: esx <command> [options]   (esx --version)\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:<8}{doc}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"esx: unknown command {cmd!r}; valid commands are {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


def _error(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _train_parser(config=None):
    from esx_envs import configs

    p = argparse.ArgumentParser(
        prog="esx train",
        description="Train a named config (RL, EGG or LLM) or any installed task kind with EGGROLL. Override any "
                    "field with field=value (e.g. generations=5).",
        epilog=configs.describe(config) + "\n\nexample: esx train cartpole population_size=512 seed=3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help=f"one of: {', '.join(configs.CONFIGS)}, or an installed task kind")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="config overrides")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: runs/<config>-<date>-<time>; required with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard scalars to RUN_DIR/tensorboard (extra: tensorboard)")
    p.add_argument("--plot-x", choices=("generation", "wall_time"), default="generation",
                   help="horizontal axis of learning_curve.png (wall_time: seconds since the start)")
    p.add_argument("--devices", default=None, metavar="N|all",
                   help="shard the population over N devices (or all); same as devices=N (0 = all). On a "
                        "CPU-only machine the CPU gets one device per core (all) or N devices")
    p.add_argument("--multi-host", action="store_true",
                   help="call jax.distributed.initialize from the environment first (see docs/distributed.md)")
    return p


def _positionals(argv: list[str]) -> list[str]:
    """The arguments that are neither options, option values nor ``field=value`` overrides."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--run-dir", "--devices", "--plot-x"):
            skip = True
        elif not a.startswith("-") and "=" not in a:
            out.append(a)
    return out


def _config_help(argv: list[str]) -> str | None:
    """``esx train <config> --help``: the help text with that config's own values (``None``: no config named)."""
    from esx_envs import configs

    names = _positionals(argv)
    if not names:
        return None
    try:
        return _train_parser(configs.get_config(names[0])).format_help()
    except configs.ConfigError:
        return None


def _option_hint(argv: list[str], config) -> str | None:
    """A hint for ``--field value`` written for ``field=value`` (argparse's own message would not say it)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config)} if config is not None else set()
    options = {o for action in _train_parser()._actions for o in action.option_strings}
    for i, arg in enumerate(argv):
        if arg.split("=")[0] in options:
            continue
        if arg.startswith("--") and arg[2:].split("=")[0].replace("-", "_") in fields:
            name = arg[2:].split("=")[0].replace("-", "_")
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "VALUE")
            return f"config fields are set as field=value: write {name}={value} instead of {arg}"
    return None


def _cpu_devices_for(devices: int) -> int | None:
    """Before JAX starts its backends, give the CPU platform one device per usable core (``devices=0``, "all") or
    ``devices`` devices, so that ``--devices`` shards the population over the cores of a CPU-only machine (XLA:CPU
    runs one device's small per-step operations on one core: Pendulum, 2 cores, 7.7 -> 12.1 generations/s with
    ``--devices all``; the result does not depend on the device count). Leaves an explicit setting
    (``jax_num_cpu_devices``, ``XLA_FLAGS=--xla_force_host_platform_device_count``) alone, and changes nothing
    once a backend is running. Returns the number set, or ``None``."""
    import os

    import jax

    if devices == 1 or jax.config.jax_num_cpu_devices != -1:
        return None
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    n = devices if devices > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # a backend is already initialised (e.g. train_main called inside a JAX program)
        return None
    return n


def train_main(argv: list[str] | None = None) -> int:
    """``esx train <config> [field=value ...] [--run-dir DIR] [--resume] [--no-progress] [--tensorboard]``."""
    from esx_envs import configs
    from esx.run import CheckpointError, ConfigError, apply_overrides

    prog = "esx train"
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        text = _config_help(argv)
        if text is not None:
            print(text)
            return 0
    names = _positionals(argv)
    try:
        base = configs.get_config(names[0]) if names else None
    except ConfigError as e:
        return _error(prog, str(e))
    hint = _option_hint(argv, base)
    if hint is not None:
        return _error(prog, hint)
    args = _train_parser().parse_intermixed_args(argv)
    if args.multi_host:
        from esx import distributed

        distributed.initialize_from_env()
    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(f"devices={0 if args.devices == 'all' else args.devices}")
    try:
        config = apply_overrides(base, overrides)
    except ConfigError as e:
        return _error(prog, str(e))
    if args.resume and not args.run_dir:
        return _error(prog, "--resume needs --run-dir DIR (the run to continue)")
    if not args.multi_host:
        _cpu_devices_for(getattr(config, "devices", 1))
    run_dir = Path(args.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from esx import run

    try:
        setup = run.make_setup(config)
    except (ConfigError, ValueError) as e:
        return _error(prog, str(e))
    sharded = ""
    if getattr(config, "devices", 1) != 1:
        import jax

        from esx_envs.rl.task import num_devices

        sharded = f"; population sharded over {num_devices(config)} {jax.devices()[0].platform} devices"
    print(f"esx train {config.name}: {config.summary()}{sharded}; run dir {run_dir}", flush=True)
    try:
        result = run.train(setup, run_dir, resume=args.resume, progress=not args.no_progress,
                           tensorboard=args.tensorboard, plot_x=args.plot_x)
    except (CheckpointError, FileExistsError, ImportError) as e:
        return _error(prog, str(e))
    again = shlex.join(["esx", "train", args.config, *args.overrides, "--run-dir", str(run_dir), "--resume"])
    if result.interrupted:
        print(f"stopped at generation {result.state.generation}; continue with: {again}")
        return 130
    r = result.final_values
    if r is not None:
        print(f"generation {result.state.generation}: greedy return over {len(r)} episodes "
              f"{r.mean():.1f} ± {r.std():.1f} (min {r.min():.0f}, max {r.max():.0f})")
    else:
        print(f"generation {result.state.generation}: " + _format_summary(result.final))
    if result.out_of_time:
        print(f"minutes={config.minutes:g} used up; continue with: {again}")
    if setup.target is not None:
        if result.reached_target:
            print(f"target {setup.score} {setup.target:g} reached after {result.time_to_target:.1f} s")
        else:
            print(f"target {setup.score} {setup.target:g} not reached")
    print(f"wall time {result.wall_time:.1f} s; metrics, learning_curve.png and checkpoints in {run_dir}")
    return 0


def _format_summary(summary: dict) -> str:
    parts = []
    for k, v in summary.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}")
        elif isinstance(v, list) and v:
            parts.append(f"{k}[0] {v[0]!r}")
    return ", ".join(parts)


def eval_main(argv: list[str] | None = None) -> int:
    """``esx eval <run_dir> [--episodes N] [--seed S]``: the final evaluation of the newest checkpoint.

    Without options it repeats the run's own final evaluation (the same episodes or problems with the same keys:
    the number in ``summary.json``). RL runs also take ``--episodes`` / ``--seed`` for a fresh set of greedy
    episodes (``--episodes`` alone: seed 12345; ``--seed`` alone: 100 episodes)."""
    prog = "esx eval"
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a run's newest checkpoint. Without options: the "
                                "run's own final evaluation again (same keys, same number as summary.json).")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=None, help="RL: greedy episodes of a fresh evaluation")
    p.add_argument("--seed", type=int, default=None, help="RL: seed of a fresh evaluation")
    args = p.parse_args(argv)
    from esx.run import CheckpointError, ConfigError, evaluate_run_summary
    from esx_envs.configs import LEGACY_KIND, from_dict

    if not Path(args.run_dir).is_dir():
        return _error(prog, f"{args.run_dir} is not a directory")
    try:
        kind = from_dict(json.loads((Path(args.run_dir) / "config.json").read_text())).KIND
    except (OSError, ValueError) as e:
        return _error(prog, f"{args.run_dir} is not a run directory ({e})")
    try:
        if kind != "rl":
            if args.episodes is not None or args.seed is not None:
                return _error(prog, f"--episodes / --seed apply to RL runs; {args.run_dir} is a {kind!r} run")
            setup, state, summary = evaluate_run_summary(args.run_dir, default_kind=LEGACY_KIND)
            print(f"{args.run_dir} (generation {state.generation}): {_format_summary(summary)}")
            return 0
        from esx_envs.rl.task import evaluate_run

        returns = evaluate_run(args.run_dir, episodes=args.episodes, seed=args.seed)
    except (CheckpointError, ConfigError, ValueError) as e:
        return _error(prog, str(e))
    what = ("the run's final evaluation" if args.episodes is None and args.seed is None
            else f"seed {12345 if args.seed is None else args.seed}")
    print(f"{args.run_dir}: greedy return over {len(returns)} episodes ({what}): {returns.mean():.2f} ± "
          f"{returns.std():.2f} (min {returns.min():.1f}, max {returns.max():.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
