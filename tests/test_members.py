"""The shared strategy skeleton (esx/_members.py) and the engine's boundaries: member arithmetic, the evaluation
modes every strategy shares, fitness checks, the one home of key derivation, the engine's imports."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import _members
from esx import int_eggroll as ie


#: every strategy builder, called with a population size and a group size (registry-driven: add one here)
BUILDERS = {
    "eggroll": lambda n, g: esx.eggroll(population_size=n, group_size=g, sigma=0.1, optimizer=optax.sgd(0.1)),
    "open_es": lambda n, g: esx.open_es(population_size=n, group_size=g, sigma=0.1, optimizer=optax.sgd(0.1)),
    "int_eggroll": lambda n, g: ie.int_eggroll(population_size=n, group_size=g),
}
PARAMS = {
    "eggroll": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
    "open_es": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
    "int_eggroll": {"w": jnp.zeros((3, 2), jnp.int8), "b": jnp.zeros(2, jnp.int8)},
}


def test_member_arithmetic():
    m = _members.Members(population_size=8, group_size=4, antithetic=True)
    assert (m.num_pairs, m.per_pair, m.num_groups) == (4, 2, 2)
    chex.assert_trees_all_equal(m.pairs(), jnp.arange(4, dtype=jnp.int32))
    chex.assert_trees_all_equal(m.members_of(m.pairs(jnp.array([3, 0]))), jnp.array([[6, 7], [0, 1]], jnp.int32))
    members = jnp.arange(8, dtype=jnp.int32)
    chex.assert_trees_all_equal(jax.vmap(m.pair_of)(members), members // 2)
    chex.assert_trees_all_equal(jax.vmap(m.group_of)(members), members // 4)
    chex.assert_trees_all_equal(jax.vmap(m.sign_of)(members), jnp.tile(jnp.array([1.0, -1.0]), 4))
    chex.assert_trees_all_equal(jax.vmap(lambda i: m.sign_of(i, jnp.int32))(members),
                                jnp.tile(jnp.array([1, -1], jnp.int32), 4))
    single = _members.Members(population_size=6, group_size=1, antithetic=False)
    assert (single.num_pairs, single.per_pair) == (6, 1)
    chex.assert_trees_all_equal(single.members_of(jnp.array([5, 2])), jnp.array([[5], [2]], jnp.int32))
    chex.assert_trees_all_equal(single.sign_of(jnp.int32(3)), jnp.float32(1.0))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_strategy_shares_the_evaluation_modes(name):
    """Shared, per group and per member data; keys per group; has_aux; pairs= -- one skeleton, every strategy."""
    s = BUILDERS[name](8, 2)
    state = s.init(jax.random.key(0), PARAMS[name])
    key = jax.random.key(3)
    fit = lambda p, k, d: (d.astype(jnp.float32) + jax.random.uniform(k), {"d": d})
    per_member = jnp.arange(8) * 10
    f, aux = s.evaluate(state, fit, key, per_member, data_per_member=True, has_aux=True)
    chex.assert_trees_all_equal(aux["d"], per_member)
    chex.assert_trees_all_close(f[0::2] - per_member[0::2], f[1::2] - per_member[1::2], atol=1e-5)  # group key
    g = s.evaluate(state, lambda p, k, d: d.astype(jnp.float32), key, jnp.arange(4) * 10, data_per_group=True)
    chex.assert_trees_all_equal(g, jnp.repeat(jnp.arange(4) * 10, 2).astype(jnp.float32))
    shared = s.evaluate(state, lambda p, k, d: jax.random.uniform(k) + d, key, 1.0)
    chex.assert_shape(shared, (8,))
    part = s.evaluate(state, lambda p, k, d: jax.random.uniform(k) + d, key, 1.0, pairs=jnp.array([3, 1]))
    chex.assert_trees_all_equal(part, shared[jnp.array([6, 7, 2, 3])])
    with pytest.raises(ValueError, match="not both"):
        s.evaluate(state, fit, key, per_member, data_per_group=True, data_per_member=True)
    with pytest.raises(ValueError, match="leading axis of 8 members"):
        s.evaluate(state, fit, key, jnp.arange(4), data_per_member=True)
    with pytest.raises(ValueError, match="leading axis of 4 groups"):
        s.evaluate(state, fit, key, jnp.arange(8), data_per_group=True)
    with pytest.raises(ValueError, match="scalar"):
        s.evaluate(state, lambda p, k, d: jnp.ones(3), key)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_strategy_checks_fitness_and_leaves_the_same_way(name):
    s = BUILDERS[name](4, 1)
    state = s.init(jax.random.key(0), PARAMS[name])
    with pytest.raises(ValueError, match=r"shape \(4,\) \(population_size\)"):
        s.tell(state, jnp.ones(6))
    with pytest.raises(TypeError, match="dtype"):
        s.tell(state, jnp.ones(4, bool))
    state_raw = s.init(jax.random.key_data(jax.random.key(0)), PARAMS[name])  # raw uint32[2] key data is wrapped
    chex.assert_trees_all_equal(jax.random.key_data(state_raw.key), jax.random.key_data(state.key))
    with pytest.raises(TypeError, match="PRNG key"):
        s.init(0, PARAMS[name])


def test_batched_member_keys_equal_member_key():
    base, paths = jax.random.key(4), ["enc/w", "b", "dec/layers/0/w"]
    keys = esx.noise.member_keys(base, paths, jnp.int32(7), jnp.int32(5), 3)
    for i, path in enumerate(paths):
        chex.assert_trees_all_equal(jax.random.key_data(keys[i]),
                                    jax.random.key_data(esx.noise.member_key(base, path, jnp.int32(7), 5, 3)))


def test_leaf_noise_equals_per_leaf_draws():
    """The bucketed normal draws (padded size classes, merged per dtype) give lowrank_factors / full_noise."""
    leaves = [jnp.zeros((5, 3)), jnp.zeros(4), jnp.zeros((2, 3, 3)), jnp.zeros((6, 2), jnp.bfloat16),
              jnp.zeros((40, 30)), jnp.zeros(()), jnp.zeros((3, 3))]
    labels = ["lowrank", "full", "lowrank", "lowrank", "full", "full", "frozen"]
    paths = [f"l{i}" for i in range(len(leaves))]
    keys = esx.noise.member_keys(jax.random.key(1), paths, jnp.int32(0), jnp.int32(2), 1)
    for source in ("normal", "hash"):
        got = esx.noise.leaf_noise(keys, leaves, labels, 2, source)
        for i, (leaf, lab) in enumerate(zip(leaves, labels)):
            if lab == "lowrank":
                want = esx.noise.lowrank_factors(keys[i], leaf.shape, 2, leaf.dtype, source)
            elif lab == "full":
                want = esx.noise.full_noise(keys[i], leaf.shape, leaf.dtype, source)
            else:
                want = None
            chex.assert_trees_all_equal(got[i], want)


def test_integer_noise_is_the_table_at_hash_bits():
    key, table = jax.random.key(5), jnp.asarray(ie.normal_table())
    for shape in [(7, 3), (), (2, 4, 5)]:
        bits = esx.noise.hash_bits(key, shape)
        chex.assert_trees_all_equal(ie.int_noise(key, shape, table), table[(bits >> 16).astype(jnp.int32)])
    assert ie.noise_bits is esx.noise.hash_bits


def test_moved_names_stay_importable_from_their_old_modules():
    from esx import base, int_ops, strategy

    for name in ("State", "Metrics", "Population", "Config", "Strategy", "FitnessFn", "paper_learning_rate",
                 "step", "fitness_stats", "_global_norm", "_all_finite", "_select"):
        assert getattr(strategy, name) is getattr(base, name)
    for name in ("IntLowRank", "IntFull", "int_dense", "int_embed", "int_value", "rshift", "saturate",
                 "matmul_i32", "FRAC_BITS"):
        assert getattr(ie, name) is getattr(int_ops, name)
    assert esx.State is base.State and esx.step is base.step


def test_int_strategy_tell_matches_numpy_reference_tally():
    """The integer tally is Σ_k F_k A_k B_kᵀ over decided pairs (against numpy on ask's factors)."""
    s = ie.int_eggroll(population_size=8, rank=2, labels={"b": "full"})
    state = s.init(jax.random.key(2), {"w": jnp.zeros((4, 3), jnp.int8), "b": jnp.zeros(3, jnp.int8)})
    fitness = jnp.array([3, 1, 0, 0, 2, 5, 7, 7])
    tallies = s.gradient(state, fitness)
    pop = s.ask(state)
    signs = np.sign(np.asarray(fitness[0::2]) - np.asarray(fitness[1::2]))
    a, b = (np.asarray(x, np.int64) for x in pop.noise[1])  # leaves in order: b, w
    want_w = np.einsum("p,pmr,pnr->mn", signs, a, b)
    want_b = np.einsum("p,pn->n", signs, np.asarray(pop.noise[0], np.int64))
    np.testing.assert_array_equal(tallies["w"], want_w)
    np.testing.assert_array_equal(tallies["b"], want_b)
