"""Tests of the integer EGG model, integer EGGROLL, the byte data loader and the float twin."""
from __future__ import annotations

import functools
import hashlib
import math
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import esx
from esx import int_eggroll as ie
from esx_envs import egg
from esx_envs.egg import model as egg_model
from esx_envs.egg import text_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = egg.EggConfig(dim=16, layers=1)


def _tiny_params(seed=0, config=TINY):
    return egg.init_params(jax.random.key(seed), config)


# ---------------------------------------------------------------------------------------------------------------
# tables and integer helpers


def test_tables_are_small_and_correct():
    sizes = egg.table_bytes()
    assert sum(sizes.values()) < 100 * 1024
    t = ie.normal_table().astype(np.float64)
    assert t.dtype == np.float64 and len(t) == 65536
    np.testing.assert_array_equal(t, -t[::-1])                 # exactly symmetric
    assert abs(t.var() - 256.0) < 2.0                          # round(16 N(0,1)): var 256 + 1/12
    assert np.abs(t).max() <= 127
    d = np.arange(255)
    np.testing.assert_allclose(egg.exp2_table() / 2.0**20, 2.0 ** (-d / 16), atol=1e-6)
    z = ie.z_table(0.05, 0.015)
    assert abs(z[0] / 256 - 1.95996) < 0.01 and z[1000] > z[0]


def test_rshift_is_sign_symmetric_rounding():
    x = jnp.arange(-1000, 1001, dtype=jnp.int32)
    for k in (0, 1, 4, 7):
        got = np.asarray(ie.rshift(x, k))
        np.testing.assert_array_equal(got, -np.asarray(ie.rshift(-x, k)))
        ref = np.sign(np.asarray(x)) * np.floor(np.abs(np.asarray(x)) / 2**k + 0.5)
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# noise


def test_noise_is_deterministic_in_key_generation_and_pair():
    params = {"w": jnp.zeros((8, 6), jnp.int8), "b": jnp.zeros((6,), jnp.int8)}
    strat = ie.int_eggroll(population_size=8)
    state = strat.init(jax.random.key(3), params)
    ask = jax.jit(strat.ask)
    pop1, pop2 = ask(state), ask(state)
    for x, y in zip(jax.tree_util.tree_leaves(pop1.noise), jax.tree_util.tree_leaves(pop2.noise)):
        assert x.dtype == jnp.int8
        np.testing.assert_array_equal(x, y)
    a = np.asarray(pop1.noise[1][0])                           # "w" (sorted after "b"): A of each pair
    assert not np.array_equal(a[0], a[1])                      # pairs differ
    pop3 = ask(state.replace(generation=state.generation + 1))
    assert not np.array_equal(a, np.asarray(pop3.noise[1][0]))  # generations differ
    pop4 = strat.ask(strat.init(jax.random.key(4), params))
    assert not np.array_equal(a, np.asarray(pop4.noise[1][0]))  # keys differ
    # reuse: noise_reuse=2 keeps the draw for two generations
    strat2 = ie.int_eggroll(population_size=8, noise_reuse=2)
    s2 = strat2.init(jax.random.key(3), params)
    np.testing.assert_array_equal(strat2.ask(s2).noise[1][0], strat2.ask(s2.replace(generation=jnp.int32(1))).noise[1][0])
    # marginal ~ round(16 N(0,1))
    big = np.asarray(ie.int_noise(jax.random.key(0), (200_000,), jnp.asarray(ie.normal_table())), np.float64)
    assert abs(big.mean()) < 0.2 and abs(big.std() - 16.0) < 0.2


def _fmix32_np(x):
    """MurmurHash3's 32-bit finaliser in NumPy (uint64 arithmetic, masked), the reference for esx.noise.fmix32."""
    x = x.astype(np.uint64)
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_follows_the_documented_formula():
    """esx/int_eggroll.py's docstring, recomputed in NumPy: ``NORMAL_TABLE[u] = round(16 Φ⁻¹((u + ½) / 65536))``
    clipped to ±127 (SciPy's quantile function), and entry ``j`` of a pair's draw is ``NORMAL_TABLE[h(k, j) >> 16]``
    with ``h(k, j) = fmix32(fmix32(j·φ + k0) ^ k1)``, ``k = member_key(key, leaf path, generation, pair,
    noise_reuse)``; a matrix's ``A`` and ``B`` are the first ``m`` and last ``n`` rows of one ``[m + n, r]`` draw."""
    from scipy.stats import norm

    table = ie.normal_table()
    u = np.arange(65536)
    np.testing.assert_array_equal(table, np.clip(np.rint(16 * norm.ppf((u + 0.5) / 65536)), -127, 127))
    m, n, r = 5, 3, 2
    params = {"w": jnp.zeros((m, n), jnp.int8), "b": jnp.zeros((4,), jnp.int8)}
    strat = ie.int_eggroll(population_size=6, rank=r, noise_reuse=2)
    state = strat.init(jax.random.key(11), params).replace(generation=jnp.int32(5))
    pop = strat.ask(state)

    def draw(path, pair, shape):
        k0, k1 = np.asarray(jax.random.key_data(
            esx.noise.member_key(state.key, path, state.generation, pair, 2))).reshape(-1)[:2].astype(np.uint64)
        j = np.arange(int(np.prod(shape)), dtype=np.uint64)
        h = _fmix32_np(_fmix32_np((j * 0x9E3779B9 + k0) & 0xFFFFFFFF) ^ k1)
        return table[(h >> 16).astype(np.int64)].reshape(shape)

    for pair in range(3):
        ab = draw("w", pair, (m + n, r))
        np.testing.assert_array_equal(pop.noise[1][0][pair], ab[:m])       # leaves sorted: "b", "w"
        np.testing.assert_array_equal(pop.noise[1][1][pair], ab[m:])
        np.testing.assert_array_equal(pop.noise[0][pair], draw("b", pair, (4,)))
    # generation // noise_reuse: generation 4 draws what 5 does, 6 does not
    chex.assert_trees_all_equal(strat.ask(state.replace(generation=jnp.int32(4))).noise, pop.noise)
    assert not np.array_equal(strat.ask(state.replace(generation=jnp.int32(6))).noise[0], pop.noise[0])


