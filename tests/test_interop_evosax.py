"""esx.interop.evosax: EGGROLL as an evosax strategy, run through evosax's own ask-eval-tell loop on its problems
(BBOB, a gymnax control task), equal member by member and update by update to the native esx strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

pytest.importorskip("evosax")

from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm  # noqa: E402
from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn  # noqa: E402
from evosax.problems import BBOBProblem  # noqa: E402

import esx  # noqa: E402
from esx.interop.evosax import EGGROLL, Params, State  # noqa: E402


def evosax_loop(es, problem, solution_mean, key, num_generations, *, to_problem=lambda pop: pop, sign=1.0):
    """evosax's loop as its README writes it (the strategy is the only thing swapped); ``to_problem`` maps the
    population to the problem's input, ``sign=-1`` turns a return into a loss. Returns ``(state, per-generation
    mean fitness)``."""
    key, key_problem, key_init = jax.random.split(key, 3)
    problem_state = problem.init(key_problem)
    params = es.default_params
    state = es.init(key_init, solution_mean, params)
    history = []
    for _ in range(num_generations):
        key, key_ask, key_eval, key_tell = jax.random.split(key, 4)
        population, state = es.ask(key_ask, state, params)
        fitness, problem_state, _ = problem.eval(key_eval, to_problem(population), problem_state)
        state, metrics = es.tell(key_tell, population, sign * fitness, state, params)
        history.append(float(jnp.mean(fitness)))
    return state, history


def test_bbob_sphere_through_evosax_loop():
    """BBOB sphere in 16-D with a 4x4 matrix solution (low-rank noise; the population is reshaped to the problem's
    [N, 16]) reaches < 1% of the starting loss."""
    n, d = 32, 16
    problem = BBOBProblem(fn_name="sphere", num_dims=d, f_opt=0.0, seed=0)
    start = problem.sample(jax.random.key(1))                       # float[16] in [-5, 5]
    f_start = float(jnp.sum((start - problem.x_opt) ** 2))
    es = EGGROLL(population_size=n, solution=jnp.zeros((4, 4)), sigma=0.3, optimizer=optax.adam(0.3))
    assert isinstance(es, DistributionBasedAlgorithm) and isinstance(es.default_params, Params)

    state, _ = evosax_loop(es, problem, start.reshape(4, 4), jax.random.key(0), 60,
                           to_problem=lambda pop: pop.reshape(n, d))
    assert isinstance(state, State)
    final = float(jnp.sum((es.get_mean(state).reshape(d) - problem.x_opt) ** 2))
    assert final < 0.01 * f_start, (final, f_start)
    assert float(state.best_fitness) < 0.01 * f_start
    assert int(state.generation_counter) == 60
    np.testing.assert_array_equal(state.mean, es.get_mean(state).reshape(d))
    # each member's perturbation of the matrix is rank 1
    population, _ = es.ask(jax.random.key(9), state, es.default_params)
    assert np.linalg.matrix_rank(np.asarray(population[0] - es.get_mean(state)), tol=1e-4) == 1


def test_flat_solution_is_full_rank():
    """A flat float[D] solution (what BBOB problems sample) has no matrix: its one leaf gets full-rank noise
    (Open_ES); the 4x4 form gets EGGROLL's rank-r factors. Checked on the traced shapes (nothing compiles)."""
    key = jax.random.key(0)
    for solution, expect in [(jnp.zeros(16), (8, 16)), (jnp.zeros((4, 4)), ((8, 4, 2), (8, 4, 2)))]:
        es = EGGROLL(population_size=16, solution=solution, rank=2)
        state = jax.eval_shape(es.init, key, solution, es.default_params)
        noise = jax.eval_shape(es.strategy.ask, state.esx_state).noise[0]
        assert jax.tree.map(lambda x: x.shape, noise) == expect


