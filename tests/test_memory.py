"""The memory model of member batching (esx.memory_estimate, docs/hyperscale.md "Memory model") and the runner's
``member_batch`` / ``memory_budget`` fields: the estimate predicts XLA's accounting of an unseen batch size, picks
a valid batch for a budget, refuses an impossible one, and ``member_batch=auto`` trains and records its choice."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import int_eggroll as ie
from esx import run

N = 128
X = jnp.ones((16, 8))


def mlp(key, d=8, h=32, o=4):
    k1, k2 = jax.random.split(key)
    return {"l1": {"w": jax.random.normal(k1, (d, h)) * 0.3, "b": jnp.zeros(h)},
            "l2": {"w": jax.random.normal(k2, (h, o)) * 0.3, "b": jnp.zeros(o)}}


def fitness(p, key, x):
    h = jnp.tanh(esx.dense(x, p["l1"]["w"]) + esx.value(p["l1"]["b"]))
    y = esx.dense(h, p["l2"]["w"]) + esx.value(p["l2"]["b"])
    return -jnp.mean((y - 1.0) ** 2)


PARAMS = mlp(jax.random.key(1))
STRATEGY = esx.eggroll(population_size=N, rank=2, sigma=0.1, optimizer=optax.adam(0.01), noise_source="hash")


@pytest.fixture(scope="module")
def estimate():
    """The estimate as the runner makes it: ``fitness_task`` with ``member_batch='auto'`` calls
    ``esx.memory_estimate`` on the state's shapes (a budget this large keeps the unbatched program)."""
    config = run.RunConfig(member_batch="auto", memory_budget="1TiB")
    task = run.fitness_task(config, STRATEGY, PARAMS, fitness, X)
    assert task.member_batch is None and task.memory.budget_bytes == 1 << 40
    return task.memory.estimate


