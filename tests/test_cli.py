"""``esx train`` / ``esx eval``: configs, overrides, help, and clear errors for bad input (never a traceback)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esx_envs import cli, configs
from esx.run import ConfigError

# Matches tests/test_driver.py's TINY config so the compiled setup is shared within one pytest process.
TINY_OVERRIDES = ["seed=3", "generations=8", "population_size=16", "rank=2", "sigma=0.2", "width=8", "depth=1",
                  "layer_norm=false", "max_steps=40", "obs_norm=true", "chunk=2", "eval_every=4", "eval_episodes=4",
                  "final_eval_episodes=4", "checkpoint_every=2", "env=CartPole-v1", "name=tiny",
                  "target_return=none", "episodes=1", "action_mode=stochastic"]


def test_named_configs_exist():
    for name in ("cartpole", "acrobot", "pendulum", "minatar-breakout"):
        assert configs.get_config(name).name == name
    assert configs.get_config("pendulum").env == "Pendulum-v1"
    assert configs.get_config("minatar-breakout").env == "Breakout-MinAtar"


def test_overrides_parse_by_field_type():
    cfg = configs.apply_overrides(configs.get_config("cartpole"),
                                  ["population_size=64", "sigma=0.05", "obs_norm=yes", "optimizer=adam",
                                   "target_return=none", "max-steps=100"])
    assert (cfg.population_size, cfg.sigma, cfg.obs_norm, cfg.optimizer, cfg.target_return, cfg.max_steps) == (
        64, 0.05, True, "adam", None, 100)
    assert isinstance(cfg.population_size, int) and isinstance(cfg.sigma, float)


def test_bad_overrides_name_the_problem():
    base = configs.get_config("cartpole")
    with pytest.raises(ConfigError, match=r"unknown config field 'sigam'; did you mean 'sigma'\?"):
        configs.apply_overrides(base, ["sigam=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config field 'popluation_size'; did you mean 'population_size'"):
        configs.apply_overrides(base, ["popluation_size=8"])
    with pytest.raises(ConfigError, match=r"bad value 'lots' for field 'generations': expected int"):
        configs.apply_overrides(base, ["generations=lots"])
    with pytest.raises(ConfigError, match="not of the form field=value"):
        configs.apply_overrides(base, ["sigma"])
    with pytest.raises(ConfigError, match="must be even"):
        configs.apply_overrides(base, ["population_size=7"])
    with pytest.raises(ConfigError, match=r"policy_form='unit'; valid forms are \['auto', 'units', 'vector'\]"):
        configs.apply_overrides(base, ["policy_form=unit"])
    with pytest.raises(ConfigError, match=r"valid optimizers are \['adam', 'adamw', 'sgd'\]"):
        configs.apply_overrides(base, ["optimizer=lion"])
    with pytest.raises(ConfigError, match=r"unknown config 'cartpol' \(did you mean 'cartpole'\?\); valid configs "
                                          r"are \['acrobot', 'brax-ant', 'brax-humanoid', .*'minatar-breakout', "
                                          r"'navix-doorkey', .*'paper-pendulum', 'pendulum'\]") as e:
        configs.get_config("cartpol")
    assert str(sorted(configs.CONFIGS)) in str(e.value)          # every named config, sorted


def test_cli_errors_are_one_line_messages(capsys):
    assert cli.main(["train", "cartpol"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'cartpol'" in err and "minatar-breakout" in err and "Traceback" not in err
    assert cli.main(["train", "cartpole", "sigam=0.3"]) == 2
    assert "did you mean 'sigma'?" in capsys.readouterr().err
    assert cli.main(["train", "cartpole", "env=CartPol-v1"]) == 2
    err = capsys.readouterr().err
    assert "unknown environment 'CartPol-v1'" in err and "Breakout-MinAtar" in err
    assert cli.main(["train", "cartpole", "--resume"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    assert cli.main(["eval", "/nonexistent/run"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_help_lists_configs_and_fields(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in configs.CONFIGS:
        assert name in out
    for field in configs.field_names(configs.RLConfig):
        assert field in out
    assert "field=value" in out


def test_train_eval_resume_through_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "cartpole", *TINY_OVERRIDES, "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "generation 8: greedy return over 4 episodes" in out
    assert cli.main(["eval", str(run_dir), "--episodes", "4"]) == 0
    assert "greedy return over 4 episodes (seed 12345)" in capsys.readouterr().out
    # without options esx eval repeats the run's own final evaluation: the same number as summary.json
    import json

    final = json.loads((run_dir / "summary.json").read_text())["final_eval_return_mean"]
    assert cli.main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "(the run's final evaluation)" in out and f": {final:.2f} ±" in out
    # training longer is a run-control change: allowed on resume
    assert cli.main(["train", "cartpole", *TINY_OVERRIDES, "generations=10", "--run-dir", str(run_dir),
                     "--resume", "--no-progress"]) == 0
    assert "generation 10:" in capsys.readouterr().out
    # a different config is refused, with the field named
    assert cli.main(["train", "cartpole", *TINY_OVERRIDES, "generations=12", "sigma=0.3", "--run-dir",
                     str(run_dir), "--resume", "--no-progress"]) == 2
    assert "different config (sigma: checkpoint 0.2 vs now 0.3)" in capsys.readouterr().err
    # a run directory is never overwritten silently
    assert cli.main(["train", "cartpole", *TINY_OVERRIDES, "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # a corrupt newest checkpoint: clear error naming the intact previous one, which survives
    from esx import run

    previous, newest = run.list_checkpoints(run_dir)
    (newest / "meta.json").write_text("{trunc")
    assert cli.main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no readable meta.json" in err and str(previous) in err and previous.exists()


def test_console_script_runs(tmp_path):
    """The installed ``esx`` entry point: an error exits with status 2 and no traceback."""
    exe = Path(sys.executable).with_name("esx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "esx_envs.cli"]
    out = subprocess.run([*cmd, "train", "nope"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and "valid configs are" in out.stderr and "Traceback" not in out.stderr


def test_devices_all_gives_the_cpu_one_device_per_core(tmp_path):
    """``--devices all`` on a CPU-only machine shards over one CPU device per usable core (set before JAX starts);
    an explicit ``--xla_force_host_platform_device_count`` wins; overrides may follow the options."""
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    base = [sys.executable, "-m", "esx_envs.cli", "train", "cartpole", *TINY_OVERRIDES, "generations=2", "eval_every=2"]
    runs = [  # both at once (each compiles mostly on one core)
        subprocess.Popen([*base, "--devices", "all", "--no-progress", "--run-dir", str(tmp_path / "auto"),
                          f"population_size={16 * cores}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env),
        subprocess.Popen([*base, "--devices", "all", "--no-progress", "--run-dir", str(tmp_path / "explicit")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    ]
    outputs = [p.communicate(timeout=600) for p in runs]
    auto, explicit = (subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(runs, outputs))
    assert auto.returncode == 0, auto.stderr
    assert f"population sharded over {cores} cpu devices" in auto.stdout
    assert explicit.returncode == 0, explicit.stderr
    assert "population sharded over 4 cpu devices" in explicit.stdout
    assert "generation 2: greedy return over 4 episodes" in explicit.stdout


def test_version_and_config_help(capsys):
    import esx

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"esx {esx.__version__}"
    assert cli.main(["train", "cartpole", "--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out if line.startswith("  ") and len(line.split()) >= 3}
    # cartpole's own values, not the class defaults (population 256, target 499.0, generations 300)
    assert rows["generations"].split()[-1] == "300" and rows["target_return"].split()[-1] == "499.0"
    assert rows["env"].split()[-1] == "'CartPole-v1'"
    # the field table is aligned: every type starts in one column, every value in another
    start = next(i for i, line in enumerate(out) if line.startswith("cartpole (RLConfig"))
    table = [line for line in out[start + 1:] if line.startswith("  ") and len(line.split()) >= 3]
    type_cols = {line.index(line.split()[1], len(line.split()[0]) + 2) for line in table}
    assert len(type_cols) == 1, type_cols
    assert cli.main(["train", "llm-arithmetic", "--help"]) == 0
    llm_rows = [line for line in capsys.readouterr().out.splitlines() if "generations_per_prompt" in line]
    assert llm_rows and llm_rows[0].split()[:2] == ["generations_per_prompt", "int"]


def test_option_written_for_a_field_gets_a_hint(capsys):
    assert cli.main(["train", "cartpole", "--generations", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "esx train: error: config fields are set as field=value: write generations=5 instead of " \
                  "--generations"
    assert cli.main(["train", "cartpole", "--population-size=8"]) == 2
    assert "write population_size=8" in capsys.readouterr().err


def test_learning_curve_target_line_and_wall_clock_axis(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "cartpole", *TINY_OVERRIDES, "target_return=450", "--run-dir", str(run_dir),
                     "--no-progress", "--plot-x", "wall_time"]) == 0
    from esx import run
    from esx_envs import configs

    setup = run.make_setup(configs.apply_overrides(configs.get_config("cartpole"),
                                                   [*TINY_OVERRIDES, "target_return=450"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.Axes.axhline

    def spy(ax, y=0, *a, **k):
        captured.setdefault("hlines", []).append(y)
        return real(ax, y, *a, **k)

    plt.Axes.axhline = spy
    try:
        path = run.plot_learning_curve(run_dir, tmp_path / "c.png", setup=setup, x="wall_time")
    finally:
        plt.Axes.axhline = real
    assert captured["hlines"] == [450.0] and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="valid axes"):
        run.plot_learning_curve(run_dir, setup=setup, x="seconds")


def _train_until_interrupted(cmd, run_dir: Path, records: int, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Runs ``cmd`` (an ``esx train``) in a fresh process, sends it SIGINT once ``metrics.jsonl`` holds ``records``
    train records beyond what it held at the start, and returns the finished process and the count at the signal."""
    import json
    import signal
    import time

    def count():
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        return sum(json.loads(line)["kind"] == "train" for line in path.read_text().splitlines() if line.strip())

    start = count()
    # SIGINT at its default, as in a terminal: a job started in the background (CI) would hand it down ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while count() < start + records and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    at = count()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), at


