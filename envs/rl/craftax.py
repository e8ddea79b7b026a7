"""Craftax behind the :class:`esx_envs.rl.Adapter` shape (optional extra ``rl-craftax``).

``env="craftax:Craftax-Classic-Symbolic-v1"`` (or ``"craftax:Craftax-Symbolic-v1"``, and the ``-Pixels-``
variants) builds :class:`Craftax` on Craftax's environment without auto-reset. Observations are Craftax's own
``float32`` vectors (symbolic: 1345 numbers for Classic, 8268 for Craftax; pixel observations are raveled), actions
are discrete (17 for Classic, 43 for Craftax). Craftax's ``done`` covers death, lava and its time limit
(``params.max_timesteps``: 10,000 steps for Classic, 100,000 for Craftax): the step that reaches the limit is
reported as ``truncated``, any other ``done`` as ``terminated``. ``max_steps`` replaces that limit.
"""
from __future__ import annotations

import jax.numpy as jnp

#: The names Craftax's ``make_craftax_env_from_name(name, auto_reset=False)`` accepts.
CRAFTAX_NAMES = ("Craftax-Classic-Symbolic-v1", "Craftax-Symbolic-v1", "Craftax-Classic-Pixels-v1",
                 "Craftax-Pixels-v1")


class Craftax:
    """A Craftax environment as an :class:`esx_envs.rl.Adapter` (discrete actions).

    Args:
      env_name: one of :data:`CRAFTAX_NAMES`.
      max_steps: the episode step limit (default: Craftax's ``max_timesteps``; given, it replaces it, so Craftax
        itself ends the episode there).

    Raises:
      ImportError: craftax is not installed (``pip install "esx-jax[rl-craftax]"``).
      ValueError: an unknown name; the message lists the valid names.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None):
        if env_name not in CRAFTAX_NAMES:
            raise ValueError(f"unknown Craftax environment {env_name!r}; valid names are {list(CRAFTAX_NAMES)}")
        try:
            from craftax.craftax_env import make_craftax_env_from_name
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('the Craftax adapter needs craftax: pip install "esx-jax[rl-craftax]"') from e
        self.env = make_craftax_env_from_name(env_name, auto_reset=False)
        params = self.env.default_params
        if max_steps is not None:
            params = params.replace(max_timesteps=int(max_steps))
        self.params, self.name = params, f"craftax:{env_name}"
        self.observation_shape = (int(jnp.prod(jnp.asarray(self.env.observation_space(params).shape))),)
        self.action_kind, self.action_dim = "discrete", int(self.env.action_space(params).n)
        self.action_low = self.action_high = None
        self.max_steps = int(params.max_timesteps)

    def reset(self, key):
        """``key -> (obs float[observation_size], Craftax EnvState)``."""
        obs, state = self.env.reset_env(key, self.params)
        return jnp.ravel(obs).astype(jnp.float32), state

    def step(self, key, env_state, action):
        """``(key, EnvState, int32[]) -> (obs, EnvState, reward, terminated, truncated)``; ``key`` drives
        Craftax's random events (mobs, drops)."""
        obs, state, reward, done, _ = self.env.step_env(key, env_state, jnp.asarray(action, jnp.int32), self.params)
        truncated = jnp.asarray(done, bool) & (state.timestep >= self.params.max_timesteps)
        return (jnp.ravel(obs).astype(jnp.float32), state, jnp.asarray(reward, jnp.float32),
                jnp.asarray(done, bool) & ~truncated, truncated)