def test_antithetic_members_are_exact_opposites():
    params = {"w": jnp.zeros((8, 6), jnp.int8), "b": jnp.zeros((6,), jnp.int8)}
    strat = ie.int_eggroll(population_size=4, sigma_shift=2)
    state = strat.init(jax.random.key(0), params)
    pop = jax.jit(strat.ask)(state)
    x = jax.random.randint(jax.random.key(1), (5, 8), -127, 128).astype(jnp.int8)
    vp, vm = strat.view(state, pop, 2), strat.view(state, pop, 3)
    dense = jax.jit(ie.int_dense)
    np.testing.assert_array_equal(dense(x, vp["w"]), -dense(x, vm["w"]))
    np.testing.assert_array_equal(ie.int_value(vp["b"]), -ie.int_value(vm["b"]))
    assert np.any(np.asarray(ie.int_value(vp["b"])) != 0)


def test_lowrank_forward_matches_dense_reference():
    rng = np.random.default_rng(0)
    m, n, r = 16, 12, 2
    w = rng.integers(-127, 128, (m, n)).astype(np.int8)
    a = rng.integers(-60, 61, (m, r)).astype(np.int8)
    b = rng.integers(-60, 61, (n, r)).astype(np.int8)
    x = rng.integers(-127, 128, (7, m)).astype(np.int8)
    for sign in (1, -1):
        leaf = ie.IntLowRank(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.int32(sign), jnp.int32(3))
        got = np.asarray(jax.jit(ie.int_dense)(jnp.asarray(x), leaf), np.int64)
        # dense float reference: x (W + s A Bᵀ / 2^(4 + σ̂))
        dense = w.astype(np.float64) + sign * (a.astype(np.float64) @ b.T.astype(np.float64)) / 2**7
        ref = x.astype(np.float64) @ dense
        # rounding: x A is rounded to 1/16, then the product to 1 unit
        bound = 1 + np.abs(b.astype(np.float64)).sum(1) * 0.5 / 2**3 + 1e-9
        assert np.all(np.abs(got - ref) <= bound[None, :])
        # exact integer definition
        xa = x.astype(np.int64) @ a.astype(np.int64)
        xa = np.sign(xa) * ((np.abs(xa) + 8) >> 4)
        corr = xa @ b.T.astype(np.int64)
        corr = np.sign(corr) * ((np.abs(corr) + 4) >> 3)
        np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64) + sign * corr)
    # embedding rows agree with the materialised value
    leaf = ie.IntLowRank(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.int32(-1), jnp.int32(3))
    ids = jnp.asarray([0, 5, 15])
    np.testing.assert_array_equal(ie.int_embed(ids, leaf), ie.int_value(leaf)[ids])


# ---------------------------------------------------------------------------------------------------------------
# the update


def _dense_reference_update(strat, state, fitness, labels):
    """Materialises every A_k B_kᵀ and applies the ±1 rule with numpy (int64)."""
    pop = jax.jit(strat.ask)(state)
    f = np.asarray(fitness, np.int64)
    signs = np.sign(f[0::2] - f[1::2])
    decided = int(np.sum(signs != 0))
    cfg = strat.config
    t = int(state.generation)
    z = int(ie.z_table(cfg.alpha, cfg.alpha_decay)[min(t, ie.Z_TABLE_SIZE - 1)])
    zs = (z * int(ie.sqrt_table(cfg.num_pairs)[decided])) >> 8
    var = ie.table_variance()
    thr = {"lowrank": (zs * int(round(var))) >> 8, "full": (zs * int(round(math.sqrt(var)))) >> 8}
    out = {}
    for i, name in enumerate(sorted(state.params)):
        base = np.asarray(state.params[name], np.int64)
        nz = pop.noise[i]
        if labels[name] == "lowrank":
            a, b = np.asarray(nz[0], np.int64), np.asarray(nz[1], np.int64)
            e = sum(signs[k] * (a[k] @ b[k].T) for k in range(len(signs)))
        else:
            eps = np.asarray(nz, np.int64)
            e = sum(signs[k] * eps[k] for k in range(len(signs)))
        step = np.where(np.abs(e) > thr[labels[name]], np.sign(e), 0) if decided else 0
        out[name] = np.clip(base + step, -127, 127)
    return out


