"""Brax behind the :class:`esx_envs.rl.Adapter` shape (optional extra ``rl-brax``).

``env="brax:ant"`` in a config (or ``rl.make_adapter("brax:ant")``) builds :class:`Brax` on the default physics
pipeline :data:`DEFAULT_BACKEND`; ``"brax:ant:generalized"`` names another one (``generalized``, ``positional``,
``spring``, ``mjx``). Observations are Brax's ``float[observation_size]`` vectors, actions ``float[action_size]``
bounded by each actuator's control range (``sys.actuator.ctrl_range``, which the pipelines clip to: ``[-1, 1]`` for
Ant and the pendulums, ``[-0.4, 0.4]`` for Humanoid), so the policy's ``tanh`` covers exactly the range that acts.
An episode ends when the environment's ``done`` is set (``terminated``: e.g. Ant falling over) or after
``max_steps`` steps (default 1000, Brax's usual ``episode_length``; the raw environments have no time limit of
their own, so ``truncated`` is never reported and the rollout's limit does the truncation).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

#: The pipeline used when the name does not give one: spring ran Ant fastest on a 2-core CPU at 1, 256 and 1024
#: environments and compiled fastest (docs/rl.md, "More suites", has the four pipelines' step and compile times).
DEFAULT_BACKEND = "spring"
BACKENDS = ("generalized", "positional", "spring", "mjx")


def brax_env_names() -> list[str]:
    """Every environment name ``brax.envs.get_environment`` accepts."""
    from brax import envs

    return sorted(getattr(envs, "_envs", {}))


class Brax:
    """A Brax environment as an :class:`esx_envs.rl.Adapter` (continuous actions).

    Args:
      env_name: a Brax name (``"ant"``, ``"humanoid"``, ``"inverted_double_pendulum"``, ...), optionally followed
        by ``":<backend>"`` (one of :data:`BACKENDS`; default :data:`DEFAULT_BACKEND`).
      max_steps: the episode step limit (default 1000).
      **env_kwargs: passed to ``brax.envs.get_environment``.

    Raises:
      ImportError: brax is not installed (``pip install "esx-jax[rl-brax]"``).
      ValueError: an unknown environment or backend; the message lists the valid ones.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None, **env_kwargs):
        try:
            from brax import envs
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('the Brax adapter needs brax: pip install "esx-jax[rl-brax]"') from e
        base, _, backend = env_name.partition(":")
        backend = backend or DEFAULT_BACKEND
        if backend not in BACKENDS:
            raise ValueError(f"unknown Brax backend {backend!r} in {env_name!r}; valid backends are {list(BACKENDS)}")
        names = brax_env_names()
        if base not in names:
            raise ValueError(f"unknown Brax environment {base!r}; valid names are {names}")
        self.env = envs.get_environment(base, backend=backend, **env_kwargs)
        self.name, self.backend = f"brax:{base}:{backend}", backend
        self.observation_shape = (int(self.env.observation_size),)
        self.action_kind, self.action_dim = "continuous", int(self.env.action_size)
        ctrl = np.asarray(self.env.sys.actuator.ctrl_range, np.float32).reshape(-1, 2)
        if ctrl.shape[0] != self.action_dim:      # not one range per action: Brax's nominal [-1, 1]
            ctrl = np.tile(np.array([[-1.0, 1.0]], np.float32), (self.action_dim, 1))
        self.action_low, self.action_high = ctrl[:, 0].copy(), ctrl[:, 1].copy()
        self.max_steps = int(max_steps if max_steps is not None else 1000)

    def observe(self, env_state):
        """The observation stored in the Brax state (what :meth:`reset` / :meth:`step` returned with it)."""
        return jnp.asarray(env_state.obs, jnp.float32)

    def reset(self, key):
        """``key -> (obs float[observation_size], brax State)``."""
        state = self.env.reset(key)
        return jnp.asarray(state.obs, jnp.float32), state

    def step(self, key, env_state, action):
        """``(key, State, float[action_dim]) -> (obs, State, reward, terminated, truncated=False)``; Brax's
        physics is deterministic, so ``key`` is unused."""
        del key
        state = self.env.step(env_state, action)
        return (jnp.asarray(state.obs, jnp.float32), state, jnp.asarray(state.reward, jnp.float32),
                jnp.asarray(state.done, jnp.float32) > 0, jnp.zeros((), bool))
