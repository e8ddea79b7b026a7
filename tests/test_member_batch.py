"""Member batching (``member_batch=K``, docs/hyperscale.md): the population evaluated and contracted K members at a
time gives the unbatched fitness (exactly where XLA computes the same blocks, else to float rounding) and the
unbatched update (within 1e-6 relative for the float strategies, exactly for the integer tallies)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import int_eggroll as ie

N = 32
KS = (2, 4, 16, N)            # 16: two chunks; N: one chunk (the unbatched program)


def mlp(key, d=4, h=8, o=2):
    k1, k2 = jax.random.split(key)
    return {"l1": {"w": jax.random.normal(k1, (d, h)) * 0.5, "b": jnp.zeros(h)},
            "l2": {"w": jax.random.normal(k2, (h, o)) * 0.5, "b": jnp.full(o, 0.1)}}


def forward(p, x):
    h = jnp.tanh(esx.dense(x, p["l1"]["w"]) + esx.value(p["l1"]["b"]))
    return esx.dense(h, p["l2"]["w"]) + esx.value(p["l2"]["b"])


def fit_rows(p, key, x):
    """A fitness with matrix products over several input rows and a reduction (XLA may block them differently)."""
    return -jnp.mean((forward(p, x)[..., 0] - jnp.sin(x[..., 0])) ** 2) + 0.01 * jax.random.normal(key)


def fit_elementwise(p, key, x):
    """Only elementwise work per member: every value is computed the same way whatever the chunk."""
    b1, b2 = esx.value(p["l1"]["b"]), esx.value(p["l2"]["b"])
    return jnp.tanh(b1[0] * x[0] + b1[3]) * b2[1] + jax.random.uniform(key)


def build(maker, k=None, **kw):
    kw = dict(population_size=N, sigma=0.1, optimizer=optax.sgd(0.1), member_batch=k, **kw)
    kw.setdefault("noise_source", "hash")   # the cheapest to compile: this file's cost is mostly compiling
    if maker == "eggroll":
        kw.setdefault("rank", 2)
    return getattr(esx, maker)(**kw)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_close_rel(got, want, rtol=1e-6):
    """Every leaf within ``rtol`` of the leaf's largest magnitude."""
    for g, w in zip(leaves(got), leaves(want)):
        scale = max(float(np.max(np.abs(w))), 1e-30)
        assert float(np.max(np.abs(g - w))) <= rtol * scale, (float(np.max(np.abs(g - w))), scale)


X = jax.random.normal(jax.random.key(1), (3, 4))
PARAMS = mlp(jax.random.key(0))


@pytest.mark.parametrize("maker,source,shaping,ks", [
    ("eggroll", "hash", "centered_rank", KS), ("open_es", "hash", "z_score", KS),
    ("eggroll", "normal", "z_score", (4,)),
    ("eggroll", "table", "identity", (4,)), ("eggroll", "binomial", "pair_sign", (4,)),
    ("open_es", "rademacher", "centered_rank", (4,)),
])
def test_update_matches_unbatched_across_k(maker, source, shaping, ks):
    """For one fitness vector, ``gradient`` agrees with the unbatched one within 1e-6 relative for every K, and is
    deterministic for a given K; K = N (one chunk) is the unbatched program. One program per case: compiling is
    most of this test's cost."""
    strategies = {k: build(maker, k or None, noise_source=source, shaping=shaping, table_size=1 << 10)
                  for k in (0,) + ks}   # key 0: unbatched
    state = strategies[0].init(jax.random.key(2), PARAMS)
    fitness = jax.random.normal(jax.random.key(3), (N,))
    run = jax.jit(lambda state, fitness: {k: s.gradient(state, fitness) for k, s in strategies.items()})
    out = run(state, fitness)
    chex.assert_trees_all_equal(out, run(state, fitness))
    grad0 = out.pop(0)
    for grad in out.values():
        assert_close_rel(grad, grad0)
    if N in out:
        chex.assert_trees_all_equal(out[N], grad0)


