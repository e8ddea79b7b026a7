"""Nothing of orbax outlives a checkpoint read or write: a corrupt checkpoint ends ``esx train --resume`` with one
line on stderr and exit status 2, every time; an interrupted save leaves no error, thread or temporary folder.

Orbax reads a checkpoint's arrays as concurrent tensorstore reads inside an asyncio event loop that it closes as
soon as the first read fails; the other reads finished later and posted to the closed loop, so about 1 run in 3
printed ``RuntimeError: Event loop is closed`` tracebacks after (or into) the message. A save commits in background
threads that a Ctrl-C left writing into the temporary folder being removed. ``esx.run.checkpoint`` now drains
orbax's loops before they close and waits for its threads (``_orbax_io``); these tests run the failing resume
many times and interrupt saves at several points.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

OVERRIDES = ["generations=2", "population_size=16", "eval_episodes=2", "final_eval_episodes=2", "checkpoint_every=1"]
RUNS_TRUNCATED = 18      # the orbax failure path (reads fail while their siblings are in flight)
RUNS_GARBLED = 2         # orbax reads garbage, the sha256 check fails


def _newest_data_files(run_dir: Path) -> list[Path]:
    from esx import run

    newest = run.list_checkpoints(run_dir)[-1]
    return sorted(p for p in (newest / "state").rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.fixture(scope="module")
def corrupt_runs(tmp_path_factory):
    """``{"good", "truncated", "garbled"}`` run directories of one tiny cartpole run with two checkpoints; the newest
    checkpoint of ``truncated`` has every orbax data file cut to 10 bytes, that of ``garbled`` one byte flipped."""
    from esx import run
    from esx.run import apply_overrides
    from esx_envs import configs

    root = tmp_path_factory.mktemp("clean_exit")
    good = root / "good"
    config = apply_overrides(configs.get_config("cartpole"), OVERRIDES)
    run.train(config, good, progress=False, log=lambda msg: None)
    assert len(run.list_checkpoints(good)) == 2
    dirs = {"good": good}
    for kind in ("truncated", "garbled"):
        d = root / kind
        shutil.copytree(good, d)
        files = _newest_data_files(d)
        assert files
        if kind == "truncated":
            for f in files:
                os.truncate(f, 10)
        else:
            f = max(files, key=lambda p: p.stat().st_size)
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        dirs[kind] = d
    return dirs


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "esx_envs.cli", "train", "cartpole", *OVERRIDES, "--run-dir", str(run_dir),
           "--resume", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=run_dir.parent,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_resume_from_a_corrupt_checkpoint_prints_one_line_and_exits_2(corrupt_runs):
    jobs = [corrupt_runs["truncated"]] * RUNS_TRUNCATED + [corrupt_runs["garbled"]] * RUNS_GARBLED
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_resume, jobs))
    bad = []
    for run_dir, out in zip(jobs, results):
        lines = out.stderr.splitlines()
        clean = (out.returncode == 2 and len(lines) == 1 and lines[0].startswith("esx train: error: checkpoint ")
                 and "previous checkpoint" in lines[0] and "Traceback" not in out.stderr
                 and "Event loop is closed" not in out.stderr)
        if not clean:
            bad.append(f"{run_dir.name}: exit {out.returncode}, stderr:\n{out.stderr}")
    assert not bad, (f"{len(bad)} of {len(jobs)} runs did not end cleanly "
                     f"({time.perf_counter() - t0:.0f} s):\n" + "\n".join(bad[:3]))
    kinds = {d.name: out.stderr for d, out in zip(jobs, results)}
    assert "is unreadable" in kinds["truncated"]                  # the orbax failure path was exercised
    from esx import run

    assert len(run.list_checkpoints(corrupt_runs["truncated"])) == 2   # nothing deleted


def test_failed_restore_leaves_nothing_running(corrupt_runs, capfd, monkeypatch):
    """In one process: a failed restore puts the event loop policy back, leaves no thread behind and nothing is
    posted to a closed loop afterwards (tensorstore reports that as an unraisable exception); an intact checkpoint
    still loads."""
    from esx import run
    from esx.run import apply_overrides
    from esx_envs import configs

    setup = run.make_setup(apply_overrides(configs.get_config("cartpole"), OVERRIDES))
    template = setup.initial_state()
    policy = asyncio.get_event_loop_policy()
    threads = set(threading.enumerate())
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    monkeypatch.setattr(threading, "excepthook", lambda a: unraisable.append(f"{a.exc_type.__name__}: {a.exc_value}"))
    capfd.readouterr()
    for _ in range(5):
        newest = run.list_checkpoints(corrupt_runs["truncated"])[-1]
        with pytest.raises(run.CheckpointError, match="is unreadable"):
            run.load_checkpoint(newest, template)
    time.sleep(0.5)                                     # late tensorstore callbacks would land here
    assert not unraisable, unraisable
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err, err
    assert asyncio.get_event_loop_policy() is policy
    assert set(threading.enumerate()) <= threads
    state, meta = run.load_checkpoint(run.list_checkpoints(corrupt_runs["good"])[-1], template)
    assert state.generation == meta["generation"] == 2
    assert asyncio.get_event_loop_policy() is policy


# Ctrl-C at several points of a save (fractions of an uninterrupted save's time), in a child process: orbax's
# background commit threads used to go on writing into the temporary folder being removed (ERROR logs, "Event loop
# is closed", a stale ``.tmp-gen_*`` folder left behind).
INTERRUPTED_SAVES = """import os, signal, sys, threading, time, traceback
import jax, jax.numpy as jnp, numpy as np
from esx.run import RunState, save_checkpoint
from esx.run.config import RunConfig