@pytest.mark.slow   # 13-16 s on 2 shared cores (gymnax's problem construction and rollout compile ~9 s of it)
def test_gymnax_cartpole_through_evosax_loop():
    """CartPole-v1 (gymnax, evosax's GymnaxProblem with its MLP policy, a Flax linen pytree): the population mean
    return rises from ~25 to near the 200-step cap in 25 generations (seeds 0-4 reached 200 by generation 20)."""
    pytest.importorskip("gymnax")
    from evosax.problems import MLP, GymnaxProblem
    from evosax.problems.networks import categorical_output_fn

    policy = MLP(layer_sizes=(16, 2), output_fn=categorical_output_fn)
    problem = GymnaxProblem("CartPole-v1", policy=policy, episode_length=200)
    solution = problem.sample(jax.random.key(1))
    es = EGGROLL(population_size=64, solution=solution, sigma=0.1, optimizer=optax.adam(0.05))
    _, history = evosax_loop(es, problem, solution, jax.random.key(0), 25, sign=-1.0)   # evosax minimises
    assert history[0] < 60, history
    assert np.mean(history[-3:]) > 150, history


PARAMS = {"w": jnp.arange(15.0).reshape(5, 3) / 10, "b": jnp.ones(3)}


@pytest.fixture(scope="module")
def small():
    """One small EGGROLL (N=8, rank 2; a low-rank matrix and a full vector) and its first state, shared so that
    init / ask / tell compile once for the tests below."""
    es = EGGROLL(population_size=8, solution=PARAMS, sigma=0.1, optimizer=optax.adam(0.1), rank=2)
    return es, es.init(jax.random.key(3), PARAMS, es.default_params)


