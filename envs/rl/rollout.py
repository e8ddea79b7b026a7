"""Rollouts and the RL fitness: episode returns of a :class:`~esx_envs.rl.Policy` in an
:class:`~esx_envs.rl.Adapter` environment.

* :func:`rollout` -- one episode (``max_steps`` steps, rewards summed only while the episode has not ended:
  ``terminated or truncated``);
* :func:`make_fitness` -- ``(member_view, key, obs_stats) -> (mean return, ObsMoments)``: ``episodes`` episodes per
  member, averaged; the aux output holds the moments of the observations the member saw, which
  :func:`update_obs_stats` folds into the running normalisation statistics (:class:`ObsStats`);
* :func:`make_evaluator` -- greedy returns of the unperturbed policy.

The package docstring (:mod:`esx_envs.rl`) has a worked example.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from esx_envs.rl.adapters import Adapter
from esx_envs.rl.policy import ActionMode, Policy

# ----------------------------------------------------------------------------------------------------------------
# Observation normalisation
# ----------------------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObsStats:
    """Running observation statistics (all observations seen so far, pooled).

    Attributes:
      count: ``float32[]`` number of observations.
      mean: ``float32[*obs_shape]``.
      var: ``float32[*obs_shape]`` population variance (``ddof=0``).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array

    @classmethod
    def create(cls, observation_shape: tuple[int, ...]) -> "ObsStats":
        """Empty statistics: normalising with them is the identity (mean 0, var 1)."""
        return cls(jnp.zeros((), jnp.float32), jnp.zeros(observation_shape, jnp.float32),
                   jnp.ones(observation_shape, jnp.float32))

    def normalize(self, obs: jax.Array, clip: float = 10.0) -> jax.Array:
        """``clip((obs - mean) / sqrt(var + 1e-8), -clip, clip)``."""
        return jnp.clip((obs - self.mean) * lax.rsqrt(self.var + 1e-8), -clip, clip)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObsMoments:
    """Moments of the observations one rollout saw, shifted by the normalisation mean in use (for precision).

    Attributes:
      count: ``float32[]``; ``sum``, ``sum_sq``: ``float32[*obs_shape]`` of ``obs - shift`` and its square.
    """

    count: jax.Array
    sum: jax.Array
    sum_sq: jax.Array


