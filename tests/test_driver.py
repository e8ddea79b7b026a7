"""The training driver: exact resume, chunk independence, checkpoints that survive failures, logs and plots."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from esx import run
from esx_envs.rl import RLConfig

# One tiny config shared by the tests (make_setup is memoised on it: one compile per process).
TINY = RLConfig(name="tiny", env="CartPole-v1", seed=3, generations=8, population_size=16, rank=2, sigma=0.2,
                   width=8, depth=1, layer_norm=False, max_steps=40, obs_norm=True, chunk=2, eval_every=4,
                   eval_episodes=4, final_eval_episodes=4, checkpoint_every=2)


def leaves(state: run.RunState) -> list[np.ndarray]:
    return run.checkpoint._to_host(state)


def assert_identical(a: run.RunState, b: run.RunState) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return run.train(TINY, run_dir, progress=False, tensorboard=True)


def read_tensorboard(run_dir: Path) -> tuple[dict, int]:
    """``({tag: {step: value}}, number of scalar events)`` of ``run_dir/tensorboard``, files in name order with
    TensorBoard's purge rule (a SessionLog START at step s drops the earlier files' events at steps >= s)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars, count = {}, 0
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for by_step in scalars.values():
                    for step in [st for st in by_step if st >= event.step]:
                        del by_step[step]
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
                count += 1
    return scalars, count


def _interrupt_at(generation):
    def callback(record):
        if record["generation"] >= generation:
            raise KeyboardInterrupt

    return callback


def test_resume_is_bit_identical(full_run, tmp_path):
    run_dir = tmp_path / "run"
    part = run.train(TINY, run_dir, progress=False, callback=_interrupt_at(4), log=lambda s: None)
    assert part.interrupted and part.state.generation == 4
    assert run.list_checkpoints(run_dir)[-1].name == "gen_00000004"
    resumed = run.train(TINY, run_dir, resume=True, progress=False, log=lambda s: None)
    assert resumed.state.generation == 8 and not resumed.interrupted
    assert_identical(resumed.state, full_run.state)
    assert float(resumed.state.carry.count) > 0  # observation statistics are part of the compared state
    # the metrics log holds each generation once, as the uninterrupted run's
    recs = [r for r in run.read_metrics(run_dir) if r["kind"] == "train"]
    full = [r for r in run.read_metrics(full_run.run_dir) if r["kind"] == "train"]
    assert [r["generation"] for r in recs] == list(range(1, 9))
    assert [r["return_mean"] for r in recs] == [r["return_mean"] for r in full]
    assert [r["generation"] for r in run.read_metrics(run_dir) if r["kind"] == "final"] == [8]


def test_tensorboard_scalars_match_metrics_and_resume_purges(full_run, tmp_path):
    scalars, count = read_tensorboard(full_run.run_dir)
    recs = run.read_metrics(full_run.run_dir)
    for r in recs:  # every numeric field of every record (but wall_time), as float32, at its generation
        for k, v in r.items():
            if k not in run.records._NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool):
                assert scalars[f"{r['kind']}/{k}"][r["generation"]] == np.float32(v), (r["kind"], k)
    assert sorted(scalars["train/return_mean"]) == list(range(1, 9)) and "train/wall_time" not in scalars
    assert sorted(scalars["eval/eval_return_mean"]) == [4, 8] and sorted(scalars["final/eval_return_mean"]) == [8]
    # A crash after generation 8 was logged but before its checkpoint: the resume restarts at 6, and the new
    # event file's purge step hides the first segment's 7 and 8.
    run_dir = tmp_path / "run"
    shutil.copytree(full_run.run_dir, run_dir)
    shutil.rmtree(run.list_checkpoints(run_dir)[-1])
    resumed = run.train(TINY, run_dir, resume=True, progress=False, tensorboard=True, log=lambda s: None)
    assert_identical(resumed.state, full_run.state)
    again, count_again = read_tensorboard(run_dir)
    assert again == scalars
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert count_again > count  # generations 7 and 8 were written twice; the purge is what makes them equal
    with pytest.raises(ValueError, match="run_dir"):
        run.train(TINY, None, progress=False, tensorboard=True)