def test_update_matches_dense_integer_reference():
    labels = {"w": "lowrank", "b": "full", "v": "full"}
    params = {"w": jnp.asarray(np.random.default_rng(1).integers(-127, 128, (6, 5)), jnp.int8),
              "b": jnp.full((5,), 127, jnp.int8), "v": jnp.zeros((3,), jnp.int8)}
    strat = ie.int_eggroll(population_size=16, alpha=0.3, labels=labels, rank=1)
    state = strat.init(jax.random.key(5), params)
    tell = jax.jit(strat.tell)
    for gen in range(3):
        fitness = jax.random.randint(jax.random.fold_in(jax.random.key(9), gen), (16,), -5, 6)
        ref = _dense_reference_update(strat, state, fitness, labels)
        state, metrics = tell(state, fitness)
        for name in params:
            assert state.params[name].dtype == jnp.int8
            np.testing.assert_array_equal(np.asarray(state.params[name], np.int64), ref[name])
    assert int(state.generation) == 3
    # the metrics: esx.Metrics' fields (same order) plus the integer update's own, fitness numbers as numpy's
    assert ie.IntMetrics._fields[:len(esx.Metrics._fields)] == esx.Metrics._fields
    f = np.asarray(fitness, np.float64)
    np.testing.assert_allclose([metrics.fitness_mean, metrics.fitness_std, metrics.fitness_max, metrics.fitness_min],
                               [f.mean(), f.std(), f.max(), f.min()], rtol=1e-6)
    assert int(metrics.num_nonfinite) == 0
    assert int(metrics.num_decided_pairs) == int(np.sum(f[0::2] != f[1::2]))     # pairs whose members differ
    # tally split over pairs sums to the full tally (sharded updates)
    fitness = jax.random.randint(jax.random.key(11), (16,), -5, 6)
    grad = jax.jit(strat.gradient)
    full = grad(state, fitness)
    parts = [grad(state, fitness, jnp.arange(4) + 4 * i) for i in range(2)]
    for k in full:
        np.testing.assert_array_equal(full[k], parts[0][k] + parts[1][k])


def test_changed_fraction_matches_alpha_under_null_fitness():
    alpha = 0.05
    params = {"w": jnp.zeros((512, 512), jnp.int8), "b": jnp.zeros((1 << 18,), jnp.int8)}
    strat = ie.int_eggroll(population_size=1024, alpha=alpha, alpha_decay=0.015,
                           labels={"w": "lowrank", "b": "full"})
    state = strat.init(jax.random.key(0), params)
    tell = jax.jit(strat.tell)
    fracs = {}
    for t in (0, 200, 2000):
        st = state.replace(generation=jnp.int32(t))
        fitness = jax.random.randint(jax.random.key(t + 1), (1024,), 0, 1000)   # independent of the noise
        new, m = tell(st, fitness)
        for name in params:
            fracs[(t, name)] = float(np.mean(np.asarray(new.params[name]) != 0))
        assert abs(float(m.alpha) - alpha / (0.015 * t + 1)) < 1e-6
    for t in (0, 200, 2000):
        a_t = alpha / (0.015 * t + 1)
        for name in params:
            # 2^18 entries (weakly dependent for the low-rank leaf): within 5 binomial std + 5% of α_t (measured:
            # at most 2.4 std; a threshold for α_t / 2 or 2 α_t is off by 50-100%)
            tol = 5 * math.sqrt(a_t * (1 - a_t) / (1 << 18)) + 0.05 * a_t
            assert abs(fracs[(t, name)] - a_t) < tol, (t, name, fracs[(t, name)], a_t)


def test_update_saturates_at_127():
    labels = {"w": "lowrank", "b": "full"}
    params = {"w": jnp.full((4, 4), 127, jnp.int8), "b": jnp.full((8,), -127, jnp.int8)}
    strat = ie.int_eggroll(population_size=64, alpha=0.5, labels=labels)
    state = strat.init(jax.random.key(0), params)
    tell = jax.jit(strat.tell)
    moved = 0
    for g in range(20):
        fitness = jax.random.randint(jax.random.key(g), (64,), 0, 100)
        before = state.params
        state, m = tell(state, fitness)
        moved += int(np.sum(np.asarray(state.params["w"]) != np.asarray(before["w"])))
        for leaf in jax.tree_util.tree_leaves(state.params):
            assert leaf.dtype == jnp.int8
            assert int(jnp.max(leaf)) <= 127 and int(jnp.min(leaf)) >= -127
    assert moved > 0  # some weights moved down from 127 ...
    assert int(jnp.max(state.params["w"])) == 127  # ... and others stayed pinned at the top


