"""The RL plug-in: masked returns, observation statistics, policies, adapters (gymnax and a pure-JAX suite)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import esx
from esx_envs import rl


class Countdown:
    """A pure-JAX test suite implementing :class:`rl.Adapter` with known episodes.

    The reset key draws the episode length ``L`` in ``[2, 9]``; the observation at step ``t`` is ``[t, L]``, the
    reward of step ``t`` is ``t + 1``, the episode terminates after ``L`` steps, so its return is ``L (L + 1) / 2``.
    """

    name = "countdown"
    observation_shape = (2,)
    action_kind = "discrete"
    action_dim = 2
    action_low = action_high = None

    def __init__(self, max_steps=20):
        self.max_steps = max_steps

    def reset(self, key):
        length = jax.random.randint(key, (), 2, 10)
        return jnp.stack([0.0, length.astype(jnp.float32)]), (jnp.int32(0), length)

    def step(self, key, state, action):
        t, length = state
        t1 = t + 1
        obs = jnp.stack([t1.astype(jnp.float32), length.astype(jnp.float32)])
        return obs, (t1, length), t1.astype(jnp.float32), t1 >= length, t1 >= self.max_steps


class Reach:
    """A pure-JAX continuous-action suite: observe a target in [-1, 1], reward ``-(a - target)²`` for 4 steps."""

    name = "reach"
    observation_shape = (1,)
    action_kind = "continuous"
    action_dim = 1
    action_low = np.array([-2.0], np.float32)
    action_high = np.array([2.0], np.float32)
    max_steps = 4

    def reset(self, key):
        target = jax.random.uniform(key, (1,), minval=-1.0, maxval=1.0)
        return target, (jnp.int32(0), target)

    def step(self, key, state, action):
        t, target = state
        reward = -jnp.sum(jnp.square(action - target))
        return target, (t + 1, target), reward, jnp.asarray(False), t + 1 >= self.max_steps


@jax.jit
def _lengths(keys):
    return jax.vmap(lambda k: jax.random.randint(jax.random.split(k)[0], (), 2, 10))(keys)


def episode_lengths(keys):
    """The lengths Countdown draws for these episode keys (rollout splits the key into (reset, run))."""
    return np.asarray(_lengths(jnp.stack(list(keys)) if isinstance(keys, list) else keys))


def test_adapters_satisfy_protocol():
    assert isinstance(Countdown(), rl.Adapter)
    assert isinstance(Reach(), rl.Adapter)
    assert isinstance(rl.Gymnax("CartPole-v1"), rl.Adapter)


def test_masked_return_matches_known_episode_lengths():
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=1)
    params = policy.init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 16)
    lengths = episode_lengths(keys)
    assert len(set(lengths)) > 3  # several lengths in one vmapped batch: the loop runs for the longest
    ret, n, moments = jax.vmap(lambda k: rl.rollout(env, policy, params, k))(keys)
    np.testing.assert_array_equal(np.asarray(n), lengths)
    np.testing.assert_array_equal(np.asarray(ret), lengths * (lengths + 1) / 2)
    np.testing.assert_array_equal(np.asarray(moments.count), lengths)


def test_truncation_by_max_steps():
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=1)
    params = policy.init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 16)
    lengths = np.minimum(episode_lengths(keys), 3)
    ret, n, _ = jax.vmap(lambda k: rl.rollout(env, policy, params, k, max_steps=3))(keys)
    np.testing.assert_array_equal(np.asarray(n), lengths)
    np.testing.assert_array_equal(np.asarray(ret), lengths * (lengths + 1) / 2)
    # the adapter's own truncation flag (max_steps=5) ends episodes too
    ret5, n5, _ = jax.vmap(lambda k: rl.rollout(Countdown(max_steps=5), policy, params, k))(keys)
    np.testing.assert_array_equal(np.asarray(n5), np.minimum(episode_lengths(keys), 5))


def test_cartpole_return_equals_manual_episode():
    """A constant-action policy on CartPole: the return equals a hand-stepped gymnax episode."""
    import gymnax

    adapter = rl.Gymnax("CartPole-v1")
    policy = rl.Policy.for_adapter(adapter, width=4, depth=1)
    params = jax.tree_util.tree_map(jnp.zeros_like, policy.init(jax.random.key(0)))
    params["out"]["b"] = jnp.array([1.0, 0.0])  # always push left
    key = jax.random.key(7)
    ret, n, _ = rl.rollout(adapter, policy, params, key)
    env, env_params = gymnax.make("CartPole-v1")
    key_reset, key_run = jax.random.split(key)
    _, state = env.reset_env(key_reset, env_params)
    total, steps = 0.0, 0
    while True:
        _, state, reward, done, _ = env.step_env(jax.random.key(0), state, 0, env_params)
        total += float(reward)
        steps += 1
        if bool(done) or steps >= 500:
            break
    assert 5 < steps < 50
    assert int(n) == steps
    assert float(ret) == total


def test_fitness_averages_episodes_with_independent_keys():
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=1)
    params = policy.init(jax.random.key(0))
    fitness = rl.make_fitness(env, policy, episodes=8)
    key = jax.random.key(3)
    value, moments = fitness(params, key, rl.ObsStats.create((2,)))
    lengths = episode_lengths(jax.random.split(key, 8))
    assert float(value) == pytest.approx(float(np.mean(lengths * (lengths + 1) / 2)))
    assert float(moments.count) == lengths.sum()


def test_obs_stats_equal_numpy_mean_and_var_of_observations_seen():
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=1)
    params = policy.init(jax.random.key(0))
    stats = rl.ObsStats.create((2,))
    seen = []
    for round_ in range(3):  # three batches folded in one after the other
        keys = jax.random.split(jax.random.key(10 + round_), 32)
        _, _, moments = jax.vmap(lambda k: rl.rollout(env, policy, params, k, stats))(keys)
        stats = rl.update_obs_stats(stats, moments)
        seen += observations_seen(keys)
    assert_stats_match(stats, seen)


def observations_seen(keys) -> list[list[int]]:
    """The Countdown observations ``[t, length]`` acted on in the episodes of ``keys``."""
    return [[t, length] for length in episode_lengths(keys) for t in range(length)]


def assert_stats_match(stats, seen) -> None:
    """Running statistics equal numpy's count, mean and variance of every observation seen."""
    data = np.array(seen, np.float64)
    assert float(stats.count) == len(data)
    np.testing.assert_allclose(np.asarray(stats.mean), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.var), data.var(0), rtol=1e-4)


