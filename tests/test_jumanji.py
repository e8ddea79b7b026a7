"""The Jumanji adapter (a second RL suite behind the Adapter shape) against Jumanji's own step loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

jumanji = pytest.importorskip("jumanji")

from esx_envs import rl  # noqa: E402


def test_snake_rollout_return_matches_jumanji_loop():
    adapter = rl.make_adapter("jumanji:Snake-v1", max_steps=60)
    assert adapter.observation_shape == (12 * 12 * 5 + 1 + 4,) and adapter.action_dim == 4
    policy = rl.Policy.for_adapter(adapter, width=16, depth=1)
    params = policy.init(jax.random.key(0))
    key = jax.random.key(3)
    ret, length, _ = jax.jit(lambda p, k: rl.rollout(adapter, policy, p, k, mode="greedy"))(params, key)

    # Reference: Jumanji's own API, stepping in Python with the same greedy actions, summing until LAST.
    env = jumanji.make("Snake-v1")
    key_reset, _ = jax.random.split(key)
    state, ts = env.reset(key_reset)
    total, steps = 0.0, 0
    while steps < 60:
        obs = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(ts.observation)])
        action = jnp.argmax(policy(policy.prepare(params), obs))
        state, ts = env.step(state, action)
        total += float(ts.reward)
        steps += 1
        if bool(ts.last()):
            break
    assert int(length) == steps
    np.testing.assert_allclose(float(ret), total)


def test_unknown_jumanji_name_lists_valid_names():
    with pytest.raises(ValueError, match="Snake-v1"):
        rl.make_adapter("jumanji:Snek-v1")
