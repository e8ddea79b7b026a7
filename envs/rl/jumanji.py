"""A second RL suite behind the :class:`esx_envs.rl.Adapter` shape: Jumanji (optional extra ``rl-jumanji``).

``env="jumanji:Snake-v1"`` in a config (or ``rl.make_adapter("jumanji:Snake-v1")``) builds :class:`Jumanji`.
Observations are Jumanji's structured observations flattened into one ``float32`` vector (every leaf raveled and
concatenated in pytree order: for Snake the 12×12×5 grid, the step count and the action mask, 725 numbers).
An episode ends at Jumanji's ``LAST`` step: ``terminated`` when its discount is 0, ``truncated`` otherwise (the
environment's own time limit); the rollout's ``max_steps`` limit comes on top. Discrete action specs only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _flatten(observation) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(observation)])


class Jumanji:
    """Any Jumanji environment with a discrete action spec, as an :class:`esx_envs.rl.Adapter`.

    Args:
      env_name: a Jumanji name such as ``"Snake-v1"`` or ``"Game2048-v1"``.
      max_steps: the rollout step limit (default: the environment's ``time_limit`` attribute, else 1000).

    Raises:
      ValueError: an unknown name (the message lists the valid names) or a non-discrete action spec.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None):
        import jumanji
        from jumanji import specs

        names = list(jumanji.registered_environments())
        if env_name not in names:
            raise ValueError(f"unknown Jumanji environment {env_name!r}; valid names are {sorted(names)}")
        self.env = jumanji.make(env_name)
        self.name = f"jumanji:{env_name}"
        spec = self.env.action_spec
        if not isinstance(spec, specs.DiscreteArray):
            raise ValueError(f"{env_name}: action spec {type(spec).__name__} is not supported (DiscreteArray only)")
        self.action_kind, self.action_dim = "discrete", int(spec.num_values)
        self.action_low = self.action_high = None
        example = self.env.observation_spec.generate_value()
        self.observation_shape = (sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(example)),)
        limit = getattr(self.env, "time_limit", None)
        self.max_steps = int(max_steps if max_steps is not None else (limit or 1000))

    def reset(self, key):
        state, timestep = self.env.reset(key)
        return _flatten(timestep.observation), state

    def step(self, key, env_state, action):
        del key  # Jumanji environments carry their own key in the state
        state, timestep = self.env.step(env_state, jnp.asarray(action, jnp.int32))
        last = timestep.last()
        terminated = last & (timestep.discount == 0)
        truncated = last & (timestep.discount != 0)
        return (_flatten(timestep.observation), state, jnp.asarray(timestep.reward, jnp.float32),
                jnp.asarray(terminated, bool), jnp.asarray(truncated, bool))
