"""Population diagnostics of esx.Metrics (docs/hyperscale.md, "Diagnostics"): tie and flat-group fractions, the
effective sample size of the shaped weights, per-label update norms and the no-signal flag, against NumPy
references on hand-made fitness vectors; the runner logs them and its progress line flags a generation without
signal."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import int_eggroll as ie

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}          # one "lowrank" and one "full" leaf


_STRATEGIES: dict = {}


def strategy(n=8, **kw):
    """One strategy per configuration, with its gradient and apply jitted once (the cases share the compiles)."""
    key = (n, tuple(sorted(kw.items())))
    if key not in _STRATEGIES:
        kw.setdefault("noise_source", "hash")
        s = esx.eggroll(population_size=n, rank=2, sigma=0.1, optimizer=optax.sgd(0.1), **kw)
        _STRATEGIES[key] = s._replace(gradient=jax.jit(s.gradient), apply=jax.jit(s.apply))
    return _STRATEGIES[key]


def tell(s, fitness):
    """``tell`` in its two halves (the metrics and the gradient they describe)."""
    state = s.init(jax.random.key(0), PARAMS)
    grads = s.gradient(state, jnp.asarray(fitness))
    _, m = s.apply(state, grads, jnp.asarray(fitness))
    return m, grads


# ---------------------------------------------------------------------------------------------------------------
# NumPy references

def np_clean(f):
    f = np.asarray(f, np.float32)
    fin = np.isfinite(f)
    return np.where(fin, f, f[fin].min() if fin.any() else 0.0)


def np_centered_rank(f):
    f = np_clean(f)
    less = (f[None, :] < f[:, None]).sum(1)
    le = (f[None, :] <= f[:, None]).sum(1)
    return ((less + le - 1) / 2) / (len(f) - 1) - 0.5


def np_tie_fraction(f):
    f = np_clean(f)
    return np.mean([(f == x).sum() > 1 for x in f])


def np_flat(f, size):
    g = np_clean(f).reshape(-1, size)
    return np.mean([np.all(r == r[0]) for r in g])


def np_ess(w):
    w = np.abs(np.asarray(w, np.float64))
    return 0.0 if not w.any() else w.sum() ** 2 / (w ** 2).sum()


CASES = {
    "distinct": [0.1, 0.5, -0.3, 2.0, 1.0, 0.7, -1.0, 0.2],
    "ties": [1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 5.0, 3.0],
    "flat_pairs": [1.0, 1.0, 3.0, 3.0, 0.5, 0.5, 2.0, 7.0],
    "nonfinite": [np.nan, 0.0, 1.0, np.inf, 0.0, 2.0, -np.inf, 3.0],   # non-finite counts as the worst (0.0)
    "constant": [0.25] * 8,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagnostics_equal_numpy_reference_centered_rank(case):
    f = np.asarray(CASES[case], np.float32)
    m, _ = tell(strategy(), f)
    w = np_centered_rank(f)
    pair_w = w[0::2] - w[1::2]
    assert float(m.tie_fraction) == pytest.approx(np_tie_fraction(f))
    assert float(m.flat_group_fraction) == pytest.approx(np_flat(f, 2))      # group_size 1: antithetic pairs
    assert float(m.ess) == pytest.approx(np_ess(pair_w), rel=1e-6)
    assert bool(m.no_signal) == (not pair_w.any() or np_flat(f, 2) == 1.0)
    assert m.tie_fraction.dtype == m.ess.dtype == jnp.float32 and m.no_signal.dtype == jnp.bool_


def test_ess_of_raw_fitness_and_its_bounds():
    f = np.asarray(CASES["distinct"], np.float32)
    m, _ = tell(strategy(shaping="identity"), f)
    assert float(m.ess) == pytest.approx(np_ess(f[0::2] - f[1::2]), rel=1e-6)
    z = (f - f.mean()) / np.sqrt(f.var() + 1e-5)                      # z_score: the weights' pair differences
    m, _ = tell(strategy(shaping="z_score"), f)
    assert float(m.ess) == pytest.approx(np_ess(z[0::2] - z[1::2]), rel=1e-5)
    # every pair weight of one magnitude: ESS = the number of pairs; one decided pair: 1
    m, _ = tell(strategy(shaping="pair_sign"), np.array([1, 0, 0, 1, 5, 2, 0, 3], np.float32))
    assert float(m.ess) == 4.0 and not bool(m.no_signal)
    m, _ = tell(strategy(shaping="pair_sign"), np.array([1, 0, 2, 2, 5, 5, 3, 3], np.float32))
    assert float(m.ess) == 1.0 and float(m.flat_group_fraction) == 0.75


#: every shaping name esx resolves (esx.shaping.get), group_z_score with groups of 2
ALL_SHAPINGS = sorted([*esx.shaping.SHAPINGS, "group_z_score"])


def test_constant_fitness_carries_no_signal_for_every_shaping():
    for shaping in ALL_SHAPINGS:
        groups = {"group_size": 2} if shaping == "group_z_score" else {}
        m, grads = tell(strategy(shaping=shaping, **groups), np.full(8, 0.1, np.float32))
        assert bool(m.no_signal) and float(m.ess) == 0.0, shaping
        assert float(m.tie_fraction) == 1.0 and float(m.flat_group_fraction) == 1.0
        assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads))
        if shaping == "pair_sign":   # defined on antithetic pairs only
            continue
        # without antithetic pairs a shaping's rounding may leave tiny non-zero weights (z_score does): the flat
        # population still flags it
        m, _ = tell(strategy(shaping=shaping, antithetic=False, **groups), np.full(8, 0.1, np.float32))
        assert bool(m.no_signal) and float(m.flat_group_fraction) == 1.0, shaping


def test_groups_every_member_solves_or_fails():
    # groups of 4 (a prompt each): group 0 all solve, group 1 all fail, group 2 mixed, group 3 all 0.5
    f = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0, .5, .5, .5, .5], np.float32)
    m, _ = tell(strategy(16, group_size=4, shaping="group_z_score"), f)
    assert float(m.flat_group_fraction) == 0.75 and not bool(m.no_signal)
    assert float(m.tie_fraction) == 1.0
    flat = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2, np.float32)
    m, _ = tell(strategy(16, group_size=4, shaping="group_z_score"), flat)
    assert float(m.flat_group_fraction) == 1.0 and bool(m.no_signal) and float(m.ess) == 0.0


def test_per_label_update_norms_are_the_norms_of_the_gradient_leaves():
    f = np.asarray(CASES["distinct"], np.float32)
    for maker in ("eggroll", "open_es"):
        s = strategy() if maker == "eggroll" else esx.open_es(population_size=8, sigma=0.1,
                                                                optimizer=optax.sgd(0.1), noise_source="hash")
        s = s._replace(gradient=jax.jit(s.gradient), apply=jax.jit(s.apply))
        m, grads = tell(s, f)
        w, b = np.asarray(grads["w"], np.float64), np.asarray(grads["b"], np.float64)
        if maker == "eggroll":     # w is low-rank, b full
            assert float(m.update_norm_lowrank) == pytest.approx(np.linalg.norm(w), rel=1e-6)
            assert float(m.update_norm_full) == pytest.approx(np.linalg.norm(b), rel=1e-6)
        else:                      # open_es: every leaf full
            assert float(m.update_norm_lowrank) == 0.0
            assert float(m.update_norm_full) == pytest.approx(np.hypot(np.linalg.norm(w), np.linalg.norm(b)),
                                                              rel=1e-6)
        assert float(m.grad_norm) == pytest.approx(np.hypot(float(m.update_norm_lowrank),
                                                            float(m.update_norm_full)), rel=1e-6)


def test_integer_strategy_reports_the_same_fields_from_its_pair_signs():
    params = {"w": jnp.zeros((8, 4), jnp.int8), "b": jnp.zeros((4,), jnp.int8)}
    s = ie.int_eggroll(population_size=8, sigma_shift=2, alpha=0.2)          # group_size 2: the pairs
    s = s._replace(gradient=jax.jit(s.gradient), apply=jax.jit(s.apply))
    state = s.init(jax.random.key(0), params)
    f = jnp.asarray([3, 1, 2, 2, 0, 5, 7, 7], jnp.int32)
    tallies = s.gradient(state, f)
    _, m = s.apply(state, tallies, f)
    assert float(m.ess) == 2.0 == int(m.num_decided_pairs)                   # ±1 weights: the decided pairs
    assert float(m.flat_group_fraction) == 0.5 and float(m.tie_fraction) == 0.5
    assert not bool(m.no_signal)
    assert float(m.update_norm_lowrank) == pytest.approx(np.linalg.norm(np.asarray(tallies["w"], np.float64)))
    assert float(m.update_norm_full) == pytest.approx(np.linalg.norm(np.asarray(tallies["b"], np.float64)))
    # large integer fitness is compared as integers (float32 would merge 2^24 and 2^24 + 1)
    big = jnp.asarray([1 << 24, (1 << 24) + 1] * 4, jnp.int32)
    _, m = s.apply(state, s.gradient(state, big), big)
    assert float(m.flat_group_fraction) == 0.0 and float(m.ess) == 4.0
    _, m = s.apply(state, s.gradient(state, jnp.zeros(8, jnp.int32)), jnp.zeros(8, jnp.int32))
    assert bool(m.no_signal) and bool(m.skipped) and float(m.ess) == 0.0


def test_step_and_jit_report_the_diagnostics():
    s = strategy()

    def fitness(p, key, data):
        return -jnp.sum((esx.dense(data, p["w"]) + esx.value(p["b"]) - 1.0) ** 2)

    state = s.init(jax.random.key(0), PARAMS)
    data = jnp.arange(6.0).reshape(2, 3) / 6
    _, m = esx.step(s, state, fitness, jax.random.key(1), data)
    assert set(esx.base.DIAGNOSTICS) <= set(m._fields)
    # the same numbers as the NumPy references on the fitness esx.step evaluated (same key), and as tell's
    f = np.asarray(s.evaluate(state, fitness, jax.random.key(1), data))
    w = np_centered_rank(f)
    assert float(m.ess) == pytest.approx(np_ess(w[0::2] - w[1::2]), rel=1e-6) and 1 <= float(m.ess) <= 4
    assert float(m.tie_fraction) == pytest.approx(np_tie_fraction(f))
    _, m_tell = s.tell(state, jnp.asarray(f))
    for name in esx.base.DIAGNOSTICS:
        np.testing.assert_allclose(np.asarray(getattr(m, name)), np.asarray(getattr(m_tell, name)), rtol=1e-6,
                                   err_msg=name)


def test_runner_logs_diagnostics_and_flags_a_generation_without_signal(tmp_path, capsys):
    from esx import run

    def constant(p, key, data):   # every member the same: no signal at all
        return jnp.zeros(()) * esx.value(p["b"])[0]

    task = run.fitness_task(run.RunConfig(generations=2, chunk=1, eval_every=2, checkpoint_every=0), strategy(),
                            PARAMS, constant)
    result = run.train(task, tmp_path / "run", progress=True, log=lambda s: None)
    err = capsys.readouterr().err
    assert "no signal" in err, err
    train = [r for r in result.history if r["kind"] == "train"]
    assert all(r["no_signal"] is True and r["ess"] == 0.0 and r["flat_group_fraction"] == 1.0 for r in train)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"tie_fraction", "flat_group_fraction", "ess", "update_norm_lowrank", "update_norm_full",
            "no_signal"} <= set(next(r for r in records if r["kind"] == "train"))
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"tie_fraction", "ess", "no_signal"} <= set(header)