def _same(a, b):
    """Two pytrees with equal leaves (NaN equal to NaN, keys by their data)."""
    def data(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return all(bool(jnp.array_equal(data(x), data(y), equal_nan=True))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_equals_native_esx(small):
    """ask's member i = esx.value of strategy.view(.., i) leaf by leaf; tell = esx tell(state, -fitness) exactly."""
    es, state = small
    strategy = es.strategy
    native = strategy.init(jax.random.key(3), PARAMS)
    population, state2 = es.ask(jax.random.key(0), state, es.default_params)
    assert _same(state2, state)
    is_view = lambda x: isinstance(x, (esx.LowRank, esx.Full))  # noqa: E731
    expect = jax.jit(jax.vmap(lambda i: jax.tree.map(esx.value, strategy.view(native, strategy.ask(native), i),
                                                     is_leaf=is_view)))(jnp.arange(8))
    for got, want in zip(jax.tree.leaves(population), jax.tree.leaves(expect)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # the members really are perturbed: member 0 of the matrix leaf differs from the mean by a rank-2 matrix
    assert np.linalg.matrix_rank(np.asarray(population["w"][0] - PARAMS["w"]), tol=1e-5) == 2

    fitness = jax.random.normal(jax.random.key(5), (es.population_size,))
    new_state, metrics = es.tell(jax.random.key(1), population, fitness, state, es.default_params)
    want_state, want_metrics = jax.jit(strategy.tell)(native, -fitness)
    assert _same((new_state.esx_state.params, new_state.esx_state.opt_state),
                 (want_state.params, want_state.opt_state))
    assert int(new_state.esx_state.generation) == 1 and int(new_state.generation_counter) == 1
    np.testing.assert_array_equal(metrics["esx"].grad_norm, want_metrics.grad_norm)
    # evosax's metrics (minimisation): the best member of the generation and its ravelled solution
    best = int(jnp.argmin(fitness))
    assert float(metrics["best_fitness"]) == float(fitness[best]) == float(new_state.best_fitness)
    flat_best = ravel_pytree(jax.tree.map(lambda x: x[best], population))[0]
    np.testing.assert_array_equal(new_state.best_solution, flat_best)


def test_minimises(small):
    """fitness = a loss goes down (the sign is evosax's: guards against maximising it); a NaN member is a failed
    evaluation, never the best solution."""
    es, state = small
    target = {"w": jnp.full((5, 3), 2.0), "b": jnp.full(3, -1.0)}

    def loss(p):
        return sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    start = float(loss(PARAMS))
    key, best = jax.random.key(0), []
    for _ in range(80):
        key, key_ask, key_tell = jax.random.split(key, 3)
        population, state = es.ask(key_ask, state, es.default_params)
        fitness = jax.vmap(loss)(population).at[3].set(jnp.nan)
        state, metrics = es.tell(key_tell, population, fitness, state, es.default_params)
        best.append(float(metrics["best_fitness"]))
    final = float(loss(es.get_mean(state)))
    assert final < 0.02 * start, (final, start)   # init seeds 0-2 reach 0.3-0.6% (without the NaN member)
    assert np.all(np.isfinite(best)) and np.all(np.diff(best) <= 0)


def test_keys_and_determinism(small):
    """The noise comes from init's key: ask's key is ignored, the same init key repeats the population, another
    init key changes it."""
    es, state = small
    p1, _ = es.ask(jax.random.key(0), state, es.default_params)
    p2, _ = es.ask(jax.random.key(1), state, es.default_params)
    assert _same(p1, p2)
    p3, _ = es.ask(jax.random.key(0), es.init(jax.random.key(3), PARAMS, es.default_params), es.default_params)
    assert _same(p1, p3)
    p4, _ = es.ask(jax.random.key(0), es.init(jax.random.key(4), PARAMS, es.default_params), es.default_params)
    assert not _same(p1, p4)


def test_member_batch_same_population(small):
    """member_batch materialises the members in chunks (lax.map): the same population."""
    es, state = small
    batched = EGGROLL(population_size=8, solution=PARAMS, sigma=0.1, optimizer=optax.adam(0.1), rank=2,
                      member_batch=4)
    got, _ = batched.ask(jax.random.key(0), batched.init(jax.random.key(3), PARAMS, batched.default_params),
                         batched.default_params)
    want, _ = es.ask(jax.random.key(0), state, es.default_params)
    assert _same(got, want)


def test_open_es_keywords_and_flat_mean(small):
    """Open_ES's constructor keywords work as aliases (evosax's centered-rank shaping gives esx's update); a flat
    float[D] mean is read as evosax reads it; a σ schedule traces under jit."""
    es, state = small
    alias = EGGROLL(population_size=8, solution=PARAMS, optimizer=optax.adam(0.1), rank=2,
                    use_antithetic_sampling=True, std_schedule=optax.linear_schedule(0.1, 0.05, 10),
                    fitness_shaping_fn=centered_rank_fitness_shaping_fn)
    flat_mean = ravel_pytree(PARAMS)[0]
    alias_state = alias.init(jax.random.key(3), flat_mean, alias.default_params)
    assert _same(alias.get_mean(alias_state), PARAMS)
    population, _ = es.ask(jax.random.key(0), state, es.default_params)
    fitness = jax.random.normal(jax.random.key(5), (8,))
    got, _ = alias.tell(jax.random.key(1), population, fitness, alias_state, alias.default_params)
    want, _ = es.tell(jax.random.key(1), population, fitness, state, es.default_params)
    for a, b in zip(jax.tree.leaves(alias.get_mean(got)), jax.tree.leaves(es.get_mean(want))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(got.std) == pytest.approx(0.095)     # the schedule at generation 1
    with pytest.raises(ValueError, match="std_schedule"):
        EGGROLL(population_size=8, solution=PARAMS, sigma=0.1, std_schedule=optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="fitness_shaping_fn"):
        EGGROLL(population_size=8, solution=PARAMS, shaping="z_score",
                fitness_shaping_fn=centered_rank_fitness_shaping_fn)


def test_bad_input(small):
    es, state = small
    population, _ = es.ask(jax.random.key(0), state, es.default_params)
    with pytest.raises(ValueError, match=r"shape \(8,\).*got \(8, 1\)"):
        es.tell(jax.random.key(1), population, jnp.zeros((8, 1)), state, es.default_params)
    with pytest.raises(ValueError, match=r"shape \(8,\).*got \(4,\)"):
        es.tell(jax.random.key(1), population, jnp.zeros(4), state, es.default_params)
    half = jax.tree.map(lambda x: x[:4], population)
    with pytest.raises(ValueError, match="leading axis of population_size=8"):
        es.tell(jax.random.key(1), half, jnp.zeros(8), state, es.default_params)
    with pytest.raises(ValueError, match="num_dims"):
        es.init(jax.random.key(0), jnp.zeros(5), es.default_params)
    with pytest.raises(ValueError, match="odd"):
        EGGROLL(population_size=7, solution=PARAMS)
