"""Your own task through the runner (esx.run): the README's custom-fitness example, exact resume, and a
third-party task kind added to ``esx train`` through the ``esx.tasks`` entry points without touching esx."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import run

ROOT = Path(__file__).resolve().parents[1]
X = jnp.ones((4, 3))


def fitness(p, key, data):
    y = esx.dense(data, p["w"]) + esx.value(p["b"])
    return -jnp.sum((y - 1.0) ** 2)


STRATEGY = esx.eggroll(population_size=64, rank=2, sigma=0.1, optimizer=optax.adam(0.05))
PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}


def _task(generations=60, **kw):
    config = run.RunConfig(name="quickstart", generations=generations, eval_every=20, chunk=10, checkpoint_every=20,
                           **kw)
    return run.fitness_task(config, STRATEGY, PARAMS, fitness, X)


def test_custom_fitness_trains_logs_and_reaches_the_optimum(tmp_path):
    result = run.train(_task(), tmp_path / "q", progress=False)
    # the quickstart's optimum is 0; the plain-array evaluation of the trained parameters is close to it
    assert result.final_score > -1e-2 and result.final["fitness"] == result.final_score
    records = run.read_metrics(tmp_path / "q")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["generation"] for r in evals] == [0, 20, 40, 60] and evals[0]["fitness"] == pytest.approx(-8.0)  # 4x2 outputs at 0, target 1
    assert evals[-1]["fitness"] > evals[0]["fitness"] + 7.9
    for name in ("metrics.jsonl", "metrics.csv", "learning_curve.png", "config.json", "summary.json"):
        assert (tmp_path / "q" / name).exists()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["kind"] == "custom"
    # the same trajectory as esx.step driven by hand with the run's key streams (equal to float rounding: the
    # runner fuses a chunk of generations into one XLA loop, which may round the last bit differently)
    state = STRATEGY.init(esx.noise.stream_key(jax.random.key(0), "noise"), PARAMS)
    for g in range(60):
        state, _ = esx.step(STRATEGY, state, fitness, esx.noise.stream_key(jax.random.key(0), "data", g), X)
    np.testing.assert_allclose(state.params["w"], result.state.es.params["w"], rtol=1e-4, atol=1e-6)


def test_custom_fitness_resumes_exactly(tmp_path):
    full = run.train(_task(), tmp_path / "full", progress=False)

    def stop(record):
        if record["generation"] >= 30:
            raise KeyboardInterrupt

    part = run.train(_task(), tmp_path / "part", progress=False, callback=stop, log=lambda s: None)
    assert part.interrupted and part.state.generation == 30
    resumed = run.train(_task(), tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert resumed.state.generation == 60
    for a, b in zip(jax.tree_util.tree_leaves(full.state.es), jax.tree_util.tree_leaves(resumed.state.es)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    # a different core config is refused on resume, naming the field
    with pytest.raises(run.CheckpointError, match="seed"):
        run.train(_task(seed=1), tmp_path / "part", resume=True, progress=False)
    # load_run needs the setup of an unregistered task, and says so
    with pytest.raises(run.ConfigError, match="no task of kind 'custom'"):
        run.load_run(tmp_path / "part")
    _, state = run.load_run(tmp_path / "part", _task())
    assert state.generation == 60


def test_target_and_custom_evaluation(tmp_path):
    config = run.RunConfig(generations=200, eval_every=10, chunk=10, checkpoint_every=0)
    task = run.fitness_task(config, STRATEGY, PARAMS, fitness, X, score="loss", higher_is_better=False, target=0.5,
                            evaluate=lambda p, key: {"loss": -fitness(p, key, X), "w_norm": jnp.linalg.norm(p["w"])})
    result = run.train(task, None, progress=False)
    assert result.reached_target and result.state.generation < 200
    assert result.final["loss"] <= 0.5 and result.final["w_norm"] > 0


def test_bad_config_values_are_errors_at_construction():
    with pytest.raises(run.ConfigError, match="generations=0; must be >= 1"):
        run.RunConfig(generations=0)
    with pytest.raises(run.ConfigError, match="checkpoint_every=-1"):
        run.RunConfig(checkpoint_every=-1)


PLUGIN = '''
import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import optax

import esx
from esx import run


@dataclasses.dataclass(frozen=True)
class SphereConfig(run.RunConfig):
    KIND: ClassVar[str] = "sphere"
    dim: int = 5
    generations: int = 30

    def validate(self):
        super().validate()
        if self.dim < 1:
            raise run.ConfigError(f"dim={self.dim}; must be >= 1")

    def setup(self):
        strategy = esx.open_es(population_size=32, sigma=0.1, optimizer=optax.adam(0.1))
        return run.fitness_task(self, strategy, {"x": jnp.full(self.dim, 2.0)},
                                lambda p, key, data: -jnp.sum(esx.value(p["x"]) ** 2))
'''


def test_third_party_task_kind_through_entry_points(tmp_path):
    """A package that is not esx adds the kind ``sphere`` to ``esx train`` / ``esx eval`` by its entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sphere_task.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "sphere_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sphere-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[esx.tasks]\nsphere = sphere_task:SphereConfig\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def esx_cli(*args):
        return subprocess.run([sys.executable, "-m", "esx_envs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    out = esx_cli("train", "sphere", "dim=3", "--run-dir", "r", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["generation"] == 30 and summary["final_fitness"] > -12.0 * 0.5  # started at -12
    out = esx_cli("eval", "r")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"fitness {summary['final_fitness']:.4g}" in out.stdout
    out = esx_cli("train", "sphere", "dim=0")
    assert out.returncode == 2 and "dim=0; must be >= 1" in out.stderr and "Traceback" not in out.stderr
    out = esx_cli("train", "--help")
    assert "sphere fields (SphereConfig)" in out.stdout