def test_chunk_boundaries_do_not_change_results(full_run):
    setup = run.make_setup(TINY)
    state = setup.initial_state()
    means = []
    for length in (1, 2, 1, 2, 2):  # boundaries unlike the full run's (2, 2, 2, 2)
        state, metrics = setup.run_chunk(state, length)
        means += [float(x) for x in metrics.fitness_mean]
    assert_identical(state, full_run.state)
    full = [r["return_mean"] for r in run.read_metrics(full_run.run_dir) if r["kind"] == "train"]
    assert means == full


def test_run_dir_contents(full_run):
    run_dir = full_run.run_dir
    for name in ("metrics.jsonl", "metrics.csv", "learning_curve.png", "config.json", "summary.json", "run.json"):
        assert (run_dir / name).exists(), name
    recs = run.read_metrics(run_dir)
    assert [r["generation"] for r in recs if r["kind"] == "eval"] == [4, 8]
    finals = [r for r in recs if r["kind"] == "final"]  # the end-of-run evaluation is logged too, once
    assert len(finals) == 1 and finals[0]["generation"] == 8
    assert finals[0]["eval_return_mean"] == pytest.approx(full_run.final_score)
    csv = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("generation,return_mean") and len(csv) == 9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["generation"] == 8 and summary["final_eval_return_mean"] == pytest.approx(
        full_run.final_score)
    assert (run_dir / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the config travels with the checkpoint and matches config.json
    meta = json.loads((run.list_checkpoints(run_dir)[-1] / "meta.json").read_text())
    assert meta["config"] == {"kind": "rl", **dataclasses.asdict(TINY)} == json.loads(
        (run_dir / "config.json").read_text())
    assert len(run.list_checkpoints(run_dir)) == 2  # the newest two are kept


def test_checkpoint_round_trip(full_run):
    path = run.list_checkpoints(full_run.run_dir)[-1]
    state, meta = run.load_checkpoint(path, run.make_setup(TINY).initial_state())
    assert meta["generation"] == 8
    assert_identical(state, full_run.state)


def test_failed_write_keeps_previous_checkpoint(full_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run.run_dir, run_dir)
    before = [p.name for p in run.list_checkpoints(run_dir)]
    import orbax.checkpoint as ocp

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", broken_save)
    newer = full_run.state.es.replace(generation=full_run.state.es.generation + 2)
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint(run_dir, dataclasses.replace(full_run.state, es=newer), TINY, "x")
    assert [p.name for p in run.list_checkpoints(run_dir)] == before
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def _corrupt(ckpt: Path) -> None:
    """Truncates every data file of the orbax folder (as a kill during a copy would)."""
    for root, _, files in os.walk(ckpt / "state"):
        for f in files:
            p = Path(root) / f
            if p.stat().st_size > 0 and "METADATA" not in f:
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_corrupt_checkpoint_is_an_error_and_previous_survives(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run.run_dir, run_dir)
    previous, newest = run.list_checkpoints(run_dir)
    _corrupt(newest)
    with pytest.raises(run.CheckpointError, match=r"(corrupt|unreadable).*previous checkpoint .*gen_00000006"):
        run.train(TINY, run_dir, resume=True, progress=False)
    assert previous.exists()
    state, _ = run.load_checkpoint(previous, run.make_setup(TINY).initial_state())
    assert state.generation == 6
    # flipped bytes that orbax itself would accept are caught by the sha256
    run2 = tmp_path / "run2"
    shutil.copytree(full_run.run_dir, run2)
    meta_path = run.list_checkpoints(run2)[-1] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(run.CheckpointError, match="corrupt"):
        run.load_run(run2)


def test_resume_with_other_config_or_other_run_is_refused(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run.run_dir, run_dir)
    with pytest.raises(run.CheckpointError, match=r"different config \(sigma: checkpoint 0.2 vs now 0.5\)"):
        run.train(dataclasses.replace(TINY, sigma=0.5), run_dir, resume=True, progress=False)
    # run-control fields may change (here: train longer)
    # checkpoints copied from another run into this run directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    shutil.copytree(run_dir / "checkpoints", other / "checkpoints")
    with pytest.raises(run.CheckpointError, match="belongs to another run"):
        run.train(TINY, other, resume=True, progress=False)
    with pytest.raises(run.CheckpointError, match="nothing to resume"):
        run.train(TINY, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run.train(TINY, run_dir, progress=False)


def test_import_esx_stays_light():
    import subprocess
    import sys

    code = ("import sys, esx, esx.run; "
            "bad = [m for m in ('orbax', 'tqdm', 'matplotlib', 'gymnax') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_short_cartpole_run_beats_random():
    """A short CartPole run of the default config: the greedy return ends far above the initial policy's."""
    from esx_envs.configs import CONFIGS

    cfg = dataclasses.replace(CONFIGS["cartpole"], generations=60, target_return=None, eval_every=10,
                              final_eval_episodes=32, checkpoint_every=0)
    setup = run.make_setup(cfg)
    state = setup.initial_state()
    initial = float(setup.parts.evaluator(state.es.params, run.eval_key(state), state.carry).mean())
    result = run.train(cfg, None, progress=False)
    assert initial < 50
    assert result.final_score > 200


@pytest.mark.slow
def test_notebook_runs_at_small_settings(tmp_path):
    """notebooks/rl_cartpole.ipynb executes end to end (ESX_NOTEBOOK_SMALL=1: a few generations)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = Path(__file__).parent.parent / "notebooks" / "rl_cartpole.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["ESX_NOTEBOOK_SMALL"] = "1"
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["ESX_NOTEBOOK_SMALL"]
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "greedy return over 4 episodes" in outputs and "evaluate_run" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_sharded_driver_matches_one_device_and_resumes_across_device_counts(tmp_path):
    """devices=4 ends equal to devices=1 (to float rounding: the sharded program is compiled differently, at
    XLA's default optimisation level); a run saved on 4 devices resumes on 1 and back to the same state."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    worker = Path(__file__).with_name("_driver_devices_worker.py")
    out = subprocess.run([sys.executable, str(worker), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["moved"], res
    assert res["four_rel"] <= 1e-5 and res["mixed_rel"] <= 1e-5, res
    assert res["num_int_leaves"] >= 2 and all(res["ints_equal"].values()), res   # generation, key: exactly
    assert res["generation"] == 6
    assert res["reduce_rel"] <= 1e-5, res
    assert "not divisible by 3 devices" in res["indivisible"], res


def test_bad_device_settings_are_config_errors():
    from esx.run import ConfigError

    with pytest.raises(ConfigError, match=r"device\(s\) are available"):
        run.make_setup(dataclasses.replace(TINY, devices=jax.device_count() + 1))
    with pytest.raises(ConfigError, match="placement"):
        run.make_setup(dataclasses.replace(TINY, placement="scatter"))


@pytest.mark.parametrize("where", ["records", "evaluation"])
def test_an_interrupt_while_a_chunk_is_logged_resumes_exactly(full_run, tmp_path, monkeypatch, where):
    """Ctrl-C can land after a chunk has run but before its records, evaluation and checkpoint are written (here:
    after the first train record of generations 3-4, or inside the evaluation at 4). The interrupted run saves the
    last state whose records are complete (generation 2); the resume drops the partial records, runs the chunk
    again and ends bit-identical to the uninterrupted run, each generation logged once."""
    import esx.run.loop as loop

    original, fired = loop._train_records, []

    def records_then_interrupt(setup, m, n, *args):
        for rec in original(setup, m, n, *args):
            yield rec
            if where == "records" and rec["generation"] == 3 and not fired:
                fired.append(3)
                raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_train_records", records_then_interrupt)
    setup = run.make_setup(TINY)
    evaluate = setup.evaluate

    def evaluate_then_interrupt(state, final):
        out = evaluate(state, final)
        if where == "evaluation" and state.generation == 4 and not final and not fired:
            fired.append(4)
            raise KeyboardInterrupt
        return out

    setup = dataclasses.replace(setup, evaluate=evaluate_then_interrupt)
    run_dir = tmp_path / "run"
    part = run.train(setup, run_dir, progress=False, log=lambda s: None)
    assert fired and part.interrupted and part.state.generation == 2
    assert run.list_checkpoints(run_dir)[-1].name == "gen_00000002"
    resumed = run.train(TINY, run_dir, resume=True, progress=False, log=lambda s: None)
    assert_identical(resumed.state, full_run.state)
    recs = run.read_metrics(run_dir)
    full = run.read_metrics(full_run.run_dir)
    for kind in ("train", "eval", "final"):
        mine, theirs = ([r for r in rs if r["kind"] == kind] for rs in (recs, full))
        assert [r["generation"] for r in mine] == [r["generation"] for r in theirs], kind
    assert [r["return_mean"] for r in recs if r["kind"] == "train"] == [
        r["return_mean"] for r in full if r["kind"] == "train"]
