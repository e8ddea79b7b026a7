"""The shared driver runs the EGG and LLM tasks too: exact resume, task records, target, CLI and config errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from esx import run
from esx_envs import cli, configs
from esx.run import ConfigError

EGG = configs.apply_overrides(configs.get_config("egg-shakespeare"), dict(
    name="egg-tiny", generations=8, dim=16, population_size=16, length=24, eval_every=4, eval_streams=4,
    eval_length=128, final_eval_streams=8, chunk=2, checkpoint_every=2))
LLM = configs.apply_overrides(configs.get_config("llm-tiny-digits"), dict(
    name="llm-tiny", generations=16, population_size=16, group_size=8, prompts_per_member=1, max_new_tokens=8,
    val_size=8, eval_every=8, checkpoint_every=2, chunk=1))


def _interrupt_at(generation):
    def callback(record):
        if record["generation"] >= generation:
            raise KeyboardInterrupt
    return callback


def _same_state(a: run.RunState, b: run.RunState) -> None:
    la, lb = run.checkpoint._to_host(a), run.checkpoint._to_host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _train_records(run_dir):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "seconds")}
            for r in run.read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("config", [EGG, LLM], ids=["egg", "llm"])
def test_resume_is_bit_identical(config, tmp_path):
    """Also the LLM learning check: ES raises the dense sanity reward (fraction of digit characters) of a random
    tiny model, in the population and in the greedy validation answers."""
    full = run.train(config, tmp_path / "full", progress=False)
    if config.KIND == "llm":
        rewards = [r["reward_mean"] for r in full.history if r["kind"] == "train"]
        val = [r["val_accuracy"] for r in full.history if r["kind"] == "eval"]
        assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.1, rewards
        assert val[-1] > val[0] + 0.3 and full.final_score == val[-1], val
    part = run.train(config, tmp_path / "part", progress=False, callback=_interrupt_at(2), log=lambda s: None)
    assert part.interrupted and part.state.generation == 2
    resumed = run.train(config, tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert resumed.state.generation == config.generations
    _same_state(resumed.state, full.state)
    assert _train_records(tmp_path / "part") == _train_records(tmp_path / "full")
    assert resumed.final == full.final and np.isfinite(full.final_score)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    setup = run.make_setup(config)
    assert summary[f"final_{setup.score}"] == pytest.approx(full.final_score)
    assert (tmp_path / "full" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "full" / "config.json").read_text())["kind"] == config.KIND


def test_egg_records_and_carried_hidden_state(tmp_path):
    result = run.train(EGG, tmp_path / "run", progress=False)
    recs = run.read_metrics(tmp_path / "run")
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["generation"] for r in evals] == [0, 4, 8]  # the "before" number too
    # bits/byte of the population on its bytes: from log2-likelihood sums in 4096ths of a bit over 24 bytes
    for r in train:
        assert r["train_bpb"] == pytest.approx(-r["fitness_mean"] / 4096 / 24)
        assert 0 < r["alpha"] <= 0.1 + 1e-7 and 0 <= r["changed_fraction"] < 1
    assert evals[-1]["valid_bpb"] < evals[0]["valid_bpb"]  # 8 generations already learn byte frequencies
    hidden = np.asarray(result.state.carry)
    assert hidden.dtype == np.int8 and hidden.shape == (16, 1, 1, 16) and np.any(hidden != 0)
    assert isinstance(result.final["sample"], str) and result.final["sample"].startswith("ROMEO:")
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_bpb", "valid_bpb", "alpha"} <= set(header)


def test_egg_target_and_minutes_stop_early(tmp_path):
    reached = run.train(dataclasses.replace(EGG, target_bpb=8.5, generations=40), tmp_path / "a",
                           progress=False)
    evals = [(r["generation"], r["valid_bpb"]) for r in reached.history if r["kind"] == "eval"]
    first = next(g for g, v in evals if v <= 8.5)
    assert reached.reached_target and reached.state.generation == first == evals[-1][0] < 40
    timed = run.train(dataclasses.replace(EGG, minutes=1e-6, generations=40), tmp_path / "b", progress=False,
                         log=lambda s: None)
    assert timed.out_of_time and timed.state.generation == 0 and not timed.interrupted
    assert run.list_checkpoints(tmp_path / "b")  # the state is saved: --resume continues


def test_resuming_with_another_kind_of_config_is_an_error(tmp_path):
    run.train(EGG, tmp_path / "run", progress=False)
    rl = configs.get_config("cartpole")
    with pytest.raises(run.CheckpointError, match="kind: checkpoint 'egg' vs now 'rl'"):
        run.train(rl, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(run.CheckpointError, match="dim: checkpoint 16 vs now 64"):
        run.train(dataclasses.replace(EGG, dim=64), tmp_path / "run", resume=True, progress=False)


def test_cli_trains_and_evaluates_egg(tmp_path, capsys):
    run_dir = tmp_path / "egg"
    args = ["train", "egg-shakespeare", "generations=4", "dim=16", "population_size=16", "length=24",
            "eval_every=2", "eval_streams=4", "eval_length=128", "final_eval_streams=8", "--run-dir", str(run_dir),
            "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "EGG int8 D=16" in out and "valid_bpb" in out
    assert cli.main(["eval", str(run_dir)]) == 0
    line = capsys.readouterr().out
    final = json.loads((run_dir / "summary.json").read_text())["final_valid_bpb"]
    assert f"valid_bpb {final:.4g}" in line
    assert cli.main(["train", "egg-shakespeare", "dim=48"]) == 2
    assert "dim must be a power of 4" in capsys.readouterr().err


def test_task_config_errors():
    with pytest.raises(ConfigError, match=r"task='countdwn' \(did you mean 'countdown'\?\)"):
        configs.apply_overrides(LLM, ["task=countdwn"])
    with pytest.raises(ConfigError, match="needs gsm8k="):
        configs.apply_overrides(LLM, ["task=gsm8k"])
    with pytest.raises(ConfigError, match="must be even and divide"):
        configs.apply_overrides(EGG, ["group_size=3"])
    with pytest.raises(ConfigError, match=r"unknown config field 'lenght'; did you mean 'length'\?"):
        configs.apply_overrides(EGG, ["lenght=10"])
    with pytest.raises(ConfigError, match="must be <= 20000"):
        configs.apply_overrides(EGG, ["length=20001"])
    assert configs.from_dict(configs.to_dict(LLM)) == LLM
    assert configs.from_dict(dataclasses.asdict(configs.get_config("cartpole"))).KIND == "rl"  # pre-kind files


def test_sigterm_checkpoints_like_ctrl_c(tmp_path):
    """A preempted job (SIGTERM) saves its last completed generation, restores the previous handler, resumes."""
    import os
    import signal

    def term_at_3(record):
        if record["generation"] >= 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    part = run.train(EGG, tmp_path / "run", progress=False, callback=term_at_3, log=lambda s: None)
    assert part.interrupted and part.state.generation == 4  # chunk=2: the chunk in flight completes
    assert run.list_checkpoints(tmp_path / "run")[-1].name == "gen_00000004"
    assert signal.getsignal(signal.SIGTERM) == before
    resumed = run.train(EGG, tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    full = run.train(EGG, tmp_path / "full", progress=False)
    _same_state(resumed.state, full.state)
