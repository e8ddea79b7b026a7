"""Navix (MiniGrid in JAX) behind the :class:`esx_envs.rl.Adapter` shape (optional extra ``rl-navix``).

``env="navix:Navix-DoorKey-8x8-v0"`` (any name of ``navix.registry()``) builds :class:`Navix`. Observations are
Navix's default symbolic grid ``uint8[H, W, 3]`` (object, colour, state per cell), raveled to ``float32``; actions
are discrete (7, MiniGrid's action set). The adapter's state is Navix's ``Timestep``; :meth:`Navix.step` calls
the environment's transition without its auto-reset (``env.step`` resets once ``step_type > 0``, which would cost a
reset under ``vmap`` at every step; the rollout freezes finished episodes instead). An episode ends at Navix's
``TERMINATION`` (goal reached or, in Dynamic-Obstacles, a collision: ``terminated``) or ``TRUNCATION``
(``max_steps``, default 100 as ``navix.make``'s: ``truncated``).
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def navix_env_names() -> list[str]:
    """Every name ``navix.make`` accepts."""
    import navix

    return sorted(navix.registry())


class Navix:
    """A Navix environment as an :class:`esx_envs.rl.Adapter` (discrete actions).

    Args:
      env_name: a Navix name such as ``"Navix-DoorKey-8x8-v0"``, ``"Navix-FourRooms-v0"``,
        ``"Navix-Dynamic-Obstacles-6x6-Random-v0"``.
      max_steps: the episode step limit, passed to ``navix.make`` (default 100, its own default).

    Raises:
      ImportError: navix is not installed (``pip install "esx-jax[rl-navix]"``).
      ValueError: an unknown name; the message lists the valid names.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None):
        try:
            import navix
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('the Navix adapter needs navix: pip install "esx-jax[rl-navix]"') from e
        names = navix_env_names()
        if env_name not in names:
            raise ValueError(f"unknown Navix environment {env_name!r}; valid names are {names}")
        self.max_steps = int(max_steps if max_steps is not None else 100)
        self.env = navix.make(env_name, max_steps=self.max_steps)
        self.name = f"navix:{env_name}"
        self.observation_shape = (int(math.prod(self.env.observation_space.shape)),)
        self.action_kind, self.action_dim = "discrete", int(self.env.action_space.maximum) + 1
        self.action_low = self.action_high = None

    def observe(self, timestep):
        """The observation stored in the ``Timestep`` (what :meth:`reset` / :meth:`step` returned with it)."""
        return jnp.ravel(timestep.observation).astype(jnp.float32)

    def reset(self, key):
        """``key -> (obs float[H * W * 3], navix Timestep)``."""
        timestep = self.env.reset(key)
        return self.observe(timestep), timestep

    def step(self, key, timestep, action):
        """``(key, Timestep, int32[]) -> (obs, Timestep, reward, terminated, truncated)``; Navix keeps its own key
        in the state, so ``key`` is unused."""
        del key
        nxt = self.env._step(timestep, jnp.asarray(action, jnp.int32))  # env.step without its auto-reset
        return (self.observe(nxt), nxt, jnp.asarray(nxt.reward, jnp.float32), nxt.is_termination(),
                nxt.is_truncation())