def compiled_bytes(k):
    """XLA's accounting of member_batch=k: (evaluate's temporaries, the whole step's peak)."""
    s = esx.with_member_batch(STRATEGY, k)
    state = s.init(jax.random.key(0), PARAMS)
    ev = jax.jit(lambda st, key, x: s.evaluate(st, fitness, key, x)).lower(state, jax.random.key(2), X).compile()
    m = esx.step.lower(s, state, fitness, jax.random.key(3), X).compile().memory_analysis()
    return (ev.memory_analysis().temp_size_in_bytes,
            m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def test_estimate_is_a_line_fitted_to_xla_and_predicts_an_unseen_batch(estimate):
    # compiled: K = 32, 64 (the fit) and N (unbatched, measured)
    assert [k for k, *_ in estimate.samples] == [32, 64, N]
    (k1, e1, _), (k2, e2, _), _ = estimate.samples
    assert estimate.eval_bytes_per_member == (e2 - e1) / (k2 - k1) > 1000     # ~4 KiB of activations per member
    for k, e in ((k1, e1), (k2, e2)):   # the line goes through its two samples
        assert estimate.eval_bytes(k) == pytest.approx(e, abs=1)
    # linear in K
    peaks = [estimate.peak_bytes(k) for k in (8, 16, 32)]
    assert peaks[2] - peaks[1] == pytest.approx(2 * (peaks[1] - peaks[0]), abs=2)
    # an unseen K: evaluate's temporaries and the whole esx.step's peak within 10% (measured: 5% and 3% over)
    ev_temp, step_peak = compiled_bytes(16)
    assert estimate.eval_bytes(16) == pytest.approx(ev_temp, rel=0.10)
    assert estimate.peak_bytes(16) == pytest.approx(step_peak, rel=0.10)
    # the unbatched peak is measured, not extrapolated
    assert estimate.peak_bytes(None) == estimate.unbatched_bytes == estimate.peak_bytes(N)


def test_batch_for_picks_the_largest_valid_batch_that_fits(estimate):
    assert estimate.valid == (2, 4, 8, 16, 32, 64, 128)                      # even divisors of N
    assert estimate.batch_for(estimate.peak_bytes(None)) is None              # unbatched fits: nothing to gain
    between = (estimate.peak_bytes(16) + estimate.peak_bytes(32)) // 2
    assert estimate.batch_for(between) == 16
    assert estimate.batch_for(estimate.peak_bytes(32)) == 32
    assert estimate.batch_for(10**12, choices=[4, 8]) == 8                    # N not among the choices
    with pytest.raises(ValueError, match=r"below the predicted peak .* smallest member_batch=2"):
        estimate.batch_for(estimate.peak_bytes(2) - 1)
    with pytest.raises(ValueError, match="valid values: 2, 4, 8"):
        estimate.batch_for(10**12, choices=[3, 5])
    assert "predicted peak" in estimate.describe(16, between) and "member_batch=16" in estimate.describe(16)
    summary = json.loads(json.dumps(estimate.summary(16, between)))
    assert summary["member_batch"] == 16 and summary["predicted_peak_bytes"] == estimate.peak_bytes(16)


def test_with_member_batch_rebuilds_the_same_strategy():
    s = esx.with_member_batch(STRATEGY, 16)
    assert s.config.member_batch == 16 and STRATEGY.config.member_batch is None
    same = {f: getattr(s.config, f) for f in ("population_size", "rank", "lowrank", "antithetic", "group_size",
                                               "noise_source", "shaping", "optimizer", "sigma")}
    assert same == {f: getattr(STRATEGY.config, f) for f in same}
    with pytest.raises(ValueError, match="valid values: 2, 4, 8, 16, 32, 64, 128"):
        esx.with_member_batch(STRATEGY, 6)
    i = esx.with_member_batch(ie.int_eggroll(population_size=8, sigma_shift=3, alpha=0.3, group_size=4), 4)
    assert (i.config.member_batch, i.config.sigma_shift, i.config.alpha, i.config.group_size) == (4, 3, 0.3, 4)
    with pytest.raises(TypeError, match="rebuild"):
        esx.with_member_batch(STRATEGY._replace(config=object()), 4)


def test_integer_strategy_estimate():
    params = {"w": jnp.zeros((8, 16), jnp.int8), "b": jnp.zeros((16,), jnp.int8)}

    def int_fitness(view, key, data):
        y = ie.int_dense(data, view["w"]) + ie.int_value(view["b"]).astype(jnp.int32)
        return -jnp.sum(jnp.abs(y - 20))

    s = ie.int_eggroll(population_size=64, sigma_shift=2)
    state = jax.eval_shape(s.init, jax.random.key(0), params)                # shapes are enough
    est = esx.memory_estimate(s, state, int_fitness, jax.random.key(1), jnp.full((16, 8), 16, jnp.int8),
                              unbatched=False)
    assert est.unbatched_bytes is None and [k for k, *_ in est.samples] == [16, 32]
    assert est.fixed_bytes > 2 * 65536          # the int8 normal table is in the state and in the new state
    assert est.batch_for(est.peak_bytes(16)) == 16


def test_config_fields_parse_and_validate():
    from esx_envs import configs

    cart = configs.get_config("cartpole")
    assert configs.apply_overrides(cart, ["member_batch=auto"]).member_batch == "auto"
    assert configs.apply_overrides(cart, ["member_batch=16", "memory_budget=2GiB"]).memory_budget_bytes == 1 << 31
    assert configs.apply_overrides(cart, ["member_batch=none"]).member_batch is None
    with pytest.raises(run.ConfigError, match=r"member_batch=6; .*valid values: 2, 4, 8, 16, 32, 64, 128, 256"):
        configs.apply_overrides(cart, ["member_batch=6"])
    with pytest.raises(run.ConfigError, match="'auto'"):
        configs.apply_overrides(cart, ["member_batch=fast"])
    with pytest.raises(run.ConfigError, match="memory_budget='2 lots'"):
        configs.apply_overrides(cart, ["memory_budget=2 lots"])
    assert run.RunConfig().memory_budget_bytes > 0                          # half of what is available
    assert "member_batch" in run.RunConfig.RUN_CONTROL and "memory_budget" in run.RunConfig.RUN_CONTROL


def test_auto_member_batch_trains_and_records_its_choice(tmp_path, estimate, monkeypatch):
    """A run written unbatched resumes with member_batch='auto' (a run-control field): the budget picks 16, the
    runner prints and records the estimate, and the update moves by float summation order only."""
    config = run.RunConfig(generations=6, chunk=2, eval_every=2, checkpoint_every=2)
    fresh = run.train(run.fitness_task(config, STRATEGY, PARAMS, fitness, X), tmp_path / "run", progress=False,
                      log=lambda s: None)
    newest = run.list_checkpoints(tmp_path / "run")[-1]
    assert newest.name.endswith("6")
    shutil.rmtree(newest)                    # as if the unbatched run had stopped after generation 4
    monkeypatch.setattr(esx, "memory_estimate", lambda *args, **kwargs: estimate)   # (the fixture compiled it)
    budget = (estimate.peak_bytes(16) + estimate.peak_bytes(32)) // 2         # fits 16, not 32
    task = run.fitness_task(config.replace(member_batch="auto", memory_budget=budget), STRATEGY, PARAMS, fitness, X)
    assert task.member_batch == 16 == task.strategy.config.member_batch
    lines = []
    resumed = run.train(task, tmp_path / "run", resume=True, progress=False, log=lines.append)
    assert lines[0] == "resumed %s at generation 4" % (tmp_path / "run") and resumed.state.generation == 6
    assert any(line.startswith("member_batch=auto: memory:") and "member_batch=16" in line for line in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["member_batch"] == 16
    mem = summary["memory"]
    assert mem["member_batch"] == 16 and mem["budget_bytes"] == budget
    assert mem["predicted_peak_bytes"] == estimate.peak_bytes(16) <= budget
    assert mem["eval_bytes_per_member"] == estimate.eval_bytes_per_member
    assert json.loads((tmp_path / "run" / "config.json").read_text())["member_batch"] == "auto"
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state.es), jax.tree_util.tree_leaves(fresh.state.es)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        else:   # generation, counters, keys: exact
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_member_batch_refuses_an_impossible_budget(monkeypatch, estimate):
    monkeypatch.setattr(esx, "memory_estimate", lambda *args, **kwargs: estimate)   # (the fixture compiled it)
    config = run.RunConfig(member_batch="auto", memory_budget=estimate.fixed_bytes)
    with pytest.raises(run.ConfigError, match="member_batch='auto': memory budget .* smallest member_batch=2"):
        run.fitness_task(config, STRATEGY, PARAMS, fitness, X)