@pytest.mark.parametrize("maker", ["eggroll", "open_es"])
def test_fitness_matches_unbatched(maker):
    """Member by member: exactly for an elementwise fitness, to float rounding with matrix products and means."""
    strategies = {k: build(maker, k or None) for k in (0, 2, 4, 16)}   # K = N is the unbatched program
    state = strategies[0].init(jax.random.key(2), PARAMS)
    key = jax.random.key(3)
    out = jax.jit(lambda state: {k: (s.evaluate(state, fit_elementwise, key, X[0]),
                                     s.evaluate(state, fit_rows, key, X)) for k, s in strategies.items()})(state)
    exact0, rows0 = out.pop(0)
    for exact, rows in out.values():
        chex.assert_trees_all_equal(exact, exact0)
        chex.assert_trees_all_close(rows, rows0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("maker", ["eggroll", "open_es"])
def test_member_order_gives_the_same_fitness(maker):
    """``member_order="pairs_outer"`` lays the member vmap out as [pairs, signs]: the same values member by member
    (exactly for the elementwise fitness, to float rounding with matrix products), batched or not, with groups and
    per-group data and aux; without antithetic sampling too."""
    key = jax.random.key(3)
    for k, kw in ((None, {}), (8, {}), (None, {"antithetic": False})):
        a, b = (build(maker, k, member_order=o, group_size=4, **kw) for o in ("signs_outer", "pairs_outer"))
        state = a.init(jax.random.key(2), PARAMS)
        data = jax.random.normal(jax.random.key(4), (N // 4, 3, 4))

        def aux_fit(p, key, x):
            return fit_rows(p, key, x), {"first": forward(p, x)[0]}

        out = jax.jit(lambda state: [(s.evaluate(state, fit_elementwise, key, X[0]),
                                      s.evaluate(state, aux_fit, key, data, data_per_group=True, has_aux=True))
                                     for s in (a, b)])(state)
        (e0, r0), (e1, r1) = out
        chex.assert_trees_all_equal(e1, e0)
        chex.assert_trees_all_close(r1, r0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="valid orders"):
        build(maker, member_order="pairs_first")


def test_whole_step_matches_unbatched():
    """``esx.step`` with K = 4: the same fitness (elementwise), so every metric computed from it (fitness
    statistics, ties, flat groups, ESS, the no-signal flag) is identical; the update norms and the parameters within
    1e-6 relative."""
    base, batched = build("eggroll", None), build("eggroll", 4)
    state = base.init(jax.random.key(2), PARAMS)
    rounded = {"grad_norm", "update_norm_lowrank", "update_norm_full"}
    for _ in range(2):
        s0, m0 = esx.step(base, state, fit_elementwise, jax.random.key(5), X[0])
        s1, m1 = esx.step(batched, state, fit_elementwise, jax.random.key(5), X[0])
        for name in m0._fields:
            if name in rounded:
                np.testing.assert_allclose(getattr(m1, name), getattr(m0, name), rtol=1e-6, err_msg=name)
            else:
                chex.assert_trees_all_equal(getattr(m1, name), getattr(m0, name))
        assert float(m0.fitness_std) > 0 and float(m0.ess) > 0     # a population that differs: not vacuous
        assert_close_rel(s1.params, s0.params)
        state = s0


def int_params(tree):
    return jax.tree_util.tree_map(lambda x: jnp.round(x * 40).astype(jnp.int8), tree)


def int_fit(p, key, x):
    return jnp.sum(ie.int_value(p["l2"]["b"]).astype(jnp.int32)) * x + jax.random.randint(key, (), 0, 5)


@pytest.mark.parametrize("maker", ["eggroll", "open_es", "int"])
def test_groups_per_group_data_aux_and_noise_reuse_0(maker):
    """group_size 4 with data_per_group and has_aux; data_per_member; noise_reuse=0 at generation 3."""
    ks = (0, 4)     # 0: unbatched
    if maker == "int":
        strategies = {k: ie.int_eggroll(population_size=N, member_batch=k or None, group_size=4, noise_reuse=0)
                      for k in ks}
        params, one = int_params(PARAMS), int_fit
    else:
        strategies = {k: build(maker, k or None, group_size=4, noise_reuse=0) for k in ks}
        params, one = PARAMS, lambda p, key, d: fit_elementwise(p, key, X[0]) * d  # noqa: E731
    fit = lambda p, key, d: (one(p, key, d), {"d": d})  # noqa: E731
    state = strategies[0].init(jax.random.key(2), params).replace(generation=jnp.int32(3))
    key = jax.random.key(4)
    groups = jnp.arange(N // 4) + 1
    per_member = jnp.arange(N) % 3 + 1

    @jax.jit
    def run(state):
        out = {}
        for k, s in strategies.items():
            f, aux = s.evaluate(state, fit, key, groups, data_per_group=True, has_aux=True)
            fm = s.evaluate(state, fit, key, per_member, data_per_member=True, has_aux=True)
            out[k] = (f, aux, fm, s.gradient(state, f))
        return out

    out = run(state)
    f0, aux0, fm0, g0 = out.pop(0)
    chex.assert_trees_all_equal(aux0["d"], jnp.repeat(groups, 4))
    for f, aux, fm, g in out.values():
        chex.assert_trees_all_equal((f, aux, fm), (f0, aux0, fm0))
        if maker == "int":
            chex.assert_trees_all_equal(g, g0)
        else:
            assert_close_rel(g, g0)


def test_integer_strategy_exact():
    """The integer strategy: fitness, tallies and the next state exactly equal for every K (integers), with a
    frozen leaf, rank 2 and matrix products (int32 accumulation)."""
    params = {"w": jnp.zeros((6, 5), jnp.int8), "b": jnp.zeros(5, jnp.int8), "e": jnp.ones((3, 5), jnp.int8)}
    fit = lambda p, key, x: jnp.sum(ie.int_dense(x, p["w"]) + ie.int_value(p["b"])).astype(jnp.int32)  # noqa
    x = jnp.arange(12, dtype=jnp.int8).reshape(2, 6) * 3
    strategies = {k: ie.int_eggroll(population_size=N, rank=2, labels={"e": "frozen"}, member_batch=k or None)
                  for k in (0,) + KS}
    state = strategies[0].init(jax.random.key(1), params)

    @jax.jit
    def run(state):
        out = {}
        for k, s in strategies.items():
            f = s.evaluate(state, fit, jax.random.key(2), x)
            out[k] = (f, s.gradient(state, f), s.tell(state, f)[0].params)
        return out

    out = run(state)
    f0, t0, p0 = out.pop(0)
    assert int(jnp.sum(jnp.abs(t0["w"]))) > 0 and int(jnp.sum(p0["w"] != 0)) > 0
    for got in out.values():
        chex.assert_trees_all_equal(got, (f0, t0, p0))


@pytest.mark.parametrize("maker", ["eggroll", "int"])
def test_pairs_subset_each_device_batches_its_share(maker):
    """``pairs=`` (a device's share): batched within the share; a share smaller than a chunk is one chunk; a share
    that does not split into chunks is a ValueError naming the valid values."""
    ks = (0, 4, 16)    # 0: unbatched; 4: chunks of 2 pairs; 16: more than the share, one chunk
    if maker == "int":
        strategies = {k: ie.int_eggroll(population_size=N, member_batch=k or None) for k in ks}
        params = int_params(PARAMS)
        fit = lambda p, key, d: int_fit(p, key, 1)  # noqa: E731
    else:
        strategies = {k: build("eggroll", k or None) for k in ks}
        params = PARAMS
        fit = lambda p, key, d: fit_elementwise(p, key, X[0])  # noqa: E731
    state = strategies[0].init(jax.random.key(2), params)
    key = jax.random.key(3)
    share = jnp.arange(4, 8, dtype=jnp.int32)          # pairs 4..7 = members 8..15: 8 members

    @jax.jit
    def run(state):
        full = strategies[0].evaluate(state, fit, key)
        return full, {k: (s.evaluate(state, fit, key, pairs=share), s.gradient(state, full, pairs=share))
                      for k, s in strategies.items()}

    full, out = run(state)
    _, g0 = out.pop(0)
    for f, g in out.values():
        chex.assert_trees_all_equal(f, full[8:16])
        if maker == "int":
            chex.assert_trees_all_equal(g, g0)
        else:
            assert_close_rel(g, g0)
    three = jnp.arange(3, dtype=jnp.int32)             # 3 pairs do not split into chunks of 2
    with pytest.raises(ValueError, match=r"valid member_batch values here: 2, 6 \(or larger"):
        jax.eval_shape(lambda st: strategies[4].evaluate(st, fit, key, pairs=three), state)
    with pytest.raises(ValueError, match=r"valid member_batch values here: 2, 6 \(or larger"):
        jax.eval_shape(lambda st: strategies[4].gradient(st, full, pairs=three), state)


def test_bad_member_batch_is_a_clear_error():
    for bad in (0, -4, 3, 6, 64, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"member_batch=.*valid values: 2, 4, 8, 16, 32$"):
            build("eggroll", bad)
    with pytest.raises(ValueError, match=r"valid values: 1, 2, 3, 6$"):
        esx.open_es(population_size=6, sigma=0.1, optimizer=optax.sgd(0.1), antithetic=False, member_batch=4)
    assert esx.open_es(population_size=6, sigma=0.1, optimizer=optax.sgd(0.1), antithetic=False,
                       member_batch=3).config.member_batch == 3
    with pytest.raises(ValueError, match=r"even .*valid values: 2, 4, 8, 16, 32$"):
        ie.int_eggroll(population_size=N, member_batch=1)
    assert build("eggroll").config.member_batch is None