def test_tie_only_generation_changes_nothing():
    params = {"w": jnp.ones((4, 4), jnp.int8)}
    strat = ie.int_eggroll(population_size=8)
    state = strat.init(jax.random.key(0), params)
    new, m = jax.jit(strat.tell)(state, jnp.zeros(8, jnp.int32))
    np.testing.assert_array_equal(new.params["w"], params["w"])
    assert bool(m.skipped) and int(new.generation) == 1


# ---------------------------------------------------------------------------------------------------------------
# integer-only model


def _sub_jaxprs(obj):
    """The jaxprs inside an equation parameter (ClosedJaxpr of scan / pjit / cond branches, or a bare Jaxpr)."""
    if hasattr(obj, "jaxpr") and hasattr(obj, "consts"):
        return [obj.jaxpr]
    if hasattr(obj, "eqns") and hasattr(obj, "invars"):
        return [obj]
    return []


def _walk(jaxpr, seen_prims):
    for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
        aval = getattr(v, "aval", None)
        if aval is not None and hasattr(aval, "dtype"):
            assert not jnp.issubdtype(aval.dtype, jnp.inexact), f"float var {v} : {aval}"
    for eqn in jaxpr.eqns:
        seen_prims.add(eqn.primitive.name)
        for v in list(eqn.invars) + list(eqn.outvars):
            aval = getattr(v, "aval", None)
            if aval is not None and hasattr(aval, "dtype"):
                assert not jnp.issubdtype(aval.dtype, jnp.inexact), f"float value in {eqn.primitive.name}: {aval}"
        for k, p in eqn.params.items():
            if k in ("dtype", "new_dtype", "preferred_element_type") and p is not None:
                assert not jnp.issubdtype(p, jnp.inexact), f"{eqn.primitive.name} with {k}={p}"
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                for j in _sub_jaxprs(sub):
                    _walk(j, seen_prims)


def test_forward_and_fitness_jaxprs_are_integer_only():
    config = egg.EggConfig(dim=16, layers=2)
    params = _tiny_params(config=config)
    strat = ie.int_eggroll(population_size=4, labels=egg.labels(params))
    state = strat.init(jax.random.key(0), params)
    fitness = egg.make_fitness(config)
    data = {"tokens": jnp.zeros((4, 2, 9), jnp.int32), "resets": jnp.zeros((4, 2, 8), bool),
            "hidden": jnp.zeros((4, 2, 2, 16), jnp.int8)}

    def population_fitness(state, data):
        return strat.evaluate(state, fitness, jax.random.key(1), data, data_per_member=True, has_aux=True)

    prims = set()
    _walk(jax.make_jaxpr(population_fitness)(state, data).jaxpr, prims)
    assert {"dot_general", "scan", "clz"} <= prims
    hid = jnp.zeros((2, 16), jnp.int8)
    prims2 = set()
    _walk(jax.make_jaxpr(lambda p, t: egg.forward(p, t, hid, config=config))(params, jnp.zeros(8, jnp.int32)).jaxpr,
          prims2)
    _walk(jax.make_jaxpr(egg.log2_likelihood)(jnp.zeros((3, 256), jnp.int8), jnp.zeros(3, jnp.int32)).jaxpr, prims2)
    # bits_per_byte's model call (int32 sums of pieces; they are added in int64 on the host)
    piece = functools.partial(egg_model._piece_ll, config=config)
    _walk(jax.make_jaxpr(piece)(params, jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 8), bool), jnp.ones((2, 8), bool),
                                jnp.zeros((2, 2, 16), jnp.int8)).jaxpr, prims2)
    # and the walker does catch floats
    with pytest.raises(AssertionError):
        _walk(jax.make_jaxpr(lambda x: (x.astype(jnp.float32) * 2).astype(jnp.int32))(jnp.int32(1)).jaxpr, set())


