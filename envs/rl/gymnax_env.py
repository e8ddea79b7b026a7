"""Any esx :class:`~esx_envs.rl.adapters.Adapter` as a gymnax-style environment, for RL code written against gymnax's
API (rejax's PPO, purejaxrl-style loops): the PPO baseline of ``scripts/rl_table.py`` runs through it, with the same
episode limit as the ES runs. Written for every suite esx adapts (gymnax, Brax, Craftax, Jumanji, Navix, Kinetix);
stepped against the adapter on gymnax, Brax, Navix and Jumanji, and PPO trained through it on Brax, in the tests.

    from esx_envs.rl import make_adapter
    from esx_envs.rl.gymnax_env import AdapterEnv

    env = AdapterEnv(make_adapter("brax:ant", max_steps=1000))
    params = env.default_params                        # EnvParams(max_steps_in_episode=1000)
    obs, state = env.reset(key, params)                # obs: float32[*adapter.observation_shape]
    obs, state, reward, done, info = env.step(key, state, action, params)

``step`` returns gymnax 0.x's five values and **auto-resets** as gymnax's ``step`` does: when the step terminates or
truncates (the adapter's own flags, or the episode's step count reaching ``params.max_steps_in_episode``, which
can shorten the adapter's ``max_steps`` but not lengthen it: a larger concrete value raises ``ValueError``), the
returned observation and state are those of a fresh episode drawn with the second half of the step's key; ``reward``
and ``done`` belong to the step that ended; ``info`` holds ``terminated`` and ``truncated`` (``truncated`` only where
the episode did not terminate). ``observation_space`` is an unbounded ``Box`` of the adapter's shape;
``action_space`` is ``Discrete(action_dim)`` or a ``Box`` of the adapter's bounds. Parity with the adapter (and so
with each suite's own loop, ``tests/test_rl_suites.py``) is tested in ``tests/test_rl_gymnax_env.py``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class EnvParams(NamedTuple):
    """``max_steps_in_episode``: the step limit (truncation), the adapter's ``max_steps`` by default."""

    max_steps_in_episode: int


class EnvState(NamedTuple):
    """``env``: the adapter's state; ``t``: ``int32[]`` steps taken in the current episode."""

    env: Any
    t: jax.Array


def _select(done: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``done`` else ``old``, leaf by leaf (works for typed PRNG-key leaves too)."""
    return jax.tree_util.tree_map(lambda a, b: jax.lax.select(jnp.broadcast_to(done, jnp.shape(a)), a, b), new, old)


class AdapterEnv:
    """A gymnax-style environment over an esx adapter (see the module docstring). Stateless: copies are itself."""

    def __init__(self, adapter: Any):
        if not int(adapter.max_steps) >= 1:
            raise ValueError(f"AdapterEnv: the adapter's max_steps is {adapter.max_steps}; episodes need a limit >= 1 "
                             "(make_adapter(name, max_steps=None) gives the suite's own)")
        self.adapter = adapter

    def __deepcopy__(self, memo):   # rejax deep-copies its config, which holds the environment
        return self

    def __copy__(self):
        return self

    @property
    def name(self) -> str:
        return str(getattr(self.adapter, "name", type(self.adapter).__name__))

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=int(self.adapter.max_steps))

    @property
    def num_actions(self) -> int:
        return int(self.adapter.action_dim)

    def observation_space(self, params: EnvParams | None = None):
        from gymnax.environments import spaces

        return spaces.Box(-jnp.inf, jnp.inf, tuple(self.adapter.observation_shape), jnp.float32)

    def action_space(self, params: EnvParams | None = None):
        from gymnax.environments import spaces

        a = self.adapter
        if a.action_kind == "discrete":
            return spaces.Discrete(int(a.action_dim))
        return spaces.Box(jnp.asarray(a.action_low, jnp.float32), jnp.asarray(a.action_high, jnp.float32),
                          (int(a.action_dim),), jnp.float32)

    def reset(self, key: jax.Array, params: EnvParams | None = None) -> tuple[jax.Array, EnvState]:
        """``(obs float32[*observation_shape], EnvState)`` of a fresh episode."""
        obs, env_state = self.adapter.reset(key)
        return jnp.asarray(obs, jnp.float32), EnvState(env_state, jnp.zeros((), jnp.int32))

    def step(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams | None = None):
        """``(obs, state, reward float32[], done bool[], info)``, auto-resetting after a finished episode."""
        params = self.default_params if params is None else params
        limit = params.max_steps_in_episode
        if not isinstance(limit, jax.core.Tracer) and int(limit) > int(self.adapter.max_steps):
            raise ValueError(f"AdapterEnv.step: max_steps_in_episode={int(limit)} is above the adapter's max_steps="
                             f"{self.adapter.max_steps}, which truncates first; build the adapter with the longer "
                             "limit (make_adapter(name, max_steps=...))")
        k_step, k_reset = jax.random.split(key)
        if self.adapter.action_kind != "discrete":   # rejax squeezes a 1-D action to a scalar when it evaluates
            action = jnp.reshape(action, (int(self.adapter.action_dim),))
        obs, env_state, reward, terminated, truncated = self.adapter.step(k_step, state.env, action)
        t = state.t + 1
        terminated = jnp.asarray(terminated, bool)
        truncated = jnp.logical_and(jnp.logical_or(jnp.asarray(truncated, bool), t >= params.max_steps_in_episode),
                                    jnp.logical_not(terminated))
        done = jnp.logical_or(terminated, truncated)
        obs0, env_state0 = self.adapter.reset(k_reset)
        new_state = _select(done, EnvState(env_state0, jnp.zeros((), jnp.int32)), EnvState(env_state, t))
        obs = jnp.where(done, jnp.asarray(obs0, jnp.float32), jnp.asarray(obs, jnp.float32))
        info = {"terminated": terminated, "truncated": truncated}
        return obs, new_state, jnp.asarray(reward, jnp.float32), done, info


def episode_returns(env: AdapterEnv, key: jax.Array, actions: np.ndarray) -> list[float]:
    """Returns of the episodes a fixed action sequence plays from ``reset(key)`` through ``step`` (step ``t`` uses
    ``fold_in(key, t + 1)``), the last one unfinished; for tests and checks of the auto-reset."""
    obs, state = env.reset(key, env.default_params)
    step = jax.jit(env.step)
    out, total = [], 0.0
    for t, a in enumerate(actions):
        obs, state, r, done, _ = step(jax.random.fold_in(key, t + 1), state, jnp.asarray(a), env.default_params)
        total += float(r)
        if bool(done):
            out.append(total)
            total = 0.0
    out.append(total)
    return out


__all__ = ["AdapterEnv", "EnvParams", "EnvState", "episode_returns"]