def test_obs_stats_from_population_aux():
    """``strategy.evaluate(..., has_aux=True)`` returns per-member moments; folded they equal numpy's."""
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=1)
    fitness = rl.make_fitness(env, policy, episodes=2, obs_norm=True)
    strategy = esx.eggroll(population_size=8, rank=1, sigma=0.1, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(0), policy.init(jax.random.key(1)))
    key = jax.random.key(5)
    returns, moments = jax.jit(lambda s, k: strategy.evaluate(s, fitness, k, rl.ObsStats.create((2,)),
                                                              has_aux=True))(state, key)
    assert returns.shape == (8,) and moments.count.shape == (8,)
    stats = rl.update_obs_stats(rl.ObsStats.create((2,)), moments)
    seen = []
    member_keys = jax.vmap(lambda m: jax.random.split(jax.random.fold_in(key, m), 2))(
        jnp.arange(8, dtype=jnp.uint32))  # the default group_size=1: each member its own key
    seen += observations_seen(member_keys.reshape(-1))
    assert_stats_match(stats, seen)


def test_normalize_uses_stats():
    stats = rl.ObsStats(jnp.float32(10), jnp.array([1.0, -2.0]), jnp.array([4.0, 0.25]))
    np.testing.assert_allclose(np.asarray(stats.normalize(jnp.array([3.0, -1.0]))), [1.0, 2.0], rtol=1e-5)