def _dots(jaxpr) -> list:
    """Every ``dot_general`` equation of a jaxpr, through scan / pjit / custom sub-jaxprs."""
    dots = []

    def find(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                dots.append(e)
            for p in e.params.values():
                for s in (p if isinstance(p, (list, tuple)) else [p]):
                    for sub in _sub_jaxprs(s):
                        find(sub)
    find(jaxpr)
    return dots


def test_matmuls_are_int8_with_int32_accumulation():
    """docs/egg.md: the model's matmuls are int8 × int8 → int32; in the population forward the only other products
    are the low-rank corrections, int32 × int32 → int32 contracting over the rank (``(x A >> 4) Bᵀ``, and
    ``A[t] Bᵀ`` for the embedding)."""
    params = _tiny_params()
    jaxpr = jax.make_jaxpr(lambda p: egg.forward(p, jnp.zeros(4, jnp.int32), jnp.zeros((1, 16), jnp.int8),
                                                 config=TINY))(params)
    dots = _dots(jaxpr.jaxpr)
    assert dots
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8]
        assert e.outvars[0].aval.dtype == jnp.int32
    for rank in (1, 2):
        strat = ie.int_eggroll(population_size=4, rank=rank, labels=egg.labels(params))
        state = strat.init(jax.random.key(0), params)
        fitness = egg.make_fitness(TINY)
        data = {"tokens": jnp.zeros((4, 2, 9), jnp.int32), "resets": jnp.zeros((4, 2, 8), bool),
                "hidden": jnp.zeros((4, 2, TINY.layers, TINY.dim), jnp.int8)}
        pop = jax.make_jaxpr(lambda st, d: strat.evaluate(st, fitness, jax.random.key(1), d, data_per_member=True,
                                                          has_aux=True))(state, data)
        kinds = {"int8": 0, "correction": 0}
        for e in _dots(pop.jaxpr):
            dtypes = [v.aval.dtype for v in e.invars]
            assert e.outvars[0].aval.dtype == jnp.int32
            if dtypes == [jnp.int8, jnp.int8]:
                kinds["int8"] += 1
                continue
            (lhs_contract, _), _ = e.params["dimension_numbers"]
            assert dtypes == [jnp.int32, jnp.int32], dtypes
            assert [e.invars[0].aval.shape[d] for d in lhs_contract] == [rank]
            kinds["correction"] += 1
        assert kinds["int8"] > 0 and kinds["correction"] > 0, kinds


def test_integer_log_likelihood_matches_float_log_softmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.integers(-127, 128, (4000, 256)), jnp.int8)
    peaked = jnp.asarray(np.clip(rng.normal(0, 40, (4000, 256)), -127, 127).astype(np.int8))
    targets = jnp.asarray(rng.integers(0, 256, 4000), jnp.int32)
    for lg in (logits, peaked):
        got = np.asarray(jax.jit(egg.log2_likelihood)(lg, targets)) / 4096.0
        ref = np.asarray(jax.jit(egg.float_log2_likelihood)(lg, targets), np.float64)
        assert np.max(np.abs(got - ref)) < 0.01
        assert abs(got.mean() - ref.mean()) < 0.02
    # on the model's own logits, over real text: bits/byte agree
    split = text_data.load_split()
    params = _tiny_params()
    tok = jnp.asarray(split.valid[:2001].astype(np.int32))
    lg, _ = jax.jit(lambda p, t: egg.forward(p, t, jnp.zeros((1, 16), jnp.int8), config=TINY))(params, tok[:-1])
    bpb_int = -float(jnp.sum(jax.jit(egg.log2_likelihood)(lg, tok[1:]))) / 4096 / 2000
    bpb_float = -float(jnp.mean(jax.jit(egg.float_log2_likelihood)(lg, tok[1:])))
    assert abs(bpb_int - bpb_float) <= 0.02
    assert math.isclose(egg.bits_per_byte(params, split.valid[:2001], config=TINY, streams=1), bpb_int,
                        rel_tol=1e-6)


def test_layer_norm_divides_by_mean_absolute_value():
    x = jnp.asarray(np.random.default_rng(0).integers(-60, 61, (50, 16)), jnp.int8)
    y = np.asarray(jax.jit(egg.layer_norm)(x, jnp.full((16,), 16, jnp.int8)), np.float64)
    xf = np.asarray(x, np.float64)
    ref = np.clip(16 * xf / np.abs(xf).mean(-1, keepdims=True), -127, 127)
    assert np.max(np.abs(y - ref)) <= 0.06 * np.abs(ref).max() + 1


def test_hidden_state_resets_at_document_boundaries():
    params = _tiny_params()
    tok = jnp.asarray(np.frombuffer(b"hello world, hello again", np.uint8).astype(np.int32))
    hid0 = jnp.zeros((1, 16), jnp.int8)
    fwd = jax.jit(lambda p, t, h, r: egg.forward(p, t, h, r, config=TINY))
    no = jnp.zeros(14, bool)
    _, carried = fwd(params, tok[:14], hid0, no)
    resets = no.at[0].set(True)
    a, _ = fwd(params, tok[10:], carried, resets)
    b, _ = fwd(params, tok[10:], hid0, no)
    c, _ = fwd(params, tok[10:], carried, no)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))



# ---------------------------------------------------------------------------------------------------------------
# bits/byte: exact for any split
#
# Cutting the data into other streams changes which bytes are predicted (the first byte of a stream is not) and
# from which hidden state (every stream starts from zero), so bits/byte of different splits differ slightly. The
# exact invariant is the definition: for every split, bits/byte = -Σ_streams Σ_t ll_t / 4096 / #predicted, with
# ll_t the model's integer log-likelihood of byte t + 1 given its stream up to byte t. The references below compute
# that sum per byte on the host in int64, by a different route than bits_per_byte (fixed segments carrying the
# hidden state; or, for a model whose state cannot move, a 256 x 256 table of byte pairs).

SPLITS = ((1, None), (2, None), (3, None), (7, None), (64, None), (2, 40_000), (7, 5_000))
_SEG = 4096


