"""esx_envs.rl.gymnax_env.AdapterEnv: an esx adapter as a gymnax-style environment (the PPO baseline's view).

Parity: stepping AdapterEnv equals stepping the adapter with the same keys (rewards, observations, terminations),
until an episode ends; then the next observation is the adapter's reset with the step key's second half, and the
episode clock restarts. Truncation at ``max_steps_in_episode`` is reported as ``done`` with ``truncated`` set.
rejax's PPO, which failed on rejax's own Brax and Jumanji wrappers (docs/rl.md), trains through it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esx_envs.rl import make_adapter
from esx_envs.rl.gymnax_env import AdapterEnv, EnvParams, episode_returns

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _suite(name):
    prefix = name.split(":")[0] if ":" in name else "gymnax"
    pytest.importorskip({"brax": "brax", "craftax": "craftax", "jumanji": "jumanji", "navix": "navix",
                         "gymnax": "gymnax"}[prefix])


def _actions(adapter, n, seed=0):
    rng = np.random.default_rng(seed)
    if adapter.action_kind == "discrete":
        return rng.integers(0, adapter.action_dim, size=n).astype(np.int32)
    lo, hi = np.asarray(adapter.action_low), np.asarray(adapter.action_high)
    return rng.uniform(lo, hi, size=(n, adapter.action_dim)).astype(np.float32)


@pytest.mark.parametrize("name,max_steps,steps", [
    ("CartPole-v1", 6, 20),                          # truncation every 6 steps unless the pole falls first
    ("brax:inverted_double_pendulum", 50, 30),       # falls (termination) within a few dozen random steps
    ("navix:Navix-Dynamic-Obstacles-6x6-Random-v0", 100, 25),
    ("jumanji:Snake-v1", 100, 25),
])
def test_adapter_env_steps_like_the_adapter_and_auto_resets(name, max_steps, steps):
    _suite(name)
    adapter = make_adapter(name, max_steps=max_steps)
    env = AdapterEnv(adapter)
    assert env.default_params == EnvParams(max_steps) and env.observation_space().shape == adapter.observation_shape
    key = jax.random.key(3)
    env_step = _jit(env.step)
    a_step, a_reset = _jit(adapter.step), _jit(adapter.reset)
    obs, state = _jit(env.reset)(key)
    ref_obs, ref_state = a_reset(key)
    np.testing.assert_allclose(obs, ref_obs, rtol=1e-6, atol=1e-6)
    t, ends, truncations = 0, 0, 0
    for i, action in enumerate(_actions(adapter, steps)):
        k = jax.random.fold_in(key, i + 1)
        obs, state, reward, done, info = env_step(k, state, jnp.asarray(action))
        k_step, k_reset = jax.random.split(k)
        r_obs, ref_state, r_reward, r_term, r_trunc = a_step(k_step, ref_state, jnp.asarray(action))
        t += 1
        np.testing.assert_allclose(float(reward), float(r_reward), rtol=1e-5, atol=1e-5)
        want_done = bool(r_term) or bool(r_trunc) or t >= max_steps
        assert bool(done) == want_done and bool(info["terminated"]) == bool(r_term)
        assert bool(info["truncated"]) == (want_done and not bool(r_term))
        if want_done:
            ends += 1
            truncations += bool(info["truncated"])
            r_obs, ref_state = a_reset(k_reset)
            t = 0
        assert int(state.t) == t
        np.testing.assert_allclose(obs, r_obs, rtol=1e-5, atol=1e-5)
    if name == "CartPole-v1":
        assert ends >= 2 and truncations >= 1     # the test crossed both kinds of episode end


def test_episode_returns_split_at_episode_ends():
    env = AdapterEnv(make_adapter("CartPole-v1", max_steps=4))
    returns = episode_returns(env, jax.random.key(0), np.zeros(10, np.int32))
    assert returns[:2] == [4.0, 4.0] and returns[2] == 2.0   # CartPole pays 1 per step; 4-step truncations


def test_adapter_env_survives_deepcopy_and_gives_gymnax_spaces():
    import copy

    from gymnax.environments import spaces

    env = AdapterEnv(make_adapter("Pendulum-v1"))
    assert copy.deepcopy(env) is env
    space = env.action_space()
    assert isinstance(space, spaces.Box) and space.shape == (1,)
    np.testing.assert_allclose([space.low, space.high], [[-2.0], [2.0]])
    assert isinstance(AdapterEnv(make_adapter("CartPole-v1")).action_space(), spaces.Discrete)


def test_rejax_ppo_trains_through_the_adapter_on_brax():
    """rejax 0.1.3's own Brax wrapper fails on Brax 0.14; through AdapterEnv its PPO runs (a tiny budget: the
    evaluation is finite and its episodes last at most the limit)."""
    pytest.importorskip("brax")
    rejax = pytest.importorskip("rejax")
    env = AdapterEnv(make_adapter("brax:inverted_double_pendulum", max_steps=30))
    algo = rejax.PPO.create(env=env, env_params=env.default_params, total_timesteps=256, eval_freq=256,
                            skip_initial_evaluation=True, num_envs=4, num_steps=32, num_epochs=1,
                            num_minibatches=2, agent_kwargs={"hidden_layer_sizes": (8,)})
    _, (lengths, returns) = jax.jit(algo.train)(jax.random.key(0))
    lengths, returns = np.asarray(lengths), np.asarray(returns)
    assert np.isfinite(returns).all() and (returns > 0).all()     # IDP pays a survival bonus every step
    assert (lengths >= 1).all() and (lengths <= 30).all()


def test_adapter_env_refuses_an_adapter_without_an_episode_limit():
    """max_steps 0 (a config's "the suite's own limit", resolved by make_adapter(max_steps=None)) would end every
    episode at its first step: refused, never a silent return of 0."""
    with pytest.raises(ValueError, match="max_steps is 0"):
        AdapterEnv(make_adapter("CartPole-v1", max_steps=0))
    assert AdapterEnv(make_adapter("CartPole-v1", max_steps=None)).default_params.max_steps_in_episode == 500


def test_a_longer_episode_limit_than_the_adapters_is_refused_and_a_shorter_one_truncates():
    """``max_steps_in_episode`` can shorten the adapter's limit, not lengthen it: the adapter would still truncate at
    its own ``max_steps``, so a larger value is an error, never a silently shorter episode."""
    env = AdapterEnv(make_adapter("CartPole-v1", max_steps=20))
    key = jax.random.key(0)
    obs, state = env.reset(key, env.default_params)
    with pytest.raises(ValueError, match="above the adapter's max_steps=20"):
        env.step(key, state, jnp.asarray(0), EnvParams(max_steps_in_episode=50))
    short = EnvParams(max_steps_in_episode=3)
    dones = []
    for t in range(3):
        obs, state, _, done, info = env.step(jax.random.fold_in(key, t), state, jnp.asarray(t % 2), short)
        dones.append(bool(done))
    assert dones == [False, False, True] and bool(info["truncated"]) and int(state.t) == 0
