"""Golden runs: the final state of short fixed-seed runs is bit-identical across refactors.

The digests below were recorded on the code before the engine/application split (d4a7a22, jax 0.10, CPU) by
``python tests/_golden_runs.py`` (and, for ``sharded``, with 4 host devices). A change that alters a number of any
of these runs must say which stream changed and why, in the same commit that updates the digest.

``tests/data/run_v0_cartpole`` is a run directory written by that code (format version 0: no ``format`` field in
``meta.json``); today's code must resume it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _golden_runs as golden  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: digests by JAX minor version (the XLA:CPU numerics of other versions may differ in the last bit).
DIGESTS = {
    "0.10": {
        "step_eggroll": "e9bc38b675090acd5d34dd75bdae88ad7a04eb8b41cab0e1ef91e35517a94a48",
        # z_score's mean / variance via shaping.reproducible_sum and the fitness through an optimization barrier
        # (#23 item 1, sharded bit-identity): 1.9e-7 relative; was d778f0f018b8a1107636d585a56ba8284763513ee20d4450a70b89372b5eb5e6
        "step_open_es": "f01e0ee57ee896ac7654ba29affebb1b990fd8c32bc67d4fdde43b6316b96183",
        "step_int": "5f56392943bbe12050c1a18bfef73c7edc8adb475280995a97027ee427d979b6",
        "train_cartpole": "726e99fc84b4948ef7bb072f4f158dffbe8ea831042bdc48f2fb41a23b5b745a",
        "train_egg": "f03c14bfa798c9087084e4253bbce02fbbab5afe0779ef5c70eccba430e22925",
        "train_llm": "f63c532e6ecf46c88414933c22312aeef8e9d9d03e607a005534e2aebebc8912",
        "sharded": "57f9769f527bb1f0d04ec03462d0bd568949aa1d4dbfe5ac15cb492c3d8fe8fd",
    },
}
#: the state of tests/data/run_v0_cartpole's checkpoint (generation 4), any JAX version (it is read, not computed)
V0_CHECKPOINT = "1d2f83788fae5974e105a89ec211b664f8e8aa3598f024288fcf430c8ba4612b"

VERSION = ".".join(jax.__version__.split(".")[:2])
needs_digests = pytest.mark.skipif(VERSION not in DIGESTS, reason=f"no golden digests recorded for jax {VERSION}")


@needs_digests
@pytest.mark.parametrize("case", [c for c in golden.CASES if c != "sharded"])
def test_golden_run(case):
    assert golden.CASES[case]() == DIGESTS[VERSION][case]


@needs_digests
def test_golden_sharded_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_golden_runs.py"), "sharded"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == '{"sharded": "%s"}' % DIGESTS[VERSION]["sharded"]


def test_checkpoint_from_before_the_split_resumes(tmp_path):
    """A run directory written by the code before the redesign resumes, and continues exactly like a fresh run."""
    from esx import run
    from esx_envs import configs

    old = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "run_v0_cartpole", old)
    config = configs.from_dict(json.loads((old / "config.json").read_text()))
    setup = run.make_setup(config)
    state, meta = run.restore_run(old, setup, None)
    assert "format" not in meta  # written before format versions existed
    assert state.generation == 4 and golden.digest(state) == V0_CHECKPOINT
    longer = configs.apply_overrides(config, dict(generations=6))
    resumed = run.train(longer, old, resume=True, progress=False, log=lambda s: None)
    fresh = run.train(longer, tmp_path / "fresh", progress=False, log=lambda s: None)
    assert resumed.state.generation == 6
    assert golden.digest(resumed.state) == golden.digest(fresh.state)
