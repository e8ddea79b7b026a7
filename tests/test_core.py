"""Core engine tests: every assertion is against a dense reference, a known optimum or a statistical bound."""
import functools
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import esx

STRATEGIES = {
    "eggroll": lambda **kw: esx.eggroll(rank=kw.pop("rank", 2), **kw),
    "open_es": lambda **kw: (kw.pop("rank", None), esx.open_es(**kw))[1],
}
SOURCES = esx.noise.NOISE_SOURCES


def small_params():
    k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
    return {
        "w_in_out": jax.random.normal(k1, (5, 3)),
        "w_out_in": jax.random.normal(k2, (4, 3)),
        "emb": jax.random.normal(k3, (7, 3)),
        "b": jnp.arange(4.0),
    }


def materialise(strategy, state, member):
    """Member ``member``'s perturbed parameters as dense arrays, built from ``ask``'s factors."""
    return _materialise(strategy, state, jnp.int32(member))


@functools.partial(jax.jit, static_argnums=0)
def _materialise(strategy, state, member):
    view = strategy.view(state, strategy.ask(state), member)
    return jax.tree_util.tree_map(esx.value, view, is_leaf=lambda x: isinstance(x, (esx.LowRank, esx.Full)))


# ---------------------------------------------------------------- forward identity
@pytest.mark.parametrize("source", SOURCES)
def test_forward_identity_against_materialised_noise(source):
    params = small_params()
    strategy = esx.eggroll(population_size=6, rank=3, sigma=0.3, optimizer=optax.sgd(1.0),
                           noise_source=source, table_size=4096)
    state = strategy.init(jax.random.key(1), params)
    population = strategy.ask(state)
    x5, x3 = jax.random.normal(jax.random.key(2), (2, 5)), jax.random.normal(jax.random.key(3), (2, 3))
    ids = jnp.array([0, 6, 3, 3])
    for member in range(6):
        view = strategy.view(state, population, member)
        # Dense reference: every leaf materialised as W + σ s E with E = A Bᵀ / √r.
        dense = materialise(strategy, state, member)
        sign = 1.0 if member % 2 == 0 else -1.0
        leaves = jax.tree_util.tree_structure(params).flatten_up_to(view)
        for leaf in leaves:
            if isinstance(leaf, esx.LowRank):
                e = leaf.a @ leaf.b.T / math.sqrt(3)
                np.testing.assert_allclose(esx.value(leaf), leaf.base + 0.3 * sign * e, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(esx.dense(x5, view["w_in_out"]), x5 @ dense["w_in_out"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(esx.dense(x3, view["w_out_in"], layout="out_in"), x3 @ dense["w_out_in"].T,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(esx.embed(ids, view["emb"]), dense["emb"][ids], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(esx.value(view["b"]), dense["b"], rtol=1e-6)
        # esx.prepare (resolve once before a loop): rank columns split, Full leaves plain, same values.
        prepared = esx.prepare(view)
        assert isinstance(prepared["w_in_out"], esx.SplitLowRank) and len(prepared["w_in_out"].a) == 3
        assert isinstance(prepared["b"], jax.Array)
        for x, y in ((x5, x3), (x5[0], x3[1])):  # several rows, and the single row of an RL policy
            np.testing.assert_allclose(esx.dense(x, prepared["w_in_out"]), x @ dense["w_in_out"], rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(esx.dense(y, prepared["w_out_in"], layout="out_in"),
                                       y @ dense["w_out_in"].T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(esx.embed(ids, prepared["emb"]), dense["emb"][ids], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(esx.value(prepared["w_in_out"]), dense["w_in_out"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(prepared["b"], esx.value(view["b"]))
    # The perturbation is really there (not a silent no-op).
    d0 = materialise(strategy, state, 0)
    assert float(jnp.abs(d0["w_in_out"] - params["w_in_out"]).max()) > 1e-2


def test_ops_on_plain_arrays_are_ordinary_ops():
    p = small_params()
    x = jnp.ones((2, 5))
    np.testing.assert_allclose(esx.dense(x, p["w_in_out"]), x @ p["w_in_out"])
    np.testing.assert_allclose(esx.dense(jnp.ones((2, 3)), p["w_out_in"], layout="out_in"),
                               jnp.ones((2, 3)) @ p["w_out_in"].T)
    np.testing.assert_array_equal(esx.embed(jnp.array([1, 2]), p["emb"]), p["emb"][jnp.array([1, 2])])
    with pytest.raises(ValueError, match="layout"):
        esx.dense(x, p["w_in_out"], layout="nope")


@pytest.mark.parametrize("m,n", [(4, 32), (32, 2), (3, 64), (64, 1), (12, 12)])
@pytest.mark.parametrize("rank", [1, 3])
def test_single_row_dense_matches_float64_reference_under_vmap(m, n, rank):
    """One input row per member (an RL policy's step): the CPU forms of ``dense`` (multiply-adds for a tiny input
    dimension, column dot products for a tiny output) equal ``x @ W`` in float64, for plain shared weights,
    per-member plain weights (full-rank ES), LowRank and prepared SplitLowRank leaves, in both layouts."""
    k = jax.random.split(jax.random.key(m * 100 + n + rank), 5)
    pop = 6
    x = jax.random.normal(k[0], (pop, m))
    w = jax.random.normal(k[1], (m, n))
    a, b = jax.random.normal(k[2], (pop, m, rank)), jax.random.normal(k[3], (pop, n, rank))
    coef = jnp.linspace(-0.5, 0.5, pop)
    per_member = jax.random.normal(k[4], (pop, m, n))
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    pert = w64 + np.asarray(coef, np.float64)[:, None, None] * np.einsum(
        "pmr,pnr->pmn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    want = np.einsum("pm,pmn->pn", x64, pert)

    lowrank = jax.jit(jax.vmap(lambda x, a, b, c: esx.dense(x, esx.LowRank(w, a, b, c))))
    split = jax.jit(jax.vmap(lambda x, a, b, c: esx.dense(x, esx.prepare(esx.LowRank(w, a, b, c)))))
    out_in = jax.jit(jax.vmap(lambda x, a, b, c: esx.dense(x, esx.LowRank(w.T, b, a, c), layout="out_in")))
    for f in (lowrank, split, out_in):
        np.testing.assert_allclose(f(x, a, b, coef), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda x: esx.dense(x, w)))(x), x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(esx.dense))(x, per_member),
                               np.einsum("pm,pmn->pn", x64, np.asarray(per_member, np.float64)),
                               rtol=1e-5, atol=1e-5)


def test_single_row_dense_on_cpu_uses_no_matrix_product_for_a_tiny_input():
    """The CPU form really is taken: a population's one-row ``dense`` with a 4-wide input (plain, per-member or
    low-rank weights) compiles to elementwise code, with no dot left (``docs/results_history.md`` has the speed-up)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only formulation")
    x, w = jnp.ones((8, 4)), jnp.ones((4, 32))
    a, b, c = jnp.ones((8, 4, 1)), jnp.ones((8, 32, 1)), jnp.ones(8)
    cases = [
        (jax.vmap(lambda x: esx.dense(x, w)), (x,)),
        (jax.vmap(esx.dense), (x, jnp.ones((8, 4, 32)))),
        (jax.vmap(lambda x, a, b, c: esx.dense(x, esx.LowRank(w, a, b, c))), (x, a, b, c)),
    ]
    for f, args in cases:
        hlo = jax.jit(f).lower(*args).compile().as_text()
        assert " dot(" not in hlo and "ynn_fusion" not in hlo, hlo[:2000]
    # ... while several rows (a sequence) keep the matrix product.
    hlo = jax.jit(lambda x: esx.dense(x, w)).lower(x).compile().as_text()
    assert " dot(" in hlo or "ynn_fusion" in hlo


def test_prepare_splits_rank_one_and_keeps_stacked_and_plain_leaves():
    """Rank-1 matrices are split too (in a scan XLA:CPU copied the loop-invariant ``a[:, 0]`` at every step), with
    the same ``dense`` values on one row and on several; stacked leaves (``lax.scan`` slices them later) and plain
    arrays pass unchanged."""
    stacked = esx.LowRank(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 2)), jnp.ones((2, 4, 2)), jnp.ones(2))
    k = jax.random.split(jax.random.key(0), 4)
    rank1 = esx.LowRank(jax.random.normal(k[0], (3, 4)), jax.random.normal(k[1], (3, 1)),
                        jax.random.normal(k[2], (4, 1)), jnp.asarray(0.3))
    out = esx.prepare({"s": stacked, "r1": rank1, "p": jnp.arange(3.0)})
    assert out["s"] is stacked
    assert isinstance(out["r1"], esx.SplitLowRank) and len(out["r1"].a) == 1 and out["r1"].a[0].shape == (3,)
    for x in (jax.random.normal(k[3], (3,)), jax.random.normal(k[3], (5, 3))):
        np.testing.assert_allclose(esx.dense(x, out["r1"]), esx.dense(x, rank1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["p"], jnp.arange(3.0))


def test_open_es_forward_is_full_rank_perturbation():
    params = {"w": jnp.zeros((6, 6))}
    strategy = esx.open_es(population_size=2, sigma=1.0, optimizer=optax.sgd(1.0))
    state = strategy.init(jax.random.key(0), params)
    w = materialise(strategy, state, 0)["w"]
    assert np.linalg.matrix_rank(np.asarray(w)) == 6
    np.testing.assert_allclose(materialise(strategy, state, 1)["w"], -w, rtol=1e-6)


# ---------------------------------------------------------------- update identity
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("antithetic", [True, False])
def test_update_equals_dense_reference(name, antithetic):
    params = small_params()
    n, sigma = 8, 0.25
    strategy = STRATEGIES[name](population_size=n, sigma=sigma, optimizer=optax.sgd(1.0),
                                shaping="identity", antithetic=antithetic, rank=3)
    state = strategy.init(jax.random.key(3), params)
    fitness = jax.random.normal(jax.random.key(4), (n,))
    # Reference: g = Σ f_i s_i E_i / (N σ), from materialised members: s_i E_i = (θ_i - θ) / σ.
    ref = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(n):
        member = materialise(strategy, state, i)
        ref = jax.tree_util.tree_map(lambda r, m, p: r + fitness[i] * (m - p) / sigma, ref, member, params)
    ref = jax.tree_util.tree_map(lambda r: r / (n * sigma), ref)
    new_state, metrics = strategy.tell(state, fitness)
    got = jax.tree_util.tree_map(lambda new, old: new - old, new_state.params, params)
    for k in params:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    grads = strategy.gradient(state, fitness)
    for k in params:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert int(new_state.generation) == 1 and int(metrics.generation) == 0


def test_antithetic_pairs_see_opposite_noise_and_equal_fitness_gives_zero_update():
    params = small_params()
    strategy = esx.eggroll(population_size=8, sigma=0.5, rank=2, optimizer=optax.sgd(1.0), shaping="z_score")
    state = strategy.init(jax.random.key(0), params)
    for k in range(4):
        plus, minus = materialise(strategy, state, 2 * k), materialise(strategy, state, 2 * k + 1)
        for name in params:
            np.testing.assert_allclose(plus[name] - params[name], -(minus[name] - params[name]), atol=1e-6)
    new_state, _ = strategy.tell(state, jnp.full((8,), 3.0))
    chex.assert_trees_all_equal(new_state.params, params)


def test_update_of_64x64_matrix_has_full_rank():
    strategy = esx.eggroll(population_size=64, sigma=0.1, rank=2, optimizer=optax.sgd(1.0), shaping="identity")
    state = strategy.init(jax.random.key(0), {"w": jnp.zeros((64, 64))})
    g = strategy.gradient(state, jax.random.normal(jax.random.key(1), (64,)))["w"]
    assert np.linalg.matrix_rank(np.asarray(g, np.float64), tol=1e-6) == 64  # N·r/2 pairs·r = 64
    single = materialise(strategy, state, 0)["w"]
    assert np.linalg.matrix_rank(np.asarray(single, np.float64), tol=1e-6) == 2


# ---------------------------------------------------------------- determinism and noise identity
_SAME_KEY_RUN = """
import hashlib, jax, jax.numpy as jnp, numpy as np, optax, esx
k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
params = {"w_in_out": jax.random.normal(k1, (5, 3)), "w_out_in": jax.random.normal(k2, (4, 3)),
          "emb": jax.random.normal(k3, (7, 3)), "b": jnp.arange(4.0)}
strategy = esx.eggroll(population_size=16, sigma=0.1, rank=2, optimizer=optax.adam(0.01))
fit = lambda p, k, d: -jnp.sum(esx.value(p["b"]) ** 2) - jnp.sum(esx.dense(d, p["w_in_out"]) ** 2)
state = strategy.init(jax.random.key(7), params)
for g in range(4):
    state, _ = esx.step(strategy, state, fit, jax.random.key(g), jnp.ones((1, 5)))
leaves = jax.tree_util.tree_leaves((state.params, state.opt_state, state.sigma, state.generation))
digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()
"""


def test_same_key_gives_bit_identical_state():
    """The same key and fitness give the same state bit for bit: here and in a fresh process with another Python
    hash seed (dict and set orders, leaf paths), compared by a digest of every leaf."""
    scope: dict = {}
    exec(_SAME_KEY_RUN, scope)
    assert not np.allclose(np.asarray(scope["state"].params["b"]), np.arange(4.0))   # it trained
    code = _SAME_KEY_RUN + "\nprint(digest)"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"})
        assert out.stdout.strip().splitlines()[-1] == scope["digest"]


def test_adding_or_reordering_leaves_keeps_noise_of_existing_leaves():
    base = {"x": {"w": jnp.zeros((4, 3))}, "y": jnp.zeros(3)}
    bigger = {"a_new": jnp.zeros((9, 2)), "x": {"w": jnp.zeros((4, 3)), "extra": jnp.zeros(5)},
              "y": jnp.zeros(3), "z": [jnp.zeros(2)]}
    s = esx.eggroll(population_size=4, sigma=1.0, rank=2, optimizer=optax.sgd(1.0))
    m1 = materialise(s, s.init(jax.random.key(5), base), 2)
    m2 = materialise(s, s.init(jax.random.key(5), bigger), 2)
    np.testing.assert_array_equal(m1["x"]["w"], m2["x"]["w"])
    np.testing.assert_array_equal(m1["y"], m2["y"])
    # ... and a different base key does change it.
    m3 = materialise(s, s.init(jax.random.key(6), base), 2)
    assert not np.allclose(m1["x"]["w"], m3["x"]["w"])


def test_member_noise_depends_only_on_its_id():
    """The population forward (all members at once) equals member-by-member evaluation."""
    params = small_params()
    s = esx.eggroll(population_size=8, sigma=0.2, rank=2, optimizer=optax.sgd(1.0))
    state = s.init(jax.random.key(0), params)
    x = jnp.ones((1, 5))
    fit = lambda p, k, d: jnp.sum(esx.dense(d, p["w_in_out"]))
    all_f = s.evaluate(state, fit, jax.random.key(0), x)
    for i in range(8):
        ref = jnp.sum(x @ materialise(s, state, i)["w_in_out"])
        np.testing.assert_allclose(all_f[i], ref, rtol=1e-5)
    part = s.evaluate(state, fit, jax.random.key(0), x, pairs=jnp.array([3, 1]))
    chex.assert_trees_all_close(part, all_f[jnp.array([6, 7, 2, 3])], rtol=1e-6)


@pytest.mark.parametrize("reuse", [0, 1, 3])
def test_noise_reuse(reuse):
    s = esx.eggroll(population_size=2, sigma=1.0, rank=1, optimizer=optax.sgd(0.0), noise_reuse=reuse)
    state = s.init(jax.random.key(0), {"w": jnp.zeros((3, 3))})
    seen = []
    for g in range(7):
        seen.append(np.asarray(materialise(s, state.replace(generation=jnp.int32(g)), 0)["w"]))
    block = (lambda g: 0) if reuse == 0 else (lambda g: g // reuse)   # reuse=0: one noise for every generation
    for g in range(7):
        for h in range(7):
            assert np.array_equal(seen[g], seen[h]) == (block(g) == block(h)), (reuse, g, h)


def test_stacked_layers_get_independent_noise_per_slice_and_scan():
    layers, d = 3, 4
    params = {"w": jnp.zeros((layers, d, d))}
    s = esx.eggroll(population_size=2, sigma=1.0, rank=1, optimizer=optax.sgd(1.0))
    state = s.init(jax.random.key(0), params)
    w = np.asarray(materialise(s, state, 0)["w"])
    assert all(np.linalg.matrix_rank(w[i]) == 1 for i in range(layers))
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
    pop = s.ask(state)
    view = s.view(state, pop, 0)

    def body(h, layer):
        return jnp.tanh(esx.dense(h, layer)), None

    x = jnp.arange(1.0, 5.0)[None]
    got, _ = jax.lax.scan(body, x, view["w"])
    ref = x
    for i in range(layers):
        ref = jnp.tanh(ref @ w[i])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- compile hygiene
def test_second_step_does_not_recompile_and_sigma_vmap_compiles_once():
    params = {"w": jnp.zeros((3, 2))}
    s = esx.eggroll(population_size=8, sigma=0.1, rank=1, optimizer=optax.sgd(0.1))
    state = s.init(jax.random.key(0), params)
    x = jnp.ones((2, 3))
    chex.clear_trace_counter()

    # The fitness function is traced once per compilation of esx.step: a retrace would fail here.
    @chex.assert_max_traces(n=1)
    def fit(p, k, d):
        return -jnp.sum((esx.dense(d, p["w"]) - 1.0) ** 2)

    state, _ = esx.step(s, state, fit, jax.random.key(0), x)
    before = esx.step._cache_size()
    state, _ = esx.step(s, state, fit, jax.random.key(1), x)
    state, _ = esx.step(s, state.replace(sigma=jnp.float32(0.3)), fit, jax.random.key(2), x)
    assert esx.step._cache_size() == before

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sweep(st, sigmas):
        fit2 = lambda p, k, d: -jnp.sum((esx.dense(d, p["w"]) - 1.0) ** 2)
        return jax.vmap(lambda sg: esx.step(s, st.replace(sigma=sg), fit2, jax.random.key(2), x)[0].params)(sigmas)

    out1 = sweep(state, jnp.array([0.01, 0.1, 1.0]))
    out2 = sweep(state, jnp.array([0.02, 0.2, 2.0]))
    assert out1["w"].shape == (3, 3, 2)
    # Different σ really give different updates.
    assert not np.allclose(out1["w"][0], out1["w"][2]) and not np.allclose(out1["w"][0], out2["w"][0])


def test_tell_and_evaluate_trace_once_across_generations():
    """A jitted ``tell`` / ``evaluate`` is traced once for a whole run: the generation, σ and the fitness are
    leaves, not static values (both strategy families)."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    for s in (esx.eggroll(population_size=8, sigma=0.1, optimizer=optax.adam(0.1)),
              esx.open_es(population_size=8, sigma=0.1, optimizer=optax.adam(0.1))):
        chex.clear_trace_counter()  # chex counts traces by source location: one count per strategy
        tell = jax.jit(chex.assert_max_traces(s.tell, n=1))
        fit = lambda p, k, d: jnp.sum(esx.dense(d, p["w"])) + jnp.sum(esx.value(p["b"]))
        evaluate = jax.jit(chex.assert_max_traces(lambda st, k: s.evaluate(st, fit, k, jnp.ones((1, 3))), n=1))
        state = s.init(jax.random.key(0), params)
        for g in range(3):
            state, _ = tell(state, evaluate(state, jax.random.key(g)))
        assert int(state.generation) == 3
    chex.clear_trace_counter()
    s = esx.int_eggroll.int_eggroll(population_size=8)
    tell = jax.jit(chex.assert_max_traces(s.tell, n=1))
    state = s.init(jax.random.key(0), {"w": jnp.zeros((4, 4), jnp.int8)})
    for g in range(3):
        state, _ = tell(state, jax.random.randint(jax.random.key(g), (8,), 0, 9))


def test_sigma_schedule_is_followed():
    sched = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    s = esx.eggroll(population_size=4, sigma=sched, rank=1, optimizer=optax.sgd(0.0))
    state = s.init(jax.random.key(0), {"w": jnp.zeros((2, 2))})
    sig = []
    for _ in range(3):
        state, m = s.tell(state, jnp.arange(4.0))
        sig.append(float(m.sigma))
    np.testing.assert_allclose(sig, [0.5, 0.25, 0.125])


# ---------------------------------------------------------------- convergence
def test_converges_on_quadratic():
    target = jax.random.normal(jax.random.key(0), (16, 16))
    s = esx.eggroll(population_size=64, sigma=0.05, rank=4, optimizer=optax.adam(0.05))
    state = s.init(jax.random.key(1), {"w": jnp.zeros((16, 16))})
    fit = lambda p, k, d: -jnp.mean((esx.value(p["w"]) - d) ** 2)
    loss0 = float(jnp.mean(target**2))

    @jax.jit
    def run(state):
        def body(st, _):
            st, m = esx.step(s, st, fit, jax.random.key(0), target)
            return st, m.fitness_mean
        return jax.lax.scan(body, state, None, length=400)

    state, _ = run(state)
    loss = float(jnp.mean((state.params["w"] - target) ** 2))
    assert loss < 0.01 * loss0, (loss, loss0)


def test_fits_small_mlp_regression():
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (64, 1), minval=-2, maxval=2)
    y = jnp.sin(2 * x)

    def mlp(p, x):
        h = jnp.tanh(esx.dense(x, p["w1"]) + esx.value(p["b1"]))
        return esx.dense(h, p["w2"]) + esx.value(p["b2"])

    k1, k2 = jax.random.split(kt)
    params = {"w1": jax.random.normal(k1, (1, 32)), "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 1)) / 6, "b2": jnp.zeros(1)}
    mse0 = float(jnp.mean((mlp(params, x) - y) ** 2))
    s = esx.eggroll(population_size=256, sigma=0.03, rank=4, optimizer=optax.adam(0.02))
    state = s.init(jax.random.key(1), params)
    fit = lambda p, k, d: -jnp.mean((mlp(p, d[0]) - d[1]) ** 2)

    @jax.jit
    def run(state):
        return jax.lax.scan(lambda st, _: (esx.step(s, st, fit, jax.random.key(0), (x, y))[0], None),
                            state, None, length=600)[0]

    state = run(state)
    mse = float(jnp.mean((mlp(state.params, x) - y) ** 2))
    assert mse < 0.03 and mse < 0.1 * mse0, (mse, mse0)


# ---------------------------------------------------------------- bias vs rank (O(1/r))
@pytest.mark.slow
def test_lowrank_bias_shrinks_like_one_over_rank():
    """Bias of E[ĝ_r] against the full-rank ES gradient on a bounded fitness; log-log slope <= -0.75.

    fitness(W) = tanh(<C, W> + a) with C = 1/4 (4×4). The full-rank expectation has the closed form (Stein)
    E[ĝ]·C = E[sech²(a + σu)], u ~ N(0, 1), evaluated by Gauss-Hermite quadrature; the low-rank one is
    estimated with 2^20 members per rank (standard error ≈ 1e-3, far below the bias at r = 16).
    """
    sigma, offset = 1.0, 0.5
    x, wts = np.polynomial.hermite_e.hermegauss(80)
    ref = float(np.sum(wts / np.cosh(offset + sigma * x) ** 2) / np.sqrt(2 * np.pi))
    fit = lambda p, k, d: jnp.tanh(jnp.sum(esx.value(p["w"])) / 4 + offset)
    ranks, bias = [1, 2, 4, 8, 16], []
    for r in ranks:
        s = esx.eggroll(population_size=1 << 15, sigma=sigma, rank=r, optimizer=optax.sgd(1.0),
                        shaping="identity")
        state = s.init(jax.random.key(r), {"w": jnp.zeros((4, 4))})

        @jax.jit
        def proj(st):
            g = s.gradient(st, s.evaluate(st, fit, jax.random.key(0)))["w"]
            return jnp.sum(g) / 4

        est = np.mean([float(proj(state.replace(generation=jnp.int32(g)))) for g in range(32)])
        bias.append(abs(est - ref))
    slope = np.polyfit(np.log(ranks), np.log(bias), 1)[0]
    assert slope <= -0.75, (slope, bias)


# ---------------------------------------------------------------- shaping
def test_shaping_values():
    f = jnp.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(esx.shaping.centered_rank(f), [0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(esx.shaping.z_score(f), (f - 2.0) / np.sqrt(0.5 + 1e-5), rtol=1e-6)
    g = esx.shaping.group_z_score(2)(jnp.array([1.0, 3.0, 10.0, 14.0]))
    std = np.std([1.0, 3.0, 10.0, 14.0])
    np.testing.assert_allclose(g, np.array([-1, 1, -2, 2]) / np.sqrt(std**2 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(esx.shaping.pair_sign(jnp.array([1.0, 2.0, 5.0, 4.0, 3.0, 3.0])),
                               [-1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(esx.shaping.identity(f), f)


def test_nonfinite_policy_in_shaping():
    f = jnp.array([1.0, jnp.nan, 3.0, -jnp.inf, jnp.inf, 2.0])
    r = esx.shaping.centered_rank(f)
    # NaN / ±inf become the worst finite value (1.0); the four tied 1.0s share ranks 0..3 (mean 1.5):
    # 1.5 / 5 - 0.5 = -0.2; 2.0 has rank 4 -> 0.3; 3.0 has rank 5 -> 0.5.
    np.testing.assert_allclose(r, [-0.2, -0.2, 0.5, -0.2, -0.2, 0.3], atol=1e-6)
    # every shaping sees NaN / +inf / -inf as the worst finite value, bit for bit
    clean = jnp.array([1.0, 1.0, 3.0, 1.0, 1.0, 2.0])
    for shape in [*esx.shaping.SHAPINGS.values(), esx.shaping.group_z_score(2), esx.shaping.group_z_score(3)]:
        np.testing.assert_array_equal(shape(f), shape(clean))
        assert np.all(np.isfinite(shape(f)))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("shaping", ["centered_rank", "z_score", "identity", "pair_sign", "group_z_score"])
def test_ten_percent_nan_fitness_keeps_state_finite(name, shaping):
    params = small_params()
    groups = {"group_size": 4} if shaping == "group_z_score" else {}
    s = STRATEGIES[name](population_size=40, sigma=0.1, optimizer=optax.adam(0.1), shaping=shaping, **groups)
    state = s.init(jax.random.key(0), params)
    for g in range(5):
        f = jax.random.normal(jax.random.key(g), (40,))
        nan = jax.random.choice(jax.random.key(100 + g), 40, (4,), replace=False)
        f = f.at[nan].set(jnp.nan)
        state, m = s.tell(state, f)
        assert int(m.num_nonfinite) == 4
        finite = np.delete(np.asarray(f), np.asarray(nan))          # the statistics are the finite entries'
        assert float(m.fitness_mean) == pytest.approx(finite.mean(), rel=1e-5, abs=1e-6)
        assert float(m.fitness_max) == finite.max() and float(m.fitness_min) == finite.min()
    for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                          jax.tree_util.tree_leaves(params)))
    # All non-finite: the generation is skipped, nothing lost (not even Adam's momentum step).
    state2, m = s.tell(state, jnp.full((40,), jnp.nan))
    assert int(m.num_nonfinite) == 40 and bool(m.skipped)
    for a, b in zip(jax.tree_util.tree_leaves(state2.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_overflowing_update_is_skipped_not_applied():
    s = esx.eggroll(population_size=4, sigma=1e-30, rank=1, optimizer=optax.sgd(1e30), shaping="identity")
    state = s.init(jax.random.key(0), {"w": jnp.ones((2, 2))})
    new, m = s.tell(state, jnp.array([1e30, -1e30, 1e30, -1e30]))
    assert bool(m.skipped)
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    assert int(new.generation) == 1


# ---------------------------------------------------------------- labels
def test_labels_default_overrides_and_frozen():
    params = {"enc": {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}, "head": jnp.ones((3, 2))}
    labels = esx.make_labels(params)
    assert labels == {"enc": {"w": "lowrank", "b": "full"}, "head": "lowrank"}
    labels = esx.make_labels(params, {"head": "frozen", "enc/*": "full"})
    assert labels == {"enc": {"w": "full", "b": "full"}, "head": "frozen"}
    s = esx.eggroll(population_size=4, sigma=0.5, optimizer=optax.sgd(1.0), labels={"head": "frozen"})
    state = s.init(jax.random.key(0), params)
    m = materialise(s, state, 0)
    np.testing.assert_array_equal(m["head"], params["head"])
    new, _ = s.tell(state, jnp.arange(4.0))
    np.testing.assert_array_equal(new.params["head"], params["head"])
    assert not np.array_equal(new.params["enc"]["w"], params["enc"]["w"])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(population_size=5), "odd"),
    (dict(population_size=6, group_size=4), "group_size"),
    (dict(rank=0), "rank"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(noise_reuse=-1), "noise_reuse"),
    (dict(noise_source="gaussian"), "noise_source"),
    (dict(shaping="ranks"), "shaping"),
    (dict(population_size=0), "population_size"),
])
def test_bad_construction_raises_naming_the_option(kwargs, match):
    base = dict(population_size=8, sigma=0.1, optimizer=optax.sgd(0.1), rank=1)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        esx.eggroll(**base)


def test_bad_params_labels_and_fitness():
    s = esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="int32"):
        s.init(jax.random.key(0), {"w": jnp.ones((2, 2), jnp.int32)})
    with pytest.raises(ValueError, match="match no parameter"):
        esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1),
                    labels={"wieght": "frozen"}).init(jax.random.key(0), {"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="does not match"):
        esx.eggroll(population_size=4, sigma=0.1, optimizer=optax.sgd(0.1),
                    labels={"w": {"x": "full"}}).init(jax.random.key(0), {"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="ndim"):
        esx.make_labels({"b": jnp.ones(3)}, {"b": "lowrank"})
    state = s.init(jax.random.key(0), {"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        s.tell(state, jnp.ones(5))
    with pytest.raises(TypeError, match="dtype"):
        s.tell(state, jnp.ones(4, jnp.complex64))
    with pytest.raises(TypeError, match="dtype"):
        s.tell(state, jnp.ones(4, bool))
    with pytest.raises(ValueError, match="scalar"):
        s.evaluate(state, lambda p, k, d: jnp.ones(3), jax.random.key(0))


def test_groups_share_keys_and_data():
    """README: ``fitness_fn`` gets ``key = fold_in(key, member // group_size)``, and with ``data_per_group`` the
    group's slice of the data (groups of 4 here: larger than the antithetic pairs)."""
    s = esx.eggroll(population_size=8, sigma=0.1, optimizer=optax.sgd(0.1), group_size=4)
    state = s.init(jax.random.key(0), {"w": jnp.zeros((2, 2))})
    key = jax.random.key(3)
    f = s.evaluate(state, lambda p, k, d: jax.random.uniform(k) + d, key, jnp.array([10.0, 20.0]),
                   data_per_group=True)
    member = jnp.arange(8)
    want = jax.vmap(lambda m: jax.random.uniform(jax.random.fold_in(key, m // 4)))(member) + jnp.where(
        member < 4, 10.0, 20.0)
    np.testing.assert_array_equal(f, want)
    assert float(f[0]) != float(f[4]) - 10.0     # the two groups' keys differ
    for order in ("signs_outer", "pairs_outer"):   # the same keys whatever the member layout and batching
        for k in (None, 4):
            t = esx.eggroll(population_size=8, sigma=0.1, optimizer=optax.sgd(0.1), group_size=4,
                            member_order=order, member_batch=k)
            np.testing.assert_array_equal(t.evaluate(state, lambda p, k, d: jax.random.uniform(k) + d, key,
                                                     jnp.array([10.0, 20.0]), data_per_group=True), want)
    with pytest.raises(ValueError, match="leading axis of 2"):
        s.evaluate(state, lambda p, k, d: d, jax.random.key(3), jnp.ones(3), data_per_group=True)


def test_paper_learning_rate_conversion():
    # The paper's SGD step lr_p · √N σ² g equals esx's step with the converted rate.
    assert esx.paper_learning_rate(0.1, sigma=0.2, population_size=2048) == pytest.approx(
        0.1 * math.sqrt(2048) * 0.04)


def test_import_esx_is_light():
    code = ("import sys, esx; heavy = [m for m in ('flax', 'orbax', 'gymnax', 'evosax', 'tqdm', 'matplotlib',"
            " 'torch', 'chex') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples_run():
    import doctest

    res = doctest.testmod(sys.modules["esx.eggroll"], raise_on_error=False)
    assert res.attempted > 0 and res.failed == 0


def test_population_noise_follows_the_documented_key_formula():
    """ask()'s factors are lowrank_factors(member_key(key, path, generation, pair)) exactly."""
    params = {"enc": {"w": jnp.zeros((5, 3))}, "b": jnp.zeros(4)}
    s = esx.eggroll(population_size=6, sigma=0.5, rank=2, optimizer=optax.sgd(1.0), noise_reuse=2)
    state = s.init(jax.random.key(11), params).replace(generation=jnp.int32(5))
    pop = s.ask(state)
    flat_paths = esx.labels.leaf_paths(params)  # ["b", "enc/w"]
    for pair in range(3):
        k_w = esx.noise.member_key(state.key, "enc/w", state.generation, pair, 2)
        a, b = esx.noise.lowrank_factors(k_w, (5, 3), 2, jnp.float32, "normal")
        got_a, got_b = pop.noise[flat_paths.index("enc/w")]
        np.testing.assert_array_equal(got_a[pair], a)
        np.testing.assert_array_equal(got_b[pair], b)
        k_b = esx.noise.member_key(state.key, "b", state.generation, pair, 2)
        np.testing.assert_array_equal(pop.noise[flat_paths.index("b")][pair],
                                      esx.noise.full_noise(k_b, (4,), jnp.float32, "normal"))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("source", SOURCES)
def test_noise_key_formula_for_every_strategy_and_source(name, source):
    """docs/distributed.md: every pair's noise of a leaf is drawn from ``member_key(key, path, generation, pair,
    noise_reuse)``: low-rank factors (``lowrank_factors``) for EGGROLL's matrices, ``full_noise`` for OpenES's
    matrices and every vector; for every noise source."""
    params = {"enc": {"w": jnp.zeros((5, 3))}, "b": jnp.zeros(4)}
    s = STRATEGIES[name](population_size=6, sigma=0.5, optimizer=optax.sgd(1.0), noise_reuse=2,
                         noise_source=source, table_size=1 << 10)
    state = s.init(jax.random.key(11), params).replace(generation=jnp.int32(5))
    pop = s.ask(state)
    paths = esx.labels.leaf_paths(params)   # ["b", "enc/w"]
    for pair in range(3):
        k_w = esx.noise.member_key(state.key, "enc/w", state.generation, pair, 2)
        if name == "eggroll":
            a, b = esx.noise.lowrank_factors(k_w, (5, 3), 2, jnp.float32, source, state.table)
            np.testing.assert_array_equal(pop.noise[paths.index("enc/w")][0][pair], a)
            np.testing.assert_array_equal(pop.noise[paths.index("enc/w")][1][pair], b)
        else:
            np.testing.assert_array_equal(pop.noise[paths.index("enc/w")][pair],
                                          esx.noise.full_noise(k_w, (5, 3), jnp.float32, source, state.table))
        k_b = esx.noise.member_key(state.key, "b", state.generation, pair, 2)
        np.testing.assert_array_equal(pop.noise[paths.index("b")][pair],
                                      esx.noise.full_noise(k_b, (4,), jnp.float32, source, state.table))
    # generation 4 is in the same reuse block (4 // 2 == 5 // 2): the same noise; generation 6 is not
    same = s.ask(state.replace(generation=jnp.int32(4)))
    other = s.ask(state.replace(generation=jnp.int32(6)))
    chex.assert_trees_all_equal(same.noise, pop.noise)
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(other.noise)[0]),
                              np.asarray(jax.tree_util.tree_leaves(pop.noise)[0]))


def test_stacked_full_leaves_scan_like_lowrank_ones():
    """A perturbed bias stack [layers, d] slices under lax.scan (Full.coef has one entry per row)."""
    params = {"w": jnp.zeros((3, 4, 4)), "b": jnp.ones((3, 4))}
    s = esx.eggroll(population_size=2, sigma=0.5, rank=1, optimizer=optax.sgd(1.0), labels={"b": "full"})
    state = s.init(jax.random.key(0), params)
    view = s.view(state, s.ask(state), 1)
    dense = materialise(s, state, 1)

    def body(h, layer):
        w, b = layer
        return jnp.tanh(esx.dense(h, w) + esx.value(b)), None

    x = jnp.arange(1.0, 5.0)[None]
    got, _ = jax.lax.scan(body, x, (view["w"], view["b"]))
    ref = x
    for i in range(3):
        ref = jnp.tanh(ref @ dense["w"][i] + dense["b"][i])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(dense["b"], params["b"])


# ---------------------------------------------------------------- with and without jit (chex.variants)
class WithAndWithoutJitTest(chex.TestCase):
    """The core identities hold both eagerly and under ``jit``: evaluate and tell against a dense reference."""

    def setUp(self):
        super().setUp()
        self.params = small_params()
        self.x = jax.random.normal(jax.random.key(2), (2, 5))

    def fit(self, p, key, d):
        return jnp.sum(jnp.tanh(esx.dense(d, p["w_in_out"]))) + jnp.sum(esx.value(p["b"]) ** 2)

    def dense_fit(self, p, d):
        return jnp.sum(jnp.tanh(d @ p["w_in_out"])) + jnp.sum(p["b"] ** 2)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("eggroll", True), ("eggroll", False), ("open_es", True))
    def test_evaluate_equals_dense_reference(self, name, antithetic):
        s = STRATEGIES[name](population_size=6, sigma=0.3, optimizer=optax.sgd(1.0), antithetic=antithetic, rank=2)
        state = s.init(jax.random.key(1), self.params)
        got = self.variant(lambda st: s.evaluate(st, self.fit, jax.random.key(0), self.x))(state)
        chex.assert_shape(got, (6,))
        want = jnp.stack([self.dense_fit(materialise(s, state, i), self.x) for i in range(6)])
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        part = self.variant(lambda st: s.evaluate(st, self.fit, jax.random.key(0), self.x,
                                                  pairs=jnp.array([2, 0])))(state)
        members = [4, 5, 0, 1] if antithetic else [2, 0]
        chex.assert_trees_all_close(part, want[jnp.array(members)], rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("eggroll", "open_es")
    def test_tell_equals_dense_reference(self, name):
        n, sigma = 8, 0.25
        s = STRATEGIES[name](population_size=n, sigma=sigma, optimizer=optax.sgd(1.0), shaping="identity", rank=3)
        state = s.init(jax.random.key(3), self.params)
        fitness = jax.random.normal(jax.random.key(4), (n,))
        ref = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        for i in range(n):
            member = materialise(s, state, i)
            ref = jax.tree_util.tree_map(lambda r, m, p: r + fitness[i] * (m - p) / sigma, ref, member, self.params)
        ref = jax.tree_util.tree_map(lambda r: r / (n * sigma), ref)
        new_state, metrics = self.variant(s.tell)(state, fitness)
        got = jax.tree_util.tree_map(lambda new, old: new - old, new_state.params, self.params)
        chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-5)
        # gradient over two disjoint halves of the pairs sums to the whole estimate (the sharded "reduce" path).
        grad = self.variant(lambda st, f, p: s.gradient(st, f, pairs=p))
        halves = [grad(state, fitness, jnp.array([0, 2])), grad(state, fitness, jnp.array([1, 3]))]
        chex.assert_trees_all_close(jax.tree_util.tree_map(jnp.add, *halves), ref, rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_equal(metrics.generation, jnp.int32(0))