@jax.tree_util.register_pytree_node_class
class Es:
    def __init__(self, generation, arrays):
        self.generation, self.arrays = generation, arrays
    def tree_flatten(self):
        return (self.generation, self.arrays), None
    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


run_dir = sys.argv[1]
# Python leaves SIGINT ignored when its parent ignored it (a job started in the background by a script does):
# install the KeyboardInterrupt handler explicitly, as an interactive terminal's Python has it
signal.signal(signal.SIGINT, signal.default_int_handler)
rng = np.random.default_rng(0)
arrays = [rng.standard_normal((2000, 2000)).astype(np.float32) for _ in range(6)]
state = lambda g: RunState(Es(jnp.int32(g), arrays), None, jax.random.key(0))
save_checkpoint(run_dir, state(1), RunConfig(), "run")   # cold (imports, first orbax use): not timed
times = []
for g in (2, 3):
    t0 = time.perf_counter()
    save_checkpoint(run_dir, state(g), RunConfig(), "run")
    times.append(time.perf_counter() - t0)
took = min(times)
interrupted, attempts, landed = 0, 0, []
while interrupted < 3 and attempts < 15:   # until three SIGINTs landed inside a save (timing varies with load)
    frac = (0.1, 0.2, 0.3, 0.4, 0.5)[attempts % 5]
    timer = threading.Timer(frac * took, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        save_checkpoint(run_dir, state(4 + attempts), RunConfig(), "run")
        time.sleep(took)
    except KeyboardInterrupt as e:   # count only the interrupts that landed inside a save
        names = [f.name for f in traceback.extract_tb(e.__traceback__)]
        interrupted += "save_checkpoint" in names
        landed.append(names[-1])
    timer.join()
    attempts += 1
left = [p.name for p in (os.scandir(os.path.join(run_dir, "checkpoints"))) if p.name.startswith(".tmp")]
alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
print(f"took {took:.2f} s; landed in {landed}; interrupted {interrupted} of {attempts}; tmp left {left}; "
      f"threads {alive}")
"""


def test_interrupted_saves_leave_no_temporary_folder_thread_or_error(tmp_path):
    script = tmp_path / "interrupted_saves.py"
    script.write_text(INTERRUPTED_SAVES)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr and "Event loop is closed" not in out.stderr, \
        out.stderr
    assert "tmp left []; threads []" in out.stdout, out.stdout
    inside = int(re.search(r"interrupted (\d+) of", out.stdout).group(1))
    assert inside >= 3, out.stdout       # three SIGINTs landed inside a save, and none left a trace
