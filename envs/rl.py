"""RL fitness for esx: episode return of an MLP policy in any JAX environment behind the :class:`Adapter` shape.

Three pieces, each usable alone:

* :class:`Adapter` -- the environment shape (``reset`` / ``step`` as pure functions, plus spaces). :class:`Gymnax`
  wraps any gymnax environment by name (classic control, MinAtar, bsuite, misc); other JAX suites (brax, navix,
  jumanji, craftax) fit by implementing the same five members (see ``docs/rl.md``).
* :class:`Policy` -- an MLP written with :func:`esx.dense` / :func:`esx.value`, so EGGROLL's perturbations of its
  matrices stay low-rank inside the forward (hidden layers: ``dense -> LayerNorm -> ReLU``, as in the paper).
* :func:`make_fitness` -- ``(member_view, key, obs_stats) -> (mean return, ObsMoments)``: ``episodes`` episodes per
  member, rewards summed only while the episode has not ended (``terminated or truncated``), averaged. The aux output
  holds the moments of the observations the member saw, which :func:`update_obs_stats` folds into the running
  normalisation statistics (see :class:`ObsStats`).

Example::

    adapter = rl.Gymnax("CartPole-v1")
    policy = rl.Policy.for_adapter(adapter, width=32, depth=2)
    fitness = rl.make_fitness(adapter, policy, episodes=2)
    strategy = esx.eggroll(population_size=256, rank=4, sigma=0.2, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(0), policy.init(jax.random.key(1)))
    stats = rl.ObsStats.create(adapter.observation_shape)
    returns, moments = strategy.evaluate(state, fitness, jax.random.key(2), stats, has_aux=True)
    state, metrics = strategy.tell(state, returns)
    stats = rl.update_obs_stats(stats, moments)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import esx

ActionKind = Literal["discrete", "continuous"]
ActionMode = Literal["greedy", "stochastic"]


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
    more for the observation (a 4096-member CartPole rollout, pure inference: 36 -> 22 ms; ``docs/rl.md``).
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
    from esx_envs.jumanji_adapter import Jumanji  # optional extra `rl-jumanji`

    return Jumanji(env_name, max_steps=max_steps)


ADAPTERS["jumanji:"] = _jumanji


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
    """An MLP policy ``obs -> logits`` (discrete) or ``obs -> action`` (continuous, ``tanh`` scaled to the bounds).

    Hidden layer ``l``: ``h = relu(LayerNorm(h W_l + b_l))`` (the paper's "pqn" block; ``layer_norm=False`` drops the
    norm). Parameters are a plain dict ``{"hidden": [{"w": [d_in, width], "b", "scale", "shift"}, ...],
    "out": {"w": [width, action_dim], "b"}}``; matrices go through :func:`esx.dense` (low-rank under EGGROLL).

    Attributes:
      obs_size: flattened observation size.
      action_kind / action_dim / action_low / action_high: as in :class:`Adapter`.
      width, depth: hidden layer width and count (``depth = 0`` is a linear policy).
      layer_norm: LayerNorm before each ReLU.
      action_std: standard deviation of the Gaussian exploration noise of continuous ``"stochastic"`` actions,
        as a fraction of the half-range of the bounds.
    """

    obs_size: int
    action_kind: ActionKind
    action_dim: int
    width: int = 64
    depth: int = 2
    layer_norm: bool = True
    action_low: tuple | None = None
    action_high: tuple | None = None
    action_std: float = 0.1

    @classmethod
    def for_adapter(cls, adapter: Adapter, *, width: int = 64, depth: int = 2, layer_norm: bool = True,
                    action_std: float = 0.1) -> "Policy":
        low = None if adapter.action_low is None else tuple(float(x) for x in np.ravel(adapter.action_low))
        high = None if adapter.action_high is None else tuple(float(x) for x in np.ravel(adapter.action_high))
        return cls(int(math.prod(adapter.observation_shape)), adapter.action_kind, int(adapter.action_dim),
                   int(width), int(depth), bool(layer_norm), low, high, float(action_std))

    def init(self, key: jax.Array) -> dict:
        """Parameters: ``w ~ N(0, 1/d_in)``, zero biases, unit LayerNorm scale; the output layer is scaled by 0.01
        so the initial policy is near-uniform (discrete) or near-centred (continuous)."""
        sizes = [self.obs_size] + [self.width] * self.depth
        keys = jax.random.split(key, self.depth + 1)
        hidden = []
        for i in range(self.depth):
            w = jax.random.normal(keys[i], (sizes[i], sizes[i + 1]), jnp.float32) / math.sqrt(sizes[i])
            layer = {"w": w, "b": jnp.zeros(sizes[i + 1], jnp.float32)}
            if self.layer_norm:
                layer["scale"] = jnp.ones(sizes[i + 1], jnp.float32)
                layer["shift"] = jnp.zeros(sizes[i + 1], jnp.float32)
            hidden.append(layer)
        w_out = jax.random.normal(keys[-1], (sizes[-1], self.action_dim), jnp.float32) * (0.01 / math.sqrt(sizes[-1]))
        return {"hidden": hidden, "out": {"w": w_out, "b": jnp.zeros(self.action_dim, jnp.float32)}}

    def prepare(self, params: Any) -> Any:
        """:func:`esx.prepare` before a rollout: full-rank leaves (biases, norm parameters) become plain arrays, so
        the per-step forward does not redo ``base + σ ε``, and rank > 1 matrices have their columns split once
        (:class:`esx.SplitLowRank`) instead of sliced at every step (rank 4, 2x64 policy, 200 steps: evaluation
        15-20% faster; ``docs/rl.md``)."""
        return esx.prepare(params)

    def __call__(self, params: Any, obs: jax.Array) -> jax.Array:
        """``obs: float[*obs_shape]`` -> ``float[action_dim]`` (logits, or the pre-``tanh`` action mean)."""
        h = jnp.reshape(obs, (-1,)).astype(jnp.float32)
        for layer in params["hidden"]:
            h = self.product(h, layer["w"]) + esx.value(layer["b"])
            if self.layer_norm:
                mu = jnp.mean(h)
                h = (h - mu) * lax.rsqrt(jnp.mean(jnp.square(h - mu)) + 1e-5)
                h = h * esx.value(layer["scale"]) + esx.value(layer["shift"])
            h = jax.nn.relu(h)
        return self.product(h, params["out"]["w"]) + esx.value(params["out"]["b"])

    def product(self, x: jax.Array, w: Any) -> jax.Array:
        """One layer's ``x @ w`` (``x: float[d_in]``, ``w: float[d_in, d_out]`` or a perturbed leaf):
        :func:`esx.dense`. A subclass may compute it another way for plain weights (the Flax variant of
        ``scripts/compare_evosax_cartpole.py``'s Open_ES side)."""
        return esx.dense(x, w)

    def action_noise(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        """The randomness of ``shape`` stochastic actions, drawn in one call: ``float32[*shape]`` uniforms in
        ``[0, 1)`` (discrete) or ``float32[*shape, action_dim]`` standard normals (continuous).

        :func:`rollout` draws a whole episode's noise before its loop (one vectorised draw instead of a key split
        and a draw per step, which on CPU cost more than the policy itself) and feeds step ``t`` its slice."""
        if self.action_kind == "discrete":
            return jax.random.uniform(key, shape, jnp.float32)
        return jax.random.normal(key, (*shape, self.action_dim), jnp.float32)

    def act_with_noise(self, params: Any, obs: jax.Array, noise: jax.Array | None,
                       mode: ActionMode = "greedy") -> jax.Array:
        """:meth:`act` with its randomness given: ``noise`` is one element of :meth:`action_noise` (ignored, and may
        be ``None``, when ``mode="greedy"``).

        Discrete stochastic actions are sampled from the softmax by inverse CDF: action ``k`` is taken when
        ``c_{k-1} <= u c_K < c_k`` with ``c`` the cumulative sums of ``exp(logits - max)``, so an action whose
        probability underflows to 0 is never taken."""
        out = self(params, obs)
        if self.action_kind == "discrete":
            if mode == "greedy":
                return jnp.argmax(out).astype(jnp.int32)
            if self.action_dim > 16:
                c = jnp.cumsum(jnp.exp(out - jnp.max(out)))
                return jnp.sum(c[:-1] <= noise * c[-1]).astype(jnp.int32)
            # Few actions: the max and the running sums written out, elementwise. Under vmap XLA:CPU lowered the
            # small cumsum to a reduce-window plus a matrix product, and the max (a reduction) into a YNNPACK
            # fusion with the exp; together they took most of a stochastic CartPole rollout.
            top = out[0]
            for k in range(1, self.action_dim):
                top = jnp.maximum(top, out[k])
            e = jnp.exp(out - top)
            c = [e[0]]
            for k in range(1, self.action_dim):
                c.append(c[-1] + e[k])
            u = noise * c[-1]
            action = jnp.zeros((), jnp.int32)
            for ck in c[:-1]:
                action = action + (ck <= u).astype(jnp.int32)
            return action
        low = jnp.asarray(self.action_low, jnp.float32)
        high = jnp.asarray(self.action_high, jnp.float32)
        half, mid = (high - low) / 2, (high + low) / 2
        a = jnp.tanh(out)
        if mode == "stochastic":
            a = a + self.action_std * noise
        return jnp.clip(mid + half * a, low, high)

    def act(self, params: Any, obs: jax.Array, key: jax.Array, mode: ActionMode = "greedy") -> jax.Array:
        """An action: ``int32[]`` (discrete; argmax or a sample of the softmax) or ``float[action_dim]`` in the
        bounds (continuous; ``tanh`` of the output, plus Gaussian noise of ``action_std`` x half-range in
        ``"stochastic"`` mode, clipped). Same as ``act_with_noise(params, obs, action_noise(key), mode)``."""
        noise = self.action_noise(key) if mode == "stochastic" else None
        return self.act_with_noise(params, obs, noise, mode)


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

    def cond(carry):
        t, _, _, done, *_ = carry
        return (t < limit) & ~done if stop_early else t < limit

    def body(carry):
        t, obs, env_state, done, ret, n, s1, s2 = carry
        if observe is not None:
            obs = observe(env_state)
        x = stats.normalize(obs) if stats is not None else obs
        action = policy.act_with_noise(params, x, None if noise is None else noise[t], mode)
        obs2, env2, reward, term, trunc = adapter.step(jax.random.fold_in(key_env, t), env_state, action)
        d = obs - shift
        live = (~done).astype(jnp.float32)
        ended = term | trunc | (t + 1 >= limit)
        # Freeze the environment once finished (only matters under vmap, where the loop runs for the slowest).
        env_next = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), env_state, env2)
        obs_next = None if observe is not None else jnp.where(done, obs, obs2)
        return (t + 1, obs_next, env_next, done | ended, ret + live * reward, n + live,
                s1 + live * d, s2 + live * jnp.square(d))

    init = (jnp.zeros((), jnp.int32), None if observe is not None else obs0, env0, jnp.zeros((), bool),
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, zeros)
    t, _, _, _, ret, n, s1, s2 = lax.while_loop(cond, body, init)
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