@functools.lru_cache(maxsize=None)
def _segment_ll(config):
    @jax.jit
    def seg(params, tok, res, hid):     # per-byte int32 log-likelihoods (no sum in the model)
        logits, hid = egg.forward(params, tok[:-1], hid, res, config=config)
        return egg.log2_likelihood(logits, tok[1:]), hid
    return seg


def _split_positions(n, streams, length):
    """Start and length of every stream, as bits_per_byte cuts them."""
    stride = n // streams
    length = stride if length is None else min(length, stride)
    return [k * stride for k in range(streams)], length


def _reference_total(params, data, streams, length, config, doc_starts=None):
    """Σ ll over the split in int64 (host): each stream from a zero state in fixed segments, hidden carried."""
    seg = _segment_ll(config)
    starts, length = _split_positions(len(data), streams, length)
    total = 0
    for s in starts:
        hid = jnp.zeros((config.layers, config.dim), jnp.int8)
        for lo in range(0, length - 1, _SEG):
            k = min(_SEG, length - 1 - lo)
            tok = np.zeros(_SEG + 1, np.int32)
            tok[:k + 1] = data[s + lo:s + lo + k + 1]
            res = np.zeros(_SEG, bool)
            if doc_starts is not None:
                res[:k] = doc_starts[s + lo:s + lo + k]
            ll, hid = seg(params, jnp.asarray(tok), jnp.asarray(res), hid)
            total += int(np.asarray(ll)[:k].astype(np.int64).sum())
    return total, streams * (length - 1)


def test_bits_per_byte_is_exact_for_any_split():
    """streams=1 used to overflow the int32 sum (-0.755 bits/byte instead of 8.646 on the validation split)."""
    valid = text_data.load_split().valid
    params = _tiny_params()
    got = {}
    for streams, length in SPLITS:
        total, count = _reference_total(params, valid, streams, length, TINY)
        bpb = egg.bits_per_byte(params, valid, config=TINY, streams=streams, length=length)
        assert math.isclose(bpb, -total / 4096 / count, rel_tol=1e-12), (streams, length, bpb, -total / 4096 / count)
        got[(streams, length)] = bpb
    assert -_reference_total(params, valid, 1, None, TINY)[0] > 2**31    # the whole split overflows int32
    # and the splits agree up to where the streams start (zero state, first bytes not predicted)
    values = list(got.values())
    assert 8.0 < min(values) and max(values) - min(values) < 2e-3, got
    # document starts reset the state inside a stream (the caller's array is not modified)
    starts = np.zeros(len(valid), bool)
    starts[np.random.default_rng(0).choice(len(valid), 40, replace=False)] = True
    keep = starts.copy()
    total, count = _reference_total(params, valid, 3, None, TINY, doc_starts=starts)
    bpb = egg.bits_per_byte(params, valid, config=TINY, streams=3, doc_starts=starts)
    assert math.isclose(bpb, -total / 4096 / count, rel_tol=1e-12) and bpb != got[(3, None)]
    np.testing.assert_array_equal(starts, keep)
    with pytest.raises(ValueError, match="streams"):
        egg.bits_per_byte(params, valid[:10], config=TINY, streams=6)


def test_bits_per_byte_of_a_stateless_model_is_a_sum_over_byte_pairs():
    """With the GRU gate shut (``f = -127``: the state stays 0) every byte's log-likelihood depends on the previous
    byte only, so bits/byte of any split is the mean of a 256 x 256 table over the split's predicted pairs."""
    params = _tiny_params(seed=1)
    layers = dict(params["layers"], wf=jnp.zeros_like(params["layers"]["wf"]),
                  bf=jnp.full_like(params["layers"]["bf"], -127))
    params = dict(params, layers=layers)
    byte = jnp.arange(256, dtype=jnp.int32)
    logits, hid = jax.jit(lambda p: egg.forward(p, byte, jnp.zeros((1, 16), jnp.int8), config=TINY))(params)
    assert not np.any(np.asarray(hid))
    table = np.asarray(egg.log2_likelihood(jnp.repeat(logits, 256, axis=0), jnp.tile(byte, 256)),
                       np.int64).reshape(256, 256)                 # table[a, b] = ll of b after a
    valid = text_data.load_split().valid
    for streams, length in SPLITS:
        starts, length = _split_positions(len(valid), streams, length)
        pos = (np.asarray(starts)[:, None] + np.arange(length - 1)[None, :]).ravel()
        total = int(table[valid[pos], valid[pos + 1]].sum())
        if streams == 1:
            assert -total > 2**31
        bpb = egg.bits_per_byte(params, valid, config=TINY, streams=streams, length=length)
        assert math.isclose(bpb, -total / 4096 / pos.size, rel_tol=1e-12), (streams, length)


