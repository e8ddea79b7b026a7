"""``esx train`` and ``esx eval``: the command-line face of :mod:`esx.driver`.

::

    esx train cartpole                                  # the README's main command
    esx train pendulum population_size=1024 sigma=0.1   # overrides are field=value
    esx train cartpole --run-dir runs/cp --resume       # continue an interrupted run exactly
    esx train egg-shakespeare minutes=60                # the integer byte LM (esx_envs.egg)
    esx train llm-arithmetic                            # SmolLM2 on 2-digit addition (esx_envs.llm)
    esx eval runs/cp                                    # RL: greedy return over 100 episodes; else the final evaluation

Errors in the input (unknown config, environment or field, an unusable checkpoint) end with a one-line message and
exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _error(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _train_parser():
    from esx import configs

    p = argparse.ArgumentParser(
        prog="esx train",
        description="Train a named config (RL, EGG or LLM) with EGGROLL. Override any field with field=value.",
        epilog=configs.describe() + "\n\nexample: esx train cartpole population_size=512 seed=3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help=f"one of: {', '.join(configs.CONFIGS)}")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="config overrides")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: runs/<config>-<date>-<time>; required with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard scalars to RUN_DIR/tensorboard (extra: tensorboard)")
    p.add_argument("--devices", default=None, metavar="N|all",
                   help="shard the population over N devices (or all); same as devices=N (0 = all). On a "
                        "CPU-only machine the CPU gets one device per core (all) or N devices")
    p.add_argument("--multi-host", action="store_true",
                   help="call jax.distributed.initialize from the environment first (see docs/distributed.md)")
    return p


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
    from esx import configs

    prog = "esx train"
    args = _train_parser().parse_intermixed_args(argv)
    if args.multi_host:
        from esx import distributed

        distributed.initialize_from_env()
    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(f"devices={0 if args.devices == 'all' else args.devices}")
    try:
        config = configs.apply_overrides(configs.get_config(args.config), overrides)
    except configs.ConfigError as e:
        return _error(prog, str(e))
    if args.resume and not args.run_dir:
        return _error(prog, "--resume needs --run-dir DIR (the run to continue)")
    if not args.multi_host:
        _cpu_devices_for(getattr(config, "devices", 1))
    run_dir = Path(args.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    from esx import driver

    try:
        driver.make_setup(config)
    except (configs.ConfigError, ValueError) as e:
        return _error(prog, str(e))
    sharded = ""
    if getattr(config, "devices", 1) != 1:
        import jax

        sharded = f"; population sharded over {driver._num_devices(config)} {jax.devices()[0].platform} devices"
    print(f"esx train {config.name}: {config.summary()}{sharded}; run dir {run_dir}", flush=True)
    try:
        result = driver.train(config, run_dir, resume=args.resume, progress=not args.no_progress,
                              tensorboard=args.tensorboard)
    except (driver.CheckpointError, FileExistsError, ImportError) as e:
        return _error(prog, str(e))
    again = (f"esx train {args.config} {' '.join(args.overrides)} --run-dir {run_dir} --resume").replace("  ", " ")
    if result.interrupted:
        print(f"stopped at generation {result.state.generation}; continue with: {again}")
        return 130
    r = result.final_returns
    if r is not None:
        print(f"generation {result.state.generation}: greedy return over {len(r)} episodes "
              f"{r.mean():.1f} ± {r.std():.1f} (min {r.min():.0f}, max {r.max():.0f})")
    else:
        print(f"generation {result.state.generation}: " + _format_summary(result.final))
    if result.out_of_time:
        print(f"minutes={config.minutes:g} used up; continue with: {again}")
    setup = driver.make_setup(config)
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
    """``esx eval <run_dir> [--episodes 100] [--seed 12345]``: the final evaluation of the newest checkpoint
    (RL: greedy return over ``--episodes`` episodes; EGG: validation bits/byte; LLM: validation accuracy)."""
    prog = "esx eval"
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a run's newest checkpoint (RL: greedy return).")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    from esx import configs, driver

    if not Path(args.run_dir).is_dir():
        return _error(prog, f"{args.run_dir} is not a directory")
    try:
        kind = configs.from_dict(json.loads((Path(args.run_dir) / "config.json").read_text())).KIND
    except (OSError, ValueError) as e:
        return _error(prog, f"{args.run_dir} is not a run directory ({e})")
    try:
        if kind != "rl":
            setup, state, summary = driver.evaluate_run_summary(args.run_dir)
            print(f"{args.run_dir} (generation {state.generation}): {_format_summary(summary)}")
            return 0
        returns = driver.evaluate_run(args.run_dir, episodes=args.episodes, seed=args.seed)
    except (driver.CheckpointError, configs.ConfigError, ValueError) as e:
        return _error(prog, str(e))
    print(f"{args.run_dir}: greedy return over {args.episodes} episodes: {returns.mean():.2f} ± {returns.std():.2f} "
          f"(min {returns.min():.1f}, max {returns.max():.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
