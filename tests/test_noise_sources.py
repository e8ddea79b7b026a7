"""Every noise source against its definition (esx/noise.py): moments, determinism, exact formula."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esx import noise

SOURCES = noise.NOISE_SOURCES
TABLE = noise.make_table(1 << 16)
N = 1 << 16  # entries per statistical draw: bounds below are ~6 standard errors


def draw(source, key, shape, dtype=jnp.float32):
    return noise.sample(key, shape, dtype, source, TABLE if source == "table" else None)


@pytest.mark.parametrize("source", SOURCES)
def test_zero_mean_unit_variance(source):
    x = np.asarray(draw(source, jax.random.key(3), (N // 2, 2)), np.float64).ravel()
    if source == "table":  # one contiguous slice; check the table itself instead of a (correlated) slice
        x = np.asarray(TABLE, np.float64)
    se = 1.0 / math.sqrt(x.size)
    assert abs(x.mean()) < 6 * se
    assert abs(x.var() - 1.0) < 6 * se * math.sqrt(2.0)


@pytest.mark.parametrize("source", SOURCES)
def test_deterministic_and_key_dependent(source):
    k = jax.random.key(11)
    a = draw(source, k, (64, 3))
    b = draw(source, k, (64, 3))
    c = draw(source, jax.random.key(12), (64, 3))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    jitted = jax.jit(lambda kk: draw(source, kk, (64, 3)))(k)
    chex.assert_trees_all_equal(a, jitted)
    chex.assert_shape(a, (64, 3))
    chex.assert_type(a, jnp.float32)


@pytest.mark.parametrize("source", SOURCES)
def test_members_uncorrelated(source):
    """Draws of different members (keys from member_key) are uncorrelated, entry for entry."""
    base = jax.random.key(0)
    keys = [noise.member_key(base, "w", jnp.int32(0), jnp.int32(p), 1) for p in range(256)]
    x = np.stack([np.asarray(draw(source, k, (256,))) for k in keys])  # [members, entries]
    corr = np.corrcoef(x)[np.triu_indices(256, 1)]
    assert abs(corr.mean()) < 6 / math.sqrt(256 * corr.size)
    assert np.abs(corr).max() < 0.4  # 256 entries: |rho| ~ N(0, 1/16) for independent draws


def test_normal_is_jax_random_normal():
    k = jax.random.key(5)
    chex.assert_trees_all_equal(draw("normal", k, (7, 3)), jax.random.normal(k, (7, 3), jnp.float32))


def test_rademacher_is_32_signs_per_word():
    k = jax.random.key(6)
    shape = (37, 2)  # 74 entries -> 3 words, the last partly used
    words = np.asarray(jax.random.bits(k, (3,), jnp.uint32))
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1
    expected = (2.0 * bits.reshape(-1)[:74] - 1.0).reshape(shape)
    np.testing.assert_array_equal(np.asarray(draw("rademacher", k, shape)), expected)


def test_table_is_a_contiguous_slice_at_the_keyed_offset():
    k = jax.random.key(7)
    size = 300
    offset = int(jax.random.randint(k, (), 0, TABLE.shape[0] - size + 1))
    np.testing.assert_array_equal(np.asarray(draw("table", k, (100, 3))).ravel(),
                                  np.asarray(TABLE)[offset:offset + size])
    with pytest.raises(ValueError, match="table_size"):
        noise.sample(k, (TABLE.shape[0] + 1,), jnp.float32, "table", TABLE)


def _fmix32_np(x):
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _hash_np(key, size):
    k0, k1 = (int(w) for w in np.asarray(jax.random.key_data(key)).ravel()[:2])
    j = np.arange(size, dtype=np.uint64)
    return _fmix32_np(_fmix32_np((j * 0x9E3779B9 + k0) & 0xFFFFFFFF) ^ k1)


def test_fmix32_reference_values():
    # MurmurHash3 fmix32 is a bijection with fmix32(0) = 0; spot values computed by the numpy reference.
    xs = np.array([0, 1, 2, 0xFFFFFFFF, 0x12345678], np.uint32)
    np.testing.assert_array_equal(np.asarray(noise.fmix32(jnp.asarray(xs))), _fmix32_np(xs).astype(np.uint32))
    assert int(noise.fmix32(jnp.uint32(0))) == 0
    assert len(set(np.asarray(noise.fmix32(jnp.arange(1 << 16, dtype=jnp.uint32))).tolist())) == 1 << 16


def test_hash_bits_formula():
    k = jax.random.key(8)
    np.testing.assert_array_equal(np.asarray(noise.hash_bits(k, (5, 9))).ravel(),
                                  _hash_np(k, 45).astype(np.uint32))


def test_hash_source_formula():
    k = jax.random.key(9)
    h = _hash_np(k, 60)
    expected = (1.0 - 2.0 * (h >> 31)).reshape(20, 3)
    np.testing.assert_array_equal(np.asarray(draw("hash", k, (20, 3))), expected)


def test_binomial_source_formula_and_levels():
    k = jax.random.key(10)
    h = _hash_np(k, 60)
    pop = np.array([bin(int(v)).count("1") for v in h], np.float64)
    expected = ((pop - 16.0) / math.sqrt(8.0)).reshape(20, 3)
    np.testing.assert_allclose(np.asarray(draw("binomial", k, (20, 3))), expected, rtol=1e-6, atol=1e-6)
    x = np.asarray(draw("binomial", jax.random.key(1), (N,)), np.float64)
    # Binomial(32, 1/2) kurtosis 3 - 2/32
    kurt = np.mean(x**4) / np.mean(x**2) ** 2
    assert abs(kurt - (3 - 2 / 32)) < 0.1


@pytest.mark.parametrize("source", SOURCES)
def test_lowrank_factors_split_one_draw(source):
    """A = first m rows, B = last n rows of one (m + n) × r draw; stacked slices use fold_in(key, slice)."""
    k = jax.random.key(4)
    table = TABLE if source == "table" else None
    a, b = noise.lowrank_factors(k, (5, 7), 3, jnp.float32, source, table)
    ab = noise.sample(k, (12, 3), jnp.float32, source, table)
    chex.assert_trees_all_equal((a, b), (ab[:5], ab[5:]))
    sa, sb = noise.lowrank_factors(k, (2, 5, 7), 3, jnp.float32, source, table)
    chex.assert_shape((sa, sb), [(2, 5, 3), (2, 7, 3)])
    ab1 = noise.sample(jax.random.fold_in(k, 1), (12, 3), jnp.float32, source, table)
    chex.assert_trees_all_equal((sa[1], sb[1]), (ab1[:5], ab1[5:]))


@pytest.mark.parametrize("source", ["hash", "binomial"])
def test_lowrank_perturbation_entries_unit_variance(source):
    """E = A Bᵀ/√r has zero-mean, unit-variance entries for the hash sources too."""
    keys = jax.random.split(jax.random.key(2), 64)
    a, b = jax.vmap(lambda kk: noise.lowrank_factors(kk, (32, 32), 4, jnp.float32, source))(keys)
    e = np.asarray(jnp.einsum("pmr,pnr->pmn", a, b) / 2.0, np.float64).ravel()
    se = 1.0 / math.sqrt(e.size)
    assert abs(e.mean()) < 8 * se
    assert abs(e.var() - 1.0) < 0.05


def test_unknown_source():
    with pytest.raises(ValueError, match="valid sources"):
        noise.sample(jax.random.key(0), (3,), jnp.float32, "gaussian")


@pytest.mark.parametrize("source", SOURCES)
def test_batched_population_draws_equal_the_documented_keys(source):
    """noise.leaf_noise on noise.member_keys (what a strategy draws per pair, size classes merged) gives, leaf for
    leaf, lowrank_factors / full_noise of member_key(base, path, generation, pair)."""
    leaves = [jnp.zeros((5, 3)), jnp.zeros((3, 4, 4)), jnp.zeros(7), jnp.zeros((2, 9)), jnp.zeros((3, 3))]
    labels = ["lowrank", "lowrank", "full", "full", "frozen"]
    paths = ["a/w", "stack", "b", "c", "frozen"]
    base, gen, pair = jax.random.key(3), jnp.int32(5), jnp.int32(6)
    got = noise.leaf_noise(noise.member_keys(base, paths, gen, pair, 2), leaves, labels, 2, source, TABLE)
    for path, leaf, lab, x in zip(paths, leaves, labels, got):
        k = noise.member_key(base, path, gen, pair, 2)
        if lab == "lowrank":
            chex.assert_trees_all_equal(x, noise.lowrank_factors(k, leaf.shape, 2, jnp.float32, source, TABLE))
        elif lab == "full":
            chex.assert_trees_all_equal(x, noise.full_noise(k, leaf.shape, jnp.float32, source, TABLE))
        else:
            assert x is None
