"""Kinetix (2-D physics levels on Jax2D) behind the :class:`esx_envs.rl.Adapter` shape (optional extra
``rl-kinetix``).

``env="kinetix:l/hard_pinball"`` (``<size>/<level>``: one of the JSON levels shipped in ``kinetix/levels/{s,m,l}``,
e.g. ``"kinetix:m/h17_thrustcontrol_left"``, ``"kinetix:s/h1_thrust_over_ball"``) builds :class:`Kinetix`: the
level is loaded with the static parameters of its size (``static_env_params_from_size``, as Kinetix's own
evaluation loads levels) and every reset starts from it. Observations are Kinetix's symbolic-flat vectors
(``ObservationType.SYMBOLIC_FLAT``), actions its discrete set (``ActionType.DISCRETE``: each motor binding
backwards or forwards, each thruster binding, or no-op). An episode ends at Kinetix's ``done``: goal touched or
forbidden shape touched (reward ±1, ``terminated``) or its time limit ``max_timesteps`` (default 256 steps,
``truncated``); ``max_steps`` replaces that limit.

Kinetix (``kinetix-env`` on PyPI, every release up to 3.0.2) pins ``jax<=0.9.0``, so it does not install beside
esx's ``jax>=0.10``; the adapter is exercised against Kinetix's own step loop where it is installed by hand
(docs/rl.md, "More suites").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SIZES = ("s", "m", "l")


def kinetix_level_names() -> list[str]:
    """Every ``<size>/<level>`` shipped with Kinetix."""
    import os

    import kinetix

    root = os.path.join(os.path.dirname(kinetix.__file__), "levels")
    return sorted(f"{size}/{f[:-5]}" for size in SIZES if os.path.isdir(os.path.join(root, size))
                  for f in os.listdir(os.path.join(root, size)) if f.endswith(".json"))


class Kinetix:
    """A Kinetix level as an :class:`esx_envs.rl.Adapter` (discrete actions, symbolic-flat observations).

    Args:
      env_name: ``"<size>/<level>"``, e.g. ``"l/hard_pinball"`` (see :func:`kinetix_level_names`).
      max_steps: the episode step limit (default: the level's ``max_timesteps``, 256; given, it replaces it).

    Raises:
      ImportError: kinetix is not installed (``kinetix-env``; see the module docstring for why it is not in the
        ``dev`` extra).
      ValueError: an unknown level; the message lists the valid names.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None):
        try:
            from kinetix.environment import ActionType, ObservationType, make_kinetix_env
            from kinetix.environment.utils import static_env_params_from_size
            from kinetix.util.saving import load_evaluation_levels
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('the Kinetix adapter needs kinetix-env (pip install "esx-jax[rl-kinetix]"; it pins '
                              'jax<=0.9.0, see docs/rl.md)') from e
        names = kinetix_level_names()
        if env_name not in names:
            raise ValueError(f"unknown Kinetix level {env_name!r}; valid names are {names}")
        static = static_env_params_from_size(env_name.split("/")[0])
        levels, static = load_evaluation_levels([env_name], static_env_params_override=static)
        self.level = jax.tree_util.tree_map(lambda x: x[0], levels)
        from kinetix.environment import EnvParams

        params = EnvParams()
        if max_steps is not None:
            params = params.replace(max_timesteps=int(max_steps))
        self.params, self.static_params = params, static
        level = self.level
        self.env = make_kinetix_env(ActionType.DISCRETE, ObservationType.SYMBOLIC_FLAT, lambda key: level,
                                    params, static, auto_reset=False)
        self.name = f"kinetix:{env_name}"
        self.observation_shape = tuple(int(d) for d in self.env.observation_space(params).shape)
        self.action_kind, self.action_dim = "discrete", int(self.env.action_space(params).n)
        self.action_low = self.action_high = None
        self.max_steps = int(params.max_timesteps)

    def reset(self, key):
        """``key -> (obs float[observation_size], Kinetix EnvState)`` (always the level's start state)."""
        obs, state = self.env.reset(key, self.params)
        return jnp.asarray(obs, jnp.float32), state

    def step(self, key, env_state, action):
        """``(key, EnvState, int32[]) -> (obs, EnvState, reward, terminated, truncated)``."""
        obs, state, reward, done, _ = self.env.step(key, env_state, jnp.asarray(action, jnp.int32), self.params)
        truncated = jnp.asarray(done, bool) & (state.timestep >= self.params.max_timesteps)
        return (jnp.asarray(obs, jnp.float32), state, jnp.asarray(reward, jnp.float32),
                jnp.asarray(done, bool) & ~truncated, truncated)
