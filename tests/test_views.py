"""Member views meet user code: ``x @ w`` / ``w @ x`` / ``w.T`` stay low-rank, other arithmetic raises a TypeError
that names the way out, tensor leaves (``"lowrank:k"``) are one matrix; and the fast path has no foot-guns
(``make_step`` compiles once, ``esx.step`` does not recompile for an equal function and warns when it must,
``init`` is jittable with a σ schedule, a σ set in the state is honoured, ``esx.minimize`` flips the direction)."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx

KEY = jax.random.key(0)


def _views(lowrank=True, shape=(3, 5), rank=2):
    kw = dict(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1))
    s = esx.eggroll(rank=rank, **kw) if lowrank else esx.open_es(**kw)
    st = s.init(KEY, {"w": jax.random.normal(jax.random.key(1), shape)})
    pop = s.ask(st)
    return [s.view(st, pop, i)["w"] for i in range(4)]


@pytest.mark.parametrize("lowrank", [True, False])
def test_matmul_forms_equal_the_materialised_matrix(lowrank):
    x1, x2 = jnp.arange(3.0), jax.random.normal(jax.random.key(2), (7, 3))
    y1, y2 = jnp.arange(5.0), jax.random.normal(jax.random.key(3), (5, 4))
    for w in _views(lowrank):
        dense = esx.value(w)
        for got, want in [(x1 @ w, x1 @ dense), (x2 @ w, x2 @ dense), (w @ y1, dense @ y1), (w @ y2, dense @ y2),
                          (w.T @ x1, dense.T @ x1), (y1 @ w.T, y1 @ dense.T),
                          (np.asarray(x2) @ w, x2 @ dense)]:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(_views()[0].T, esx.LowRank) and _views()[0].T.shape == (5, 3)


def test_split_views_transpose_and_multiply():
    w = esx.prepare(_views(rank=3)[1])
    assert isinstance(w, esx.SplitLowRank)
    x = jnp.arange(3.0)
    np.testing.assert_allclose(x @ w, x @ esx.value(w), rtol=1e-5)
    np.testing.assert_allclose(w.T @ x, esx.value(w).T @ x, rtol=1e-5)


@pytest.mark.parametrize("op", [
    lambda w: w + 1, lambda w: 1 + w, lambda w: w * 2, lambda w: w - w, lambda w: -w, lambda w: w / 2,
    lambda w: w ** 2, lambda w: w[0], lambda w: w[...], lambda w: jnp.asarray(w), lambda w: np.asarray(w),
    lambda w: float(w), lambda w: w.astype(jnp.float16), lambda w: w.reshape(-1), lambda w: list(w),
])
def test_other_arithmetic_raises_a_type_error_that_names_the_way_out(op):
    for w in (_views(True)[0], _views(False)[0]):
        with pytest.raises(TypeError) as info:
            op(w)
        msg = str(info.value)
        assert "esx.value" in msg and "esx.interop" in msg and "docs/interop.md" in msg and "(3, 5)" in msg


@pytest.mark.parametrize("source", ["normal", "hash", "table"])
def test_tensor_leaf_is_the_flattened_matrix(source):
    """``"lowrank:1"`` on ``[4, 2, 3]``: the same noise, fitness and update as the ``[4, 6]`` matrix leaf of the
    same path, and ``esx.dense`` contracts the leading axis."""
    x = jax.random.normal(jax.random.key(1), (5, 4))
    w = jax.random.normal(jax.random.key(2), (4, 2, 3))
    kw = dict(population_size=8, rank=2, sigma=0.1, optimizer=optax.adam(0.1), noise_source=source)
    s3 = esx.eggroll(**kw, labels={"w": esx.labels.lowrank(1)})
    s2 = esx.eggroll(**kw)
    st3, st2 = s3.init(KEY, {"w": w}), s2.init(KEY, {"w": w.reshape(4, 6)})
    fit = lambda p, k, d: jnp.sum(jnp.sin(esx.dense(d, p["w"])))  # noqa: E731
    fit_dense = lambda p, k, d: jnp.sum(jnp.sin(jnp.einsum("bi,ihk->bhk", d, esx.value(p["w"]))))  # noqa: E731
    f3, f2 = s3.evaluate(st3, fit, KEY, x), s2.evaluate(st2, fit, KEY, x)
    np.testing.assert_allclose(f3, f2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f3, s3.evaluate(st3, fit_dense, KEY, x), rtol=1e-6, atol=2e-6)
    n3, _ = s3.tell(st3, f3)
    n2, _ = s2.tell(st2, f3)
    assert n3.params["w"].shape == (4, 2, 3)
    np.testing.assert_array_equal(n3.params["w"].reshape(4, 6), n2.params["w"])
    v = s3.view(st3, s3.ask(st3), 3)["w"]
    assert v.a.shape == (4, 2) and v.b.shape == (2, 3, 2) and esx.value(v).shape == (4, 2, 3)
    with pytest.raises(ValueError, match="layout='in_out' only"):
        esx.dense(x, v, layout="out_in")
    with pytest.raises(ValueError, match="does not end in the view's input axes"):
        esx.dense(jnp.ones((5, 3)), v)


def test_tensor_labels_are_checked():
    params = {"w": jnp.ones((4, 2, 3)), "b": jnp.ones(3)}
    for bad, msg in [({"w": "lowrank:3"}, "needs 1 <= k < ndim"), ({"w": "lowrank:0"}, "valid labels"),
                     ({"w": "lowrank:x"}, "valid labels"), ({"b": "lowrank:1"}, "needs 1 <= k < ndim")]:
        with pytest.raises(ValueError, match=msg):
            esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1), labels=bad).init(KEY, params)
    with pytest.raises(ValueError, match="rows must be an integer"):
        esx.labels.lowrank(0)
    # open_es perturbs a tensor leaf fully; the integer strategy refuses it.
    s = esx.open_es(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1), labels={"w": "lowrank:1"})
    assert isinstance(s.view(st := s.init(KEY, params), s.ask(st), 0)["w"], esx.Full)
    si = esx.int_eggroll.int_eggroll(population_size=4, labels={"w": "lowrank:1"})
    with pytest.raises(ValueError, match="tensor labels 'lowrank:k' are not supported"):
        si.init(KEY, {"w": jnp.ones((4, 2, 3), jnp.int8)})


def test_init_is_jittable_with_a_sigma_schedule_and_still_checks_it():
    s = esx.eggroll(population_size=4, sigma=optax.linear_schedule(0.1, 0.01, 10), optimizer=optax.sgd(0.1))
    st = jax.jit(s.init)(KEY, {"w": jnp.ones((3, 5))})
    assert float(st.sigma) == pytest.approx(0.1)
    bad = esx.eggroll(population_size=4, sigma=optax.linear_schedule(0.0, 0.1, 10), optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="at generation 0"):
        jax.jit(bad.init)(KEY, {"w": jnp.ones((3, 5))})


def test_a_sigma_set_in_the_state_follows_the_schedule_instead_of_being_reset():
    sched = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.5)
    s = esx.eggroll(population_size=4, sigma=sched, optimizer=optax.sgd(0.1))
    fit = lambda p, k, d: -jnp.sum(esx.dense(jnp.ones(3), p["w"]) ** 2)  # noqa: E731
    st = s.init(KEY, {"w": jnp.ones((3, 5))})

    def run(sigma):
        state = st.replace(sigma=sigma)
        for g in range(3):
            state, _ = esx.step(s, state, fit, jax.random.key(g))
        return state.sigma

    plain = run(st.sigma)                       # untouched: exactly the schedule
    assert float(plain) == pytest.approx(float(sched(3)), rel=0, abs=0)
    swept = jax.vmap(run)(jnp.array([0.2, 0.04, 1.0]))   # set by hand: kept, scaled by the schedule's ratio
    np.testing.assert_allclose(swept, [0.025, 0.005, 0.125], rtol=1e-6)


def _loss(p, k, d, scale=1.0):
    return scale * jnp.sum((esx.dense(d, p["w"]) - 1.0) ** 2)


def test_step_compiles_once_for_equal_functions_and_warns_when_it_cannot():
    s = esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.01))
    st = s.init(KEY, {"w": jnp.zeros((3, 2))})
    x = jnp.ones(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        def fresh():   # one lambda expression, a new function object per call
            return lambda p, k, d: -_loss(p, k, d)

        for g in range(2):   # (init's state differs from a stepped one in weak types: two compiles each)
            st, _ = esx.step(s, st, fresh(), KEY, x)
            st, _ = esx.step(s, st, esx.minimize(functools.partial(_loss, scale=2.0)), KEY, x)
        before = esx.step._cache_size()
        for g in range(3):   # new lambda / partial / minimize wrapper objects every call: no recompile
            st, _ = esx.step(s, st, fresh(), jax.random.key(g), x)
            st, _ = esx.step(s, st, esx.minimize(functools.partial(_loss, scale=2.0)), jax.random.key(g), x)
        assert esx.step._cache_size() == before
        assert not [w for w in caught if "compiled the whole generation again" in str(w.message)]
        for g in range(4):   # a new array in the closure each call is a new program: warned once
            target = jnp.full(2, float(g))
            st, _ = esx.step(s, st, lambda p, k, d: -jnp.sum((esx.dense(d, p["w"]) - target) ** 2), KEY, x)
    warned = [w for w in caught if "compiled the whole generation again" in str(w.message)]
    assert len(warned) == 1 and "make_step" in str(warned[0].message)
    assert warned[0].filename == __file__


def test_make_step_compiles_once_and_equals_step():
    s = esx.eggroll(population_size=8, sigma=0.1, optimizer=optax.adam(0.05))
    st0 = s.init(KEY, {"w": jnp.zeros((3, 2))})
    fast = s.make_step(esx.minimize(_loss))
    st_a = st_b = st0
    for g in range(4):
        st_a, m_a = fast(st_a, jax.random.key(g), jnp.ones(3))
        st_b, m_b = esx.step(s, st_b, esx.minimize(_loss), jax.random.key(g), jnp.ones(3))
    assert fast._cache_size() == 1
    np.testing.assert_array_equal(st_a.params["w"], st_b.params["w"])
    assert float(m_a.fitness_mean) == float(m_b.fitness_mean)


def test_minimize_makes_a_loss_go_down_and_passes_aux_through():
    s = esx.eggroll(population_size=32, sigma=0.05, optimizer=optax.adam(0.05))
    st = s.init(KEY, {"w": jnp.zeros((3, 2))})
    step = s.make_step(esx.minimize(_loss))
    start = float(_loss(st.params, None, jnp.ones(3)))
    for g in range(60):
        st, m = step(st, jax.random.key(g), jnp.ones(3))
    assert float(_loss(st.params, None, jnp.ones(3))) < 0.05 * start
    assert float(m.fitness_mean) < 0   # the metrics report the negated loss
    aux = esx.minimize(lambda p, k, d: (jnp.float32(2.0), {"n": 1}))(None, None, None)
    assert float(aux[0]) == -2.0 and aux[1] == {"n": 1}


def test_dense_rows_contracts_a_plain_or_full_tensor_weight_like_the_view():
    x = jax.random.normal(jax.random.key(1), (5, 2, 3))
    w = jax.random.normal(jax.random.key(2), (2, 3, 4))
    np.testing.assert_allclose(esx.dense(x, w, rows=2), jnp.einsum("bij,ijk->bk", x, w), rtol=1e-5, atol=1e-5)
    s = esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1), labels={"w": "lowrank:2"})
    st = s.init(KEY, {"w": w})
    v = s.view(st, s.ask(st), 2)["w"]
    np.testing.assert_allclose(esx.dense(x, v, rows=2), esx.dense(x, esx.value(v), rows=2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="first 2 axes"):
        esx.dense(x[..., 0], v, rows=1)
    with pytest.raises(ValueError, match="needs 1 <= rows < ndim"):
        esx.dense(x, w, rows=3)
    f = esx.open_es(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1))
    fst = f.init(KEY, {"w": w})
    fv = f.view(fst, f.ask(fst), 1)["w"]
    np.testing.assert_allclose(esx.dense(x, fv, rows=2), jnp.einsum("bij,ijk->bk", x, esx.value(fv)), rtol=1e-5,
                               atol=1e-5)


@jax.tree_util.register_pytree_node_class
class _CallableTree:
    """A label tree that is also callable, as an Equinox module is."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def __call__(self, x):
        raise AssertionError("a label tree is not a labeller")

    def tree_flatten(self):
        return (self.w, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_a_callable_label_tree_is_a_tree_not_a_labeller():
    params = _CallableTree(jnp.ones((3, 4)), jnp.ones(4))
    s = esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1), labels=_CallableTree("frozen", "full"))
    st = s.init(KEY, params)
    view = s.view(st, s.ask(st), 0)
    assert not isinstance(view.w, esx.LowRank) and isinstance(view.b, esx.Full)