def test_policy_is_lowrank_under_eggroll():
    """The policy's matrices reach the forward as esx.LowRank leaves (never a dense per-member matrix)."""
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=8, depth=2)
    params = policy.init(jax.random.key(0))
    strategy = esx.eggroll(population_size=4, rank=2, sigma=0.1, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(0), params)
    view = jax.jit(lambda s: strategy.view(s, strategy.ask(s), 0))(state)
    assert isinstance(view["hidden"][0]["w"], esx.LowRank)
    assert isinstance(view["hidden"][0]["scale"], esx.Full)
    # the forward equals the dense reference W + c A Bᵀ
    w = view["hidden"][0]["w"]
    dense = jax.tree_util.tree_map(lambda x: x, params)
    dense["hidden"][0]["w"] = esx.value(w)
    for name in ("b", "scale", "shift"):
        dense["hidden"][0][name] = esx.value(view["hidden"][0][name])
    dense["hidden"][1] = {k: esx.value(v) for k, v in view["hidden"][1].items()}
    dense["out"] = {k: esx.value(v) for k, v in view["out"].items()}
    obs = jnp.array([0.3, -1.2])
    np.testing.assert_allclose(np.asarray(policy(view, obs)), np.asarray(policy(dense, obs)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("layer_norm, rank", [(False, 1), (True, 3)])
def test_units_form_equals_vector_form(layer_norm, rank):
    """The "units" forward (one scalar per unit) gives the "vector" forward's values on plain parameters, on
    EGGROLL member views (LowRank, and SplitLowRank after prepare) and on Open_ES-style per-member matrices, under
    the population's vmap, prepared or not."""
    kw = dict(obs_size=3, action_kind="discrete", action_dim=2, width=6, depth=2, layer_norm=layer_norm)
    units, vector = rl.Policy(**kw, form="units"), rl.Policy(**kw, form="vector")
    params = units.init(jax.random.key(0))
    params["out"]["w"] = params["out"]["w"] * 100.0  # logits of order 1
    obs = jax.random.normal(jax.random.key(1), (8, 3))

    def close(a, b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)

    close(jax.vmap(lambda o: units(params, o))(obs), jax.vmap(lambda o: vector(params, o))(obs))
    close(jax.vmap(lambda o: units(units.prepare(params), o))(obs), jax.vmap(lambda o: vector(params, o))(obs))
    strategy = esx.eggroll(population_size=8, rank=rank, sigma=0.3, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(2), params)
    population = strategy.ask(state)
    views = jax.vmap(lambda m: strategy.view(state, population, m))(jnp.arange(8))
    assert isinstance(views["hidden"][1]["w"], esx.LowRank)
    for prep in (False, True):
        f = (lambda p: (lambda pol: pol.prepare(p) if prep else p))
        close(jax.vmap(lambda v, o: units(f(v)(units), o))(views, obs),
              jax.vmap(lambda v, o: vector(f(v)(vector), o))(views, obs))
    # per-member plain matrices (Open_ES's members): the dense values of the views
    dense = jax.vmap(lambda v: jax.tree_util.tree_map(esx.value, v, is_leaf=lambda x: isinstance(
        x, (esx.LowRank, esx.Full))))(views)
    close(jax.vmap(lambda p, o: units(units.prepare(p), o))(dense, obs),
          jax.vmap(lambda p, o: vector(p, o))(views, obs))


def test_policy_form_auto_and_bad_form():
    """``form="auto"`` writes a tiny policy per unit on CPU and keeps larger ones as vectors; a bad form is an
    error that lists the valid ones."""
    tiny = rl.Policy(obs_size=4, action_kind="discrete", action_dim=2, width=32, depth=1, layer_norm=False)
    big = rl.Policy(obs_size=4, action_kind="discrete", action_dim=2, width=32, depth=2, layer_norm=False)
    assert tiny.macs == 4 * 32 + 32 * 2 <= rl.Policy.UNITS_MAX_MACS < big.macs
    assert tiny.resolved_form == ("units" if jax.default_backend() == "cpu" else "vector")
    assert big.resolved_form == "vector"
    with pytest.raises(ValueError, match="form='unit'.*'auto', 'vector' and 'units'"):
        rl.Policy(obs_size=4, action_kind="discrete", action_dim=2, form="unit")


def test_two_action_sampling_is_a_logistic_threshold():
    """Two actions: the noise is a standard logistic draw (the logit of a uniform) and action 1 is taken iff
    ``logit_1 + noise > logit_0`` (so with probability sigmoid(logit_1 - logit_0)); greedy ties give action 0."""
    policy = rl.Policy(obs_size=1, action_kind="discrete", action_dim=2, width=4, depth=0)
    params = {"hidden": [], "out": {"w": jnp.zeros((1, 2)), "b": jnp.array([0.3, -0.2])}}
    act = jax.jit(lambda x: policy.act_with_noise(params, jnp.zeros(1), x, "stochastic"))
    assert [int(act(jnp.float32(x))) for x in (0.49, 0.5, 0.51, -3.0, 3.0)] == [0, 0, 1, 0, 1]
    noise = np.asarray(policy.action_noise(jax.random.key(0), (20000,)))
    # standard logistic: mean 0, variance pi^2 / 3, P(x <= 1) = sigmoid(1)
    assert abs(noise.mean()) < 0.04 and abs(noise.var() - np.pi ** 2 / 3) < 0.15
    assert abs(np.mean(noise <= 1.0) - 1 / (1 + np.exp(-1.0))) < 0.01
    tie = {"hidden": [], "out": {"w": jnp.zeros((1, 2)), "b": jnp.zeros(2)}}
    assert int(policy.act_with_noise(tie, jnp.zeros(1), None, "greedy")) == 0


def test_discrete_stochastic_and_greedy_actions():
    env = Countdown()
    policy = rl.Policy.for_adapter(env, width=4, depth=0)
    params = {"hidden": [], "out": {"w": jnp.zeros((2, 2)), "b": jnp.array([0.0, 0.5])}}
    obs = jnp.zeros(2)
    assert int(policy.act(params, obs, jax.random.key(0), "greedy")) == 1
    acts = jax.vmap(lambda k: policy.act(params, obs, k, "stochastic"))(jax.random.split(jax.random.key(0), 2000))
    p1 = float(np.mean(np.asarray(acts)))
    assert abs(p1 - 1 / (1 + np.exp(-0.5))) < 0.04  # softmax probability of action 1


def test_stochastic_actions_follow_the_softmax_with_many_actions():
    """Frequencies of 4 sampled actions match the softmax (20000 draws: s.e. <= 0.0035 each)."""
    logits = jnp.array([0.0, 1.0, -1.0, 0.5])
    policy = rl.Policy(obs_size=1, action_dim=4, action_kind="discrete", width=4, depth=0)
    params = {"hidden": [], "out": {"w": jnp.zeros((1, 4)), "b": logits}}
    acts = jax.vmap(lambda k: policy.act(params, jnp.zeros(1), k, "stochastic"))(
        jax.random.split(jax.random.key(3), 20000))
    freq = np.bincount(np.asarray(acts), minlength=4) / 20000
    assert acts.dtype == jnp.int32 and int(acts.min()) >= 0 and int(acts.max()) <= 3
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits)), atol=0.015)