def test_ctrl_c_checkpoints_and_the_printed_command_continues_the_run(tmp_path):
    """A real SIGINT to ``esx train`` (a fresh process): exit status 130, no traceback, one line naming the
    generation it stopped at and a command that, run as printed (quoted for the shell: the run directory has a
    space), continues from that generation; every generation is logged once across the two segments."""
    import json
    import shlex

    run_dir = tmp_path / "my run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("generations=", "checkpoint_every=", "chunk="))]
    overrides += ["generations=100000", "chunk=1", "checkpoint_every=1", "name=tiny run"]
    cli_cmd = [sys.executable, "-m", "esx_envs.cli"]
    first, at = _train_until_interrupted([*cli_cmd, "train", "cartpole", *overrides, "--run-dir", str(run_dir),
                                          "--no-progress"], run_dir, 3, tmp_path)
    assert first.returncode == 130, first.stderr
    assert "Traceback" not in first.stderr and at >= 3
    line = next(x for x in first.stdout.splitlines() if x.startswith("stopped at generation "))
    stopped = int(line.split()[3].rstrip(";"))
    again = shlex.split(line.split("continue with: ", 1)[1])
    assert again[:3] == ["esx", "train", "cartpole"] and again[again.index("--run-dir") + 1] == str(run_dir)
    assert "name=tiny run" in again and again[-1] == "--resume"
    # the checkpoint holds every generation fully logged before the signal (chunk=1: a generation whose train record
    # was written but whose evaluation was not is rerun on resume, its record dropped)
    assert stopped >= at - 1
    second, _ = _train_until_interrupted([*cli_cmd, *again[1:], "--no-progress"], run_dir, 2, tmp_path)
    assert second.returncode == 130 and "Traceback" not in second.stderr, second.stderr
    assert f"at generation {stopped}" in second.stdout + second.stderr
    gens = [json.loads(x)["generation"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if x.strip() and json.loads(x)["kind"] == "train"]
    assert gens == list(range(1, len(gens) + 1)) and len(gens) > stopped
