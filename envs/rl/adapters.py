"""The environment shape of the RL task: :class:`Adapter` (``reset`` / ``step`` as pure functions plus spaces),
:class:`Gymnax` for any gymnax environment by name, :func:`make_adapter` and the registry :data:`ADAPTERS` of other
suites by name prefix (``"jumanji:"``, ``"brax:"``, ``"craftax:"``, ``"navix:"``, ``"kinetix:"``: the modules of
the same names in :mod:`esx_envs.rl`, each behind its optional extra ``rl-<suite>``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

ActionKind = Literal["discrete", "continuous"]

# ----------------------------------------------------------------------------------------------------------------
# The environment shape
# ----------------------------------------------------------------------------------------------------------------
@runtime_checkable
class Adapter(Protocol):
    """What the RL fitness needs from an environment suite. All functions are pure and jittable.

    Attributes:
      name: a readable name (for logs).
      observation_shape: shape of one observation (``float`` after :meth:`reset`/:meth:`step`).
      action_kind: ``"discrete"`` or ``"continuous"``.
      action_dim: number of actions (discrete) or the size of the action vector (continuous).
      action_low / action_high: ``float[action_dim]`` bounds for continuous actions (``None`` for discrete).
      max_steps: the episode step limit (truncation); rollouts never run longer.

    Methods:
      ``reset(key) -> (obs float[*observation_shape], env_state)``
      ``step(key, env_state, action) -> (obs, env_state, reward float[], terminated bool[], truncated bool[])``
      The state after a terminal step is never used by :func:`make_fitness` except to keep stepping harmlessly
      (it is frozen), so adapters need not auto-reset.

    Optional: ``observe``, ``None`` or ``(env_state) -> obs`` returning exactly the observation that ``reset`` /
    ``step`` returned with that state. When present, :func:`rollout` carries only the environment state and
    recomputes the observation from it at each step: carrying both made XLA:CPU compute the step's physics once
    more for the observation (a 4096-member CartPole rollout, pure inference: 36 -> 22 ms; ``docs/results_history.md``).
    """

    name: str
    observation_shape: tuple[int, ...]
    action_kind: ActionKind
    action_dim: int
    action_low: Any
    action_high: Any
    max_steps: int

    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]: ...

    def step(self, key: jax.Array, env_state: Any, action: jax.Array) -> tuple[jax.Array, Any, jax.Array,
                                                                                jax.Array, jax.Array]: ...


#: gymnax environments whose ``get_obs(state, params)`` equals the observation ``reset_env`` / ``step_env`` return
#: (checked over random trajectories by ``tests/test_rl.py``). Not listed: MemoryChain-bsuite and
#: UmbrellaChain-bsuite (observations drawn with the step's key), FrozenLake-misc (no ``get_obs``), MNISTBandit-bsuite.
OBS_FROM_STATE = frozenset({
    "CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0",
    "Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "Seaquest-MinAtar", "SpaceInvaders-MinAtar",
    "Catch-bsuite", "DeepSea-bsuite", "DiscountingChain-bsuite", "SimpleBandit-bsuite",
    "FourRooms-misc", "MetaMaze-misc", "PointRobot-misc", "BernoulliBandit-misc", "GaussianBandit-misc",
    "Reacher-misc", "Swimmer-misc", "Pong-misc",
})


def gymnax_env_names() -> list[str]:
    """Every environment name gymnax can make."""
    import gymnax

    return list(gymnax.registered_envs)


class Gymnax:
    """Any gymnax environment by name, as an :class:`Adapter`.

    Uses ``env.step_env`` (no auto-reset: the rollout freezes finished episodes instead of paying for a reset every
    step) and ``env.is_truncated`` for the step limit, so ``terminated`` and ``truncated`` are both reported.
    ``observe`` is ``env.get_obs`` for the environments in :data:`OBS_FROM_STATE`, ``None`` for the others.

    Args:
      env_name: a gymnax name such as ``"CartPole-v1"``, ``"Pendulum-v1"``, ``"Breakout-MinAtar"``.
      max_steps: override of the episode step limit (``params.max_steps_in_episode``), or ``None``.
      **env_kwargs: passed to ``gymnax.make``.

    Raises:
      ValueError: an unknown name; the message lists the valid names.
    """

    def __init__(self, env_name: str, *, max_steps: int | None = None, **env_kwargs):
        import gymnax
        from gymnax.environments import spaces

        if env_name not in gymnax.registered_envs:
            import difflib

            close = difflib.get_close_matches(env_name, gymnax.registered_envs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown environment {env_name!r}{hint}; valid gymnax names are {list(gymnax.registered_envs)}"
            )
        env, params = gymnax.make(env_name, **env_kwargs)
        if max_steps is not None:
            if not hasattr(params, "max_steps_in_episode"):
                raise ValueError(f"{env_name} has no max_steps_in_episode parameter to override")
            params = params.replace(max_steps_in_episode=int(max_steps))
        self.env, self.params, self.name = env, params, env_name
        self.observation_shape = tuple(env.observation_space(params).shape)
        space = env.action_space(params)
        if isinstance(space, spaces.Discrete):
            self.action_kind, self.action_dim = "discrete", int(space.n)
            self.action_low = self.action_high = None
        elif isinstance(space, spaces.Box):
            shape = tuple(space.shape) or (1,)
            self.action_kind, self.action_dim = "continuous", int(math.prod(shape))
            self._action_shape = tuple(space.shape)
            self.action_low = np.broadcast_to(np.asarray(space.low, np.float32), shape).reshape(-1)
            self.action_high = np.broadcast_to(np.asarray(space.high, np.float32), shape).reshape(-1)
        else:
            raise ValueError(f"{env_name}: unsupported action space {type(space).__name__}")
        self.max_steps = int(getattr(params, "max_steps_in_episode", 1000))
        self.observe = self._observe if env_name in OBS_FROM_STATE else None

    def _observe(self, env_state):
        return jnp.asarray(self.env.get_obs(env_state, self.params), jnp.float32)

    def reset(self, key):
        obs, state = self.env.reset_env(key, self.params)
        return jnp.asarray(obs, jnp.float32), state

    def step(self, key, env_state, action):
        if self.action_kind == "continuous":
            action = action.reshape(self._action_shape)
        obs, state, reward, terminated, _ = self.env.step_env(key, env_state, action, self.params)
        truncated = jnp.asarray(self.env.is_truncated(state, self.params), bool)
        return (jnp.asarray(obs, jnp.float32), state, jnp.asarray(reward, jnp.float32),
                jnp.asarray(terminated, bool), truncated)


def make_adapter(env_name: str, *, max_steps: int | None = None) -> Adapter:
    """The adapter for ``env_name`` (gymnax names; other suites register in :data:`ADAPTERS`)."""
    for prefix, factory in ADAPTERS.items():
        if env_name.startswith(prefix):
            return factory(env_name[len(prefix):], max_steps=max_steps)
    return Gymnax(env_name, max_steps=max_steps)


#: Non-gymnax suites by name prefix, e.g. ``{"navix:": NavixAdapter}`` -> ``env="navix:Navix-Empty-5x5-v0"``.
ADAPTERS: dict[str, Callable[..., Adapter]] = {}


def _jumanji(env_name: str, *, max_steps: int | None = None) -> Adapter:
    from esx_envs.rl.jumanji import Jumanji  # optional extra `rl-jumanji`

    return Jumanji(env_name, max_steps=max_steps)


ADAPTERS["jumanji:"] = _jumanji


def _brax(env_name: str, *, max_steps: int | None = None) -> Adapter:
    from esx_envs.rl.brax import Brax  # optional extra `rl-brax`

    return Brax(env_name, max_steps=max_steps)


def _craftax(env_name: str, *, max_steps: int | None = None) -> Adapter:
    from esx_envs.rl.craftax import Craftax  # optional extra `rl-craftax`

    return Craftax(env_name, max_steps=max_steps)


def _navix(env_name: str, *, max_steps: int | None = None) -> Adapter:
    from esx_envs.rl.navix import Navix  # optional extra `rl-navix`

    return Navix(env_name, max_steps=max_steps)


def _kinetix(env_name: str, *, max_steps: int | None = None) -> Adapter:
    from esx_envs.rl.kinetix import Kinetix  # optional extra `rl-kinetix` (pins jax<=0.9.0: docs/rl.md)

    return Kinetix(env_name, max_steps=max_steps)


ADAPTERS.update({"brax:": _brax, "craftax:": _craftax, "navix:": _navix, "kinetix:": _kinetix})