def test_final_evaluation_of_an_egg_run_is_exact_with_one_stream():
    """``esx train egg-shakespeare final_eval_streams=1`` reports the same bits/byte as the default 64 streams (up
    to where the streams start), not the overflowed sum."""
    from esx_envs.egg.task import EggRunConfig

    setup = EggRunConfig(dim=16, population_size=4, final_eval_streams=1).setup()
    state = setup.initial_state()
    summary, _ = setup.evaluate(state, True)
    valid = text_data.load_split().valid
    one = egg.bits_per_byte(state.es.params, valid, config=TINY, streams=1)
    many = egg.bits_per_byte(state.es.params, valid, config=TINY, streams=64)
    assert summary["valid_bpb"] == one
    assert 0 < one < 9 and abs(one - many) < 2e-3, (one, many)

# ---------------------------------------------------------------------------------------------------------------
# data


def test_shipped_corpus_and_split():
    assert text_data.DEFAULT_PATH.is_file()
    assert hashlib.sha256(text_data.DEFAULT_PATH.read_bytes()).hexdigest() == text_data.SHAKESPEARE_SHA256
    s = text_data.load_split()
    assert len(s.train) + len(s.valid) == 1_115_394
    assert len(s.train) == round(0.9 * 1_115_394)
    assert bytes(s.valid[:20]) == text_data.DEFAULT_PATH.read_bytes()[len(s.train):len(s.train) + 20]


def test_folder_loader_marks_documents(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"first doc")
    (tmp_path / "b" / "c.txt").write_bytes(b"second")
    (tmp_path / "b" / "d.md").write_bytes(b"third!")
    data, starts = text_data.load_bytes(tmp_path)
    assert bytes(data) == b"first docsecondthird!"
    assert list(np.flatnonzero(starts)) == [0, 9, 15]
    data, starts = text_data.load_bytes(tmp_path, suffixes=(".txt",))
    assert bytes(data) == b"first docsecond"
    d2, s2 = text_data.documents_to_bytes(["ab", "", "cde"])
    assert bytes(d2) == b"abcde" and list(np.flatnonzero(s2)) == [0, 2]


def test_streams_are_contiguous_and_pure():
    data, starts = text_data.documents_to_bytes([b"x" * 50, b"y" * 70])
    st = text_data.Streams(data, starts, num_streams=3, length=16, seed=1)
    t0, r0 = st.batch(0)
    t1, r1 = st.batch(1)
    assert t0.shape == (3, 17) and r0.shape == (3, 16)
    np.testing.assert_array_equal(t0[:, -1], t1[:, 0])          # next window continues the stream
    np.testing.assert_array_equal(st.batch(1)[0], t1)            # pure in the generation
    assert r0[:, 0].all()
    # a reset exactly where a document starts (or the data wraps)
    for g in range(12):
        tok, res = st.batch(g)
        idx = (st.offsets[:, None] + g * 16 + np.arange(16)[None, :]) % len(data)
        np.testing.assert_array_equal(res | (g == 0) & (np.arange(16) == 0), st.starts[idx] | (g == 0) & (np.arange(16) == 0))


# ---------------------------------------------------------------------------------------------------------------
# training


def _train(config, *, population, generations, length=32, alpha=0.1, alpha_decay=0.015, seed=0, group_size=2,
           streams_per_member=1):
    split = text_data.load_split()
    params = egg.init_params(jax.random.key(seed), config)
    strat = ie.int_eggroll(population_size=population, alpha=alpha, alpha_decay=alpha_decay, group_size=group_size,
                           labels=egg.labels(params))
    state = strat.init(jax.random.key(seed + 1), params)
    groups = population // group_size
    streams = text_data.Streams(split.train, split.train_starts, num_streams=groups * streams_per_member,
                                length=length, seed=seed)
    gen = egg.make_generation(strat, config)
    hidden = egg.initial_hidden(population, streams_per_member, config)
    for g in range(generations):
        tok, res = streams.batch(g)
        state, hidden, m = gen(state, hidden, tok.reshape(groups, streams_per_member, -1),
                               res.reshape(groups, streams_per_member, -1))
    return state, split, m


def test_short_training_brings_loss_well_below_8_bits():
    state, split, m = _train(TINY, population=64, generations=150, length=32, alpha=0.2, alpha_decay=0.003)
    before = egg.bits_per_byte(_tiny_params(), split.valid, config=TINY, streams=8, length=512)
    after = egg.bits_per_byte(state.params, split.valid, config=TINY, streams=8, length=512)
    assert after < 6.5, (before, after)
    assert after < before - 1.5
    text = egg.sample(state.params, "ROMEO:", 40, jax.random.key(0), config=TINY)
    assert text.startswith("ROMEO:") and len(text.encode("utf-8", errors="replace")) >= 40


# ---------------------------------------------------------------------------------------------------------------
# float twin