def update_obs_stats(stats: ObsStats, moments: ObsMoments) -> ObsStats:
    """Folds the moments of a batch of rollouts (any leading axes) into the running statistics.

    The batch mean and variance come from the shifted sums (shift = ``stats.mean``); pooling uses the parallel
    formula ``M2 = M2_a + M2_b + δ² n_a n_b / n``. With no prior data the result is exactly the batch's mean and
    (``ddof=0``) variance.
    """
    axes = tuple(range(moments.count.ndim))
    n_b = jnp.sum(moments.count, axis=axes)
    s1 = jnp.sum(moments.sum, axis=axes)
    s2 = jnp.sum(moments.sum_sq, axis=axes)
    safe = jnp.maximum(n_b, 1.0)
    d_mean = s1 / safe                       # batch mean minus shift
    var_b = jnp.maximum(s2 / safe - jnp.square(d_mean), 0.0)
    n_a = stats.count
    n = n_a + n_b
    w_b = n_b / jnp.maximum(n, 1.0)
    var_a = jnp.where(n_a > 0, stats.var, 0.0)
    mean = stats.mean + d_mean * w_b
    m2 = var_a * n_a + var_b * n_b + jnp.square(d_mean) * n_a * w_b
    var = jnp.where(n > 0, m2 / jnp.maximum(n, 1.0), stats.var)
    keep = n_b > 0
    return ObsStats(count=n, mean=jnp.where(keep, mean, stats.mean), var=jnp.where(keep, var, stats.var))


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and the fitness function
# ----------------------------------------------------------------------------------------------------------------
def rollout(adapter: Adapter, policy: Policy, params: Any, key: jax.Array, stats: ObsStats | None = None, *,
            mode: ActionMode = "greedy", max_steps: int | None = None,
            stop_early: bool = True) -> tuple[jax.Array, jax.Array, ObsMoments]:
    """One episode; returns ``(return float32[], length int32[], ObsMoments)``.

    Rewards are summed only for steps taken before the episode ended (the step that terminates or truncates counts;
    nothing after it). The loop stops as soon as the episode ends (under ``vmap``, when every episode has ended)
    and never runs more than ``max_steps`` (default: ``adapter.max_steps``) steps. The moments cover the
    observations the policy acted on, shifted by ``stats.mean``. ``stop_early=False`` always runs ``max_steps``
    steps (same result, fixed cost: for throughput measurements). If the adapter has an ``observe``, the loop
    carries the environment state only and observes it at each step (same result, faster; see :class:`Adapter`).
    """
    limit = int(adapter.max_steps if max_steps is None else max_steps)
    params = policy.prepare(params)
    key_reset, key_act, key_env = jax.random.split(key, 3)
    obs0, env0 = adapter.reset(key_reset)
    shift = stats.mean if stats is not None else jnp.zeros(obs0.shape, jnp.float32)
    zeros = jnp.zeros(obs0.shape, jnp.float32)
    # The whole episode's action noise in one draw (step t reads row t); the environment's own per-step key is
    # folded in only if the environment uses it (deterministic ones drop it at compile time).
    noise = policy.action_noise(key_act, (limit,)) if mode == "stochastic" else None

    observe = getattr(adapter, "observe", None)

    def act(obs, t):
        x = stats.normalize(obs) if stats is not None else obs
        return policy.act_with_noise(params, x, None if noise is None else noise[jnp.minimum(t, limit - 1)], mode)

    def cond(carry):
        t, _, _, _, done, *_ = carry
        return (t < limit) & ~done if stop_early else t < limit

    # With policy.carry_action ("units" form) the action for step t is computed at the end of step t - 1 and
    # carried: a carried value is computed once, while XLA:CPU copied the elementwise policy into each fusion of the
    # environment step that used the action (two to four policies per step). The "vector" form runs faster
    # computing the action at the top of the step (docs/rl.md).
    carried = policy.carry_action

    def body(carry):
        t, obs, env_state, action, done, ret, n, s1, s2 = carry
        if observe is not None:
            obs = observe(env_state)
        if not carried:
            action = act(obs, t)
        obs2, env2, reward, term, trunc = adapter.step(jax.random.fold_in(key_env, t), env_state, action)
        d = obs - shift
        live = (~done).astype(jnp.float32)
        ended = term | trunc | (t + 1 >= limit)
        # Freeze the environment once finished (only matters under vmap, where the loop runs for the slowest).
        env_next = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), env_state, env2)
        obs_next = None if observe is not None else jnp.where(done, obs, obs2)
        action_next = None
        if carried:
            action_next = act(observe(env_next) if observe is not None else obs_next, t + 1)
        return (t + 1, obs_next, env_next, action_next, done | ended, ret + live * reward, n + live,
                s1 + live * d, s2 + live * jnp.square(d))

    init = (jnp.zeros((), jnp.int32), None if observe is not None else obs0, env0,
            act(obs0, 0) if carried else None, jnp.zeros((), bool), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32), zeros, zeros)
    t, _, _, _, _, ret, n, s1, s2 = lax.while_loop(cond, body, init)
    return ret, n.astype(jnp.int32), ObsMoments(n, s1, s2)


def make_fitness(adapter: Adapter, policy: Policy, *, episodes: int = 1, mode: ActionMode = "stochastic",
                 obs_norm: bool = False, max_steps: int | None = None, stop_early: bool = True) -> Callable:
    """The esx fitness ``(member_view, key, stats: ObsStats) -> (mean return float32[], ObsMoments)``.

    Use with ``strategy.evaluate(state, fitness, key, stats, has_aux=True)``. ``episodes`` episodes (independent
    keys) are run side by side and their returns averaged. With ``obs_norm=False`` the stats are ignored (the
    moments are still reported). The returned function is a fresh object per call: build it once per run so that
    jitted steps do not recompile.
    """
    if episodes < 1:
        raise ValueError(f"episodes={episodes}; must be >= 1")

    def fitness(view, key, stats):
        norm = stats if obs_norm else None

        def one(k):
            ret, _, moments = rollout(adapter, policy, view, k, norm, mode=mode, max_steps=max_steps,
                                      stop_early=stop_early)
            return ret, moments

        if episodes == 1:
            return one(jax.random.split(key, 1)[0])
        # Episodes one after another (lax.map), not vmapped: under the population's vmap a second, minor batch
        # axis of `episodes` made XLA:CPU's per-step code of the rollout about 2x slower (same values either way).
        ret, moments = lax.map(one, jax.random.split(key, episodes))
        moments = ObsMoments(jnp.sum(moments.count), jnp.sum(moments.sum, 0), jnp.sum(moments.sum_sq, 0))
        return jnp.mean(ret), moments

    return fitness


def make_evaluator(adapter: Adapter, policy: Policy, *, episodes: int = 100, mode: ActionMode = "greedy",
                   obs_norm: bool = False, max_steps: int | None = None) -> Callable:
    """A jitted ``(params, key, stats) -> float32[episodes]`` returns of the unperturbed policy."""

    @jax.jit
    def evaluate(params, key, stats):
        norm = stats if obs_norm else None
        keys = jax.random.split(key, episodes)
        ret, _, _ = jax.vmap(lambda k: rollout(adapter, policy, params, k, norm, mode=mode,
                                                max_steps=max_steps))(keys)
        return ret

    return evaluate