def test_inverse_cdf_actions_at_the_edges_of_the_uniform():
    """Action k is taken for u in [c_{k-1}, c_k) of the cumulative softmax; zero-probability actions never."""
    policy = rl.Policy(obs_size=1, action_dim=4, action_kind="discrete", width=4, depth=0)
    logits = jnp.array([-200.0, 0.0, -200.0, 0.0])  # actions 0 and 2 have probability exp(-200) = 0 in float32
    params = {"hidden": [], "out": {"w": jnp.zeros((1, 4)), "b": logits}}
    act = jax.jit(lambda u: policy.act_with_noise(params, jnp.zeros(1), u, "stochastic"))
    assert [int(act(jnp.float32(u))) for u in (0.0, 0.25, 0.4999, 0.5, 0.75, np.nextafter(1, 0, dtype=np.float32))] \
        == [1, 1, 1, 3, 3, 3]
    assert policy.action_noise(jax.random.key(0), (5,)).shape == (5,)
    cont = rl.Policy(obs_size=1, action_dim=2, action_kind="continuous", width=4, depth=0,
                     action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    assert cont.action_noise(jax.random.key(0), (5,)).shape == (5, 2)


def test_continuous_actions_within_bounds():
    adapter = rl.Gymnax("Pendulum-v1")
    assert adapter.action_kind == "continuous" and adapter.action_dim == 1
    policy = rl.Policy.for_adapter(adapter, width=8, depth=1)
    params = policy.init(jax.random.key(0))
    params["out"]["b"] = jnp.array([5.0])  # saturates tanh: the greedy action is the upper bound
    a = policy.act(params, jnp.zeros(3), jax.random.key(0), "greedy")
    assert a.shape == (1,) and float(a[0]) == pytest.approx(2.0, abs=1e-3)
    acts = jax.vmap(lambda k: policy.act(params, jnp.zeros(3), k, "stochastic"))(
        jax.random.split(jax.random.key(0), 100))
    assert float(acts.max()) <= 2.0 and float(acts.min()) >= -2.0
    ret, n, _ = rl.rollout(adapter, policy, params, jax.random.key(1))
    assert int(n) == 200 and np.isfinite(float(ret)) and float(ret) < 0


@pytest.mark.parametrize("name", ["Breakout-MinAtar", "Catch-bsuite"])
def test_gymnax_suites_roll_out(name):
    adapter = rl.Gymnax(name, max_steps=30)
    policy = rl.Policy.for_adapter(adapter, width=8, depth=1)
    params = policy.init(jax.random.key(0))
    ret, n, moments = rl.rollout(adapter, policy, params, jax.random.key(1), mode="stochastic")
    assert 1 <= int(n) <= 30 and np.isfinite(float(ret))
    assert moments.sum.shape == adapter.observation_shape


@pytest.mark.parametrize("name", sorted(rl.OBS_FROM_STATE))
def test_observe_equals_the_observations_reset_and_step_return(name):
    """The rollout may carry only the environment state and observe it (``adapter.observe``): for every listed
    gymnax environment that gives exactly the observations of ``reset`` and ``step`` along random trajectories."""
    adapter = rl.Gymnax(name)
    assert adapter.observe is not None

    def trajectory(key):
        k_reset, key = jax.random.split(key)
        obs, state = adapter.reset(k_reset)
        same = jnp.all(adapter.observe(state) == obs)

        def body(carry, k):
            state, same = carry
            k_act, k_step = jax.random.split(k)
            if adapter.action_kind == "discrete":
                action = jax.random.randint(k_act, (), 0, adapter.action_dim)
            else:
                action = jax.random.uniform(k_act, (adapter.action_dim,), minval=jnp.asarray(adapter.action_low),
                                            maxval=jnp.asarray(adapter.action_high))
            obs, state, *_ = adapter.step(k_step, state, action)
            return (state, same & jnp.all(adapter.observe(state) == obs)), None

        (_, same), _ = lax.scan(body, (state, same), jax.random.split(key, 40))
        return same

    assert bool(jnp.all(jax.jit(jax.vmap(trajectory))(jax.random.split(jax.random.key(0), 4))))


def test_environments_without_observe_keep_the_carried_observation():
    """UmbrellaChain draws its observations with the step's key: not in OBS_FROM_STATE, so no ``observe``."""
    assert "UmbrellaChain-bsuite" in rl.gymnax_env_names() and "UmbrellaChain-bsuite" not in rl.OBS_FROM_STATE
    assert rl.Gymnax("UmbrellaChain-bsuite").observe is None


@pytest.mark.parametrize("name, mode", [("CartPole-v1", "stochastic"), ("Pendulum-v1", "greedy")])
def test_rollout_with_observe_equals_rollout_carrying_observations(name, mode):
    """Returns, lengths and observation moments (with normalisation on) are identical with and without
    ``observe``."""
    observing = rl.Gymnax(name, max_steps=60)
    carrying = rl.Gymnax(name, max_steps=60)
    carrying.observe = None
    policy = rl.Policy.for_adapter(observing, width=8, depth=1)
    params = policy.init(jax.random.key(1))
    stats = rl.ObsStats(jnp.float32(10.0), jnp.full(observing.observation_shape, 0.1, jnp.float32),
                        jnp.full(observing.observation_shape, 2.0, jnp.float32))
    keys = jax.random.split(jax.random.key(2), 8)
    outs = [jax.jit(jax.vmap(lambda k, a=a: rl.rollout(a, policy, params, k, stats, mode=mode)))(keys)
            for a in (observing, carrying)]
    for x, y in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(set(np.asarray(outs[0][1]).tolist())) > 1 or name == "Pendulum-v1"  # episodes of several lengths


@pytest.mark.parametrize("name, mode, form", [("CartPole-v1", "stochastic", "units"),
                                              ("Acrobot-v1", "stochastic", "vector"),
                                              ("Acrobot-v1", "stochastic", "units"),
                                              ("Pendulum-v1", "greedy", "units")])
def test_carried_action_gives_the_same_rollout(name, mode, form):
    """Computing each action at the end of the previous step and carrying it (``Policy.carry_action``, the
    "units" form) gives bit-identical returns, lengths and moments to computing it at the top of the step."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Flipped(rl.Policy):
        @property
        def carry_action(self):
            return not rl.Policy.carry_action.fget(self)

    adapter = rl.Gymnax(name, max_steps=80)
    policy = rl.Policy.for_adapter(adapter, width=8, depth=1, form=form)
    flipped = Flipped(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)})
    assert policy.carry_action == (form == "units") != flipped.carry_action
    params = policy.init(jax.random.key(3))
    params["out"]["w"] = params["out"]["w"] * 100.0
    keys = jax.random.split(jax.random.key(4), 16)
    outs = [jax.jit(jax.vmap(lambda k, p=p: rl.rollout(adapter, p, params, k, mode=mode)))(keys)
            for p in (policy, flipped)]
    for x, y in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if name == "CartPole-v1":  # episodes of several lengths: the freezing after the end is exercised too
        assert len(set(np.asarray(outs[0][1]).tolist())) > 1


def test_unknown_env_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown environment 'CartPol-v1' \(did you mean 'CartPole-v1'\?\).*"
                                         r"Breakout-MinAtar"):
        rl.Gymnax("CartPol-v1")
    with pytest.raises(ValueError, match="episodes=0"):
        rl.make_fitness(Countdown(), rl.Policy.for_adapter(Countdown()), episodes=0)


@pytest.mark.slow
def test_pure_jax_adapter_learns_with_eggroll():
    """The adapter shape is enough for another suite: ES on the continuous Reach task improves clearly."""
    env = Reach()
    policy = rl.Policy.for_adapter(env, width=16, depth=1)
    fitness = rl.make_fitness(env, policy, episodes=4, mode="greedy")
    strategy = esx.eggroll(population_size=64, rank=2, sigma=0.1, optimizer=optax.adam(0.03))
    state = strategy.init(jax.random.key(0), policy.init(jax.random.key(1)))
    evaluate = rl.make_evaluator(env, policy, episodes=64)
    stats = rl.ObsStats.create(env.observation_shape)
    before = float(evaluate(state.params, jax.random.key(99), stats).mean())

    @jax.jit
    def gen(state, key):
        f, _ = strategy.evaluate(state, fitness, key, stats, has_aux=True)
        return strategy.tell(state, f)[0]

    for g in range(60):
        state = gen(state, jax.random.key(g))
    after = float(evaluate(state.params, jax.random.key(99), stats).mean())
    assert before < -1.0  # a fixed ~0 action: 4 · E[target²] = 4/3
    assert after > 0.3 * before  # at least 70% of the squared error gone


def test_compare_evosax_script_prints_ratio_and_a_consistent_paired_difference():
    """scripts/compare_evosax_cartpole.py at toy settings: it prints both throughputs and their ratio, and the
    paired (same seeds) difference of the final policies equals the difference of their printed means."""
    import pathlib
    import re
    import subprocess
    import sys

    pytest.importorskip("evosax")
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_evosax_cartpole.py"
    out = subprocess.run([sys.executable, str(script), "--population", "64", "--steps", "20", "--width", "8",
                          "--throughput-gens", "2", "--time-limit", "3", "--final-episodes", "32"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    egg, evo_flax, evo_esx = (float(x) for x in re.findall(r"(\d+\.\d+) gen/s", out))
    ratios = [float(x) for x in re.findall(r"ratio EGGROLL / Open_ES \(.*\): +(\d+\.\d+)x", out)]
    assert min(egg, evo_flax, evo_esx) > 0 and len(ratios) == 2
    assert ratios[0] == pytest.approx(egg / evo_flax, abs=0.011)
    assert ratios[1] == pytest.approx(egg / evo_esx, abs=0.011)
    finals = [float(x) for x in re.findall(r"final policy over 32 episodes: (-?\d+\.\d+)", out)]
    paired = float(re.search(r"\(EGGROLL - Open_ES\): ([+-]\d+\.\d+) ±", out).group(1))
    assert len(finals) == 2 and paired == pytest.approx(finals[0] - finals[1], abs=0.11)
    better, worse = (int(x) for x in re.search(r"better in (\d+), worse in (\d+) of 32", out).groups())
    assert better + worse <= 32


def test_compare_script_flax_policy_equals_the_esx_policy():
    """``--open-es-policy flax`` changes only how Open_ES's per-member products are computed
    (``flax.linen.Dense``), not the policy: same outputs as :class:`rl.Policy`, with and without LayerNorm."""
    import dataclasses
    import importlib.util
    import pathlib

    pytest.importorskip("flax")
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_evosax_cartpole.py"
    spec = importlib.util.spec_from_file_location("compare_evosax_cartpole", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    adapter = rl.Gymnax("Pendulum-v1")
    for layer_norm in (False, True):
        policy = rl.Policy.for_adapter(adapter, width=16, depth=2, layer_norm=layer_norm)
        flax_policy = script.FlaxPolicy(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)})
        assert type(flax_policy).__name__ == "FlaxPolicy" and flax_policy.form == "vector"
        params = policy.init(jax.random.key(0))
        obs = jax.random.normal(jax.random.key(1), (5, 3))
        np.testing.assert_allclose(np.asarray(jax.vmap(lambda o: flax_policy(params, o))(obs)),
                                   np.asarray(jax.vmap(lambda o: policy(params, o))(obs)), rtol=1e-5, atol=1e-6)


def test_compare_script_learning_rate_schedule_reaches_both_optimizers():
    """``--lr-schedule cosine``: the wall-clock cosine values, and the learning rate set in an
    ``optax.inject_hyperparams`` state (inside jit) is the one the next update uses, for esx's EGGROLL and for
    evosax's Open_ES: lr 0 leaves the mean where it is; lr 0.003 equals a plain ``optax.adam(0.003)`` step."""
    import importlib.util
    import pathlib

    import jax.flatten_util

    ea = pytest.importorskip("evosax.algorithms")
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_evosax_cartpole.py"
    spec = importlib.util.spec_from_file_location("compare_evosax_cartpole", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.cosine_lr(0.01, 0.0, 10.0) == pytest.approx(0.01)
    assert script.cosine_lr(0.01, 5.0, 10.0) == pytest.approx(0.005)
    assert script.cosine_lr(0.01, 2.5, 10.0) == pytest.approx(0.005 * (1 + np.sqrt(0.5)))
    assert script.cosine_lr(0.01, 10.0, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert script.cosine_lr(0.01, 30.0, 10.0) == pytest.approx(0.0, abs=1e-12)

    params0 = {"w": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(3)}
    fitness = jax.random.normal(jax.random.key(2), (8,))
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)

    def esx_step(optimizer, lr=None):
        strategy = esx.eggroll(population_size=8, rank=1, sigma=0.1, optimizer=optimizer)
        state = strategy.init(jax.random.key(0), params0)
        if lr is not None:
            state = jax.jit(lambda s, v: s.replace(opt_state=script.set_learning_rate(s.opt_state, v)))(state, lr)
        return strategy.tell(state, fitness)[0].params

    def evo_step(optimizer, lr=None):
        es = ea.Open_ES(population_size=8, solution=params0, optimizer=optimizer,
                        std_schedule=optax.constant_schedule(0.1))
        state = es.init(jax.random.key(0), params0, es.default_params)
        population, state = es.ask(jax.random.key(1), state, es.default_params)
        if lr is not None:
            state = jax.jit(lambda s, v: s.replace(opt_state=script.set_learning_rate(s.opt_state, v)))(state, lr)
        return es.tell(jax.random.key(3), population, fitness, state, es.default_params)[0].mean

    for step, start in ((esx_step, lambda: params0), (evo_step, lambda: jax.flatten_util.ravel_pytree(params0)[0])):
        frozen, moved, reference = step(injected, 0.0), step(injected, 0.003), step(optax.adam(0.003))
        for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(start())):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (moved, reference, start()))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
            assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3  # it did move (adam: ~lr per entry)