def test_float_twin_backprop_learns_and_mirrors_shapes():
    import optax

    from esx_envs.egg import float_twin as ft

    params = ft.init_params(jax.random.key(0), TINY)
    ip = _tiny_params()
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ip)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ip)):
        assert a.shape == b.shape
    split = text_data.load_split()
    opt = optax.adam(3e-2)
    step = ft.make_backprop_step(opt, TINY)
    streams = text_data.Streams(split.train, split.train_starts, num_streams=8, length=32)
    hidden = jnp.zeros((8, 1, 16))
    state = opt.init(params)
    before = ft.bits_per_byte(params, split.valid, config=TINY, streams=8, length=256)
    for g in range(60):
        tok, res = streams.batch(g)
        params, state, hidden, loss = step(params, state, hidden, jnp.asarray(tok), jnp.asarray(res))
    after = ft.bits_per_byte(params, split.valid, config=TINY, streams=8, length=256)
    assert after < before - 1.0 and after < 5.5, (before, after)


@pytest.mark.slow
def test_float_twin_trains_with_float_eggroll():
    import optax

    import esx
    from esx_envs.egg import float_twin as ft

    params = ft.init_params(jax.random.key(0), TINY)
    strat = esx.eggroll(population_size=32, sigma=0.05, optimizer=optax.adam(0.05), group_size=2,
                        labels=egg.labels(params))
    state = strat.init(jax.random.key(1), params)
    gen = ft.make_es_generation(strat, TINY)
    split = text_data.load_split()
    streams = text_data.Streams(split.train, split.train_starts, num_streams=16, length=32)
    hidden = jnp.zeros((32, 1, 1, 16))
    before = ft.bits_per_byte(params, split.valid, config=TINY, streams=8, length=256)
    for g in range(40):
        tok, res = streams.batch(g)
        state, hidden, m = gen(state, hidden, jnp.asarray(tok)[:, None], jnp.asarray(res)[:, None])
    after = ft.bits_per_byte(state.params, split.valid, config=TINY, streams=8, length=256)
    assert after < before - 0.5, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# notebook


@pytest.mark.slow
def test_egg_notebook_runs():
    from tests.test_notebooks import outputs_text, run_notebook

    nb = run_notebook("egg_int8.ipynb", {"ESX_EGG_GENERATIONS": "150", "ESX_EGG_POPULATION": "64"})
    text = outputs_text(nb)
    line = next(t for t in text.splitlines() if t.startswith("validation bits/byte:"))
    start, end = (float(v) for v in line.split(":")[1].split("->"))
    assert end < start - 1.0


def test_population_ablation_at_equal_time_and_generations():
    """scripts/egg_compare.py ablation-time (docs/hyperscale.md): every population gets the same seconds of
    generation time and at least the given generations; batched above member_batch; bits/byte recorded at the
    time marks and at the common generation, from the same initial model."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("egg_compare", ROOT / "scripts" / "egg_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    split = text_data.load_split()
    records = mod.ablation_time(TINY, split, populations=[4, 8], streams=1, length=4, alpha=0.1, alpha_decay=0.0,
                                seconds=0.2, generations=3, member_batch=4, val={"streams": 2, "length": 32},
                                say=lambda s: None)
    assert [r["population"] for r in records] == [4, 8]
    assert [r["member_batch"] for r in records] == [None, 4]
    for r in records:
        whys = [e["why"] for e in r["evals"]]
        assert whys[0] == "start" and "generation 3" in whys
        assert {"0.05 s", "0.1 s", "0.2 s"} <= set(whys)
        at_g = next(e for e in r["evals"] if e["why"] == "generation 3")
        assert at_g["generation"] == 3
        last = r["evals"][-1]
        assert last["seconds"] >= 0.2 and last["generation"] >= 3
        assert all(math.isfinite(e["bpb"]) and 0 < e["bpb"] < 16 for e in r["evals"])
    assert records[0]["evals"][0]["bpb"] == records[1]["evals"][0]["bpb"]   # the same initial parameters


def test_integer_thresholds_match_the_float_formula():
    """docs/egg.md: weights move where ``|E| > z_{α_t/2} · v · √P`` (v ≈ 256 for the low-rank products, √v ≈ 16 for
    full leaves). The integer thresholds (z and √P from tables, shifts) against the formula in floats, written
    here from the normal quantile and the table's own variance: within 1% + 1 unit, for several α, decays,
    generations and decided-pair counts."""
    import statistics

    nd = statistics.NormalDist()
    var = float(np.mean(ie.normal_table().astype(np.float64) ** 2))
    assert 240 < var < 272                                  # round(16 · N(0, 1)) has variance ≈ 256
    for alpha, decay in ((0.05, 0.015), (0.3, 0.0), (0.01, 0.1)):
        strat = ie.int_eggroll(population_size=64, alpha=alpha, alpha_decay=decay)
        thresholds = jax.jit(ie._make_thresholds(strat.config))
        for t in (0, 1, 100, 5000):
            for decided in (1, 7, 32):
                lowrank, full = (int(x) for x in thresholds(jnp.int32(t), jnp.int32(decided)))
                z = nd.inv_cdf(1 - alpha / (decay * t + 1) / 2)
                for got, v in ((lowrank, var), (full, math.sqrt(var))):
                    want = z * v * math.sqrt(decided)
                    assert abs(got - want) <= 0.01 * want + 1, (alpha, decay, t, decided, got, want)
