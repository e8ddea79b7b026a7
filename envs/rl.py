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
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

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
      form: how the forward is written (same values up to float rounding):

        * ``"vector"``: each layer one vector product (:func:`esx.dense`) of ``float[d]`` activations;
        * ``"units"``: every unit a separate scalar (Python lists of them), each layer written out as
          ``d_in x d_out`` multiply-adds plus the low-rank terms ``c (x·a_q) b_q``. Under the population's ``vmap``
          each unit is then one contiguous ``float[N]`` array and the whole policy becomes one elementwise
          loop over members, instead of small matrix products and per-member dots over ``[N, d]`` activations
          (4→32→2 CartPole policy, 4096 members, 200 steps on a 2-core CPU: EGGROLL evaluate + tell
          51 → 31 ms per generation; ``docs/rl.md``). The unrolled code grows as ``Σ d_in d_out``, and so
          does compile time;
        * ``"auto"`` (default): ``"units"`` when ``Σ d_in d_out <= UNITS_MAX_MACS`` and JAX's default backend
          is the CPU (read when the forward is traced), else ``"vector"``.
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
    form: Literal["auto", "vector", "units"] = "auto"

    #: The largest policy (``Σ d_in d_out`` over its layers) that ``form="auto"`` writes per unit on CPU.
    UNITS_MAX_MACS = 256

    def __post_init__(self):
        if self.form not in ("auto", "vector", "units"):
            raise ValueError(f"Policy form={self.form!r}; valid forms are 'auto', 'vector' and 'units'")

    @property
    def macs(self) -> int:
        """``Σ d_in d_out`` over the layers: multiply-adds of one forward (without the low-rank terms)."""
        sizes = [self.obs_size] + [self.width] * self.depth + [self.action_dim]
        return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))

    @classmethod
    def for_adapter(cls, adapter: Adapter, *, width: int = 64, depth: int = 2, layer_norm: bool = True,
                    action_std: float = 0.1, form: str = "auto") -> "Policy":
        low = None if adapter.action_low is None else tuple(float(x) for x in np.ravel(adapter.action_low))
        high = None if adapter.action_high is None else tuple(float(x) for x in np.ravel(adapter.action_high))
        return cls(int(math.prod(adapter.observation_shape)), adapter.action_kind, int(adapter.action_dim),
                   int(width), int(depth), bool(layer_norm), low, high, float(action_std), form)

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
        15-20% faster; ``docs/rl.md``). In the ``"units"`` form it splits the per-member factors, biases and
        matrices into scalars instead (:class:`_UnitMatrix`), once, outside the loop."""
        if self.resolved_form == "units":
            return {"hidden": [{k: (_split_units(v) if k == "w" else _split_vector(v)) for k, v in layer.items()}
                               for layer in params["hidden"]],
                    "out": {"w": _split_units(params["out"]["w"]), "b": _split_vector(params["out"]["b"])}}
        return esx.prepare(params)

    def __call__(self, params: Any, obs: jax.Array) -> jax.Array:
        """``obs: float[*obs_shape]`` -> ``float[action_dim]`` (logits, or the pre-``tanh`` action mean).

        ``params``: plain parameters, a member view (:class:`esx.LowRank` / :class:`esx.Full` leaves) or either
        after :meth:`prepare`."""
        x = jnp.reshape(obs, (-1,)).astype(jnp.float32)
        return self._units(params, x) if self.resolved_form == "units" else self._vector(params, x)

    @property
    def carry_action(self) -> bool:
        """Whether :func:`rollout` computes each action at the end of the previous step and carries it (the
        ``"units"`` form: XLA:CPU otherwise recomputed the elementwise policy inside every fusion of the
        environment step that reads the action) rather than at the top of the step (``"vector"``: faster so,
        e.g. the ``cartpole`` config's generation 11.5 -> 10.1 ms)."""
        return self.resolved_form == "units"

    @property
    def resolved_form(self) -> str:
        """``form``, with ``"auto"`` resolved for JAX's default backend (``"units"`` or ``"vector"``; read when the
        forward is traced)."""
        if self.form != "auto":
            return self.form
        return "units" if self.macs <= self.UNITS_MAX_MACS and jax.default_backend() == "cpu" else "vector"

    def _units(self, params: Any, x: jax.Array) -> jax.Array:
        """The ``"units"`` form: the forward on lists of per-unit scalars (see the class docstring)."""
        h = [x[k] for k in range(x.shape[0])]
        for layer in params["hidden"]:
            h = _unit_linear(h, layer["w"], layer["b"])
            if self.layer_norm:
                n = len(h)
                mu = _unit_sum(h) / n
                d = [hj - mu for hj in h]
                inv = lax.rsqrt(_unit_sum([dj * dj for dj in d]) / n + 1e-5)
                scale, shift = _split_vector(layer["scale"]), _split_vector(layer["shift"])
                h = [dj * inv * scale[j] + shift[j] for j, dj in enumerate(d)]
            h = [jax.nn.relu(hj) for hj in h]
        return jnp.stack(_unit_linear(h, params["out"]["w"], params["out"]["b"]))

    def _vector(self, params: Any, h: jax.Array) -> jax.Array:
        """The ``"vector"`` form: one :meth:`product` per layer."""
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
        """The randomness of ``shape`` stochastic actions, drawn in one call: ``float32[*shape]`` standard logistic
        draws (two discrete actions), uniforms in ``[0, 1)`` (more discrete actions) or
        ``float32[*shape, action_dim]`` standard normals (continuous).

        :func:`rollout` draws a whole episode's noise before its loop (one vectorised draw instead of a key split
        and a draw per step, which on CPU cost more than the policy itself) and feeds step ``t`` its slice."""
        if self.action_kind == "discrete":
            if self.action_dim == 2:
                return jax.random.logistic(key, shape, jnp.float32)
            return jax.random.uniform(key, shape, jnp.float32)
        return jax.random.normal(key, (*shape, self.action_dim), jnp.float32)

    def act_with_noise(self, params: Any, obs: jax.Array, noise: jax.Array | None,
                       mode: ActionMode = "greedy") -> jax.Array:
        """:meth:`act` with its randomness given: ``noise`` is one element of :meth:`action_noise` (ignored, and may
        be ``None``, when ``mode="greedy"``).

        Discrete stochastic actions are sampled from the softmax. Two actions: ``noise`` is a standard logistic
        draw ``x`` (the logit of a uniform) and action 1 is taken iff ``logits[1] + x > logits[0]``, which has
        probability ``sigmoid(logits[1] - logits[0])`` (no exponential; a comparison, like the greedy choice, whose
        ties give action 0 as ``argmax`` does). More actions: by inverse CDF of a uniform ``u``, action ``k`` is
        taken when ``c_{k-1} <= u c_K < c_k`` with ``c`` the cumulative sums of ``exp(logits - max)``, so an action
        whose probability underflows to 0 is never taken."""
        out = self(params, obs)
        if self.action_kind == "discrete":
            if self.action_dim == 2:
                # Two actions: a comparison (argmax's tie rule: action 0). Stochastic: `noise` is the logit of a
                # uniform, a standard logistic draw, so action 1 has probability sigmoid(out[1] - out[0]).
                return (out[1] + (0.0 if mode == "greedy" else noise) > out[0]).astype(jnp.int32)
            if mode == "greedy":
                return jnp.argmax(out).astype(jnp.int32)
            if self.action_dim > 16:
                c = jnp.cumsum(jnp.exp(out - jnp.max(out)))
                return jnp.sum(c[:-1] <= noise * c[-1]).astype(jnp.int32)
            # Few actions: the max and the running sums written out, elementwise. Under vmap XLA:CPU lowered the
            # small cumsum to a reduce-window plus a matrix product, and the max (a reduction) into a YNNPACK
            # fusion with the exp; together they took most of a stochastic CartPole rollout.
            # One scalar per action (not a vector op on `out`): with the "units" form `out` is a stack of separate
            # per-unit values, and a vector exp made XLA:CPU compute the whole policy inside it once per action.
            top = out[0]
            for k in range(1, self.action_dim):
                top = jnp.maximum(top, out[k])
            e = [jnp.exp(out[k] - top) for k in range(self.action_dim)]
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


def _unit_sum(xs: list) -> jax.Array:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


class _UnitMatrix(NamedTuple):
    """A matrix leaf split into scalars for the ``"units"`` form (made once, before a rollout's loop, by
    :meth:`Policy.prepare`): ``w[k][j]`` (nested tuples of scalars; for a low-rank leaf its shared ``float[m, n]``
    matrix, indexed the same way), the rank columns ``a[q][k]`` / ``b[q][j]`` and ``coef`` (``None`` and empty
    columns for plain or per-member matrices)."""

    w: tuple
    a: tuple
    b: tuple
    coef: Any


def _split_units(w: Any) -> _UnitMatrix:
    if isinstance(w, _UnitMatrix):
        return w
    if isinstance(w, esx.LowRank) and w.ndim == 2:
        base, us = w.base, [w.a[:, q] for q in range(w.a.shape[-1])]
        vs, coef = [w.b[:, q] for q in range(w.b.shape[-1])], w.coef
    elif isinstance(w, esx.SplitLowRank):
        base, us, vs, coef = w.base, list(w.a), list(w.b), w.coef
    else:
        base, us, vs, coef = esx.value(w), [], [], None
    m, n = base.shape
    # The shared matrix of a low-rank leaf stays whole (its entries are read inside the loop's fusion); splitting it
    # here made one tiny fusion per entry, which doubled compile time.
    w_units = base if coef is not None else tuple(tuple(base[k, j] for j in range(n)) for k in range(m))
    return _UnitMatrix(w_units,
                       tuple(tuple(u[k] for k in range(m)) for u in us),
                       tuple(tuple(v[j] for j in range(n)) for v in vs), coef)


def _split_vector(v: Any) -> tuple:
    if isinstance(v, tuple):
        return v
    v = esx.value(v)
    return tuple(v[j] for j in range(v.shape[0]))


def _unit_linear(xs: list, w: Any, bias: Any) -> list:
    """One layer of the ``"units"`` form: ``xs`` (``d_in`` scalars) -> ``d_out`` scalars
    ``Σ_k xs[k] W[k, j] + bias[j] + Σ_q c (xs·a_q) b_q[j]``.

    ``w``: a plain ``float[d_in, d_out]`` matrix, an :class:`esx.LowRank` / :class:`esx.SplitLowRank` leaf (the
    shared ``W`` stays unbatched: each ``W[k, j]`` is a scalar broadcast over the population) or an
    :class:`esx.Full` leaf (a per-member matrix, as under Open_ES)."""
    w = _split_units(w)
    m, n = (w.w.shape if isinstance(w.w, jax.Array) else (len(w.w), len(w.w[0])))
    if len(xs) != m:
        raise ValueError(f"Policy: a layer of shape {(m, n)} got {len(xs)} inputs")
    bias = _split_vector(bias)
    # c (xs·a_q): one per-member scalar per rank column
    s = [w.coef.astype(xs[0].dtype) * _unit_sum([xs[k] * u[k] for k in range(m)]) for u in w.a]
    outs = []
    for j in range(n):
        o = _unit_sum([xs[k] * w.w[k][j] for k in range(m)]) + bias[j]
        for sq, v in zip(s, w.b):
            o = o + sq * v[j]
        outs.append(o)
    return outs


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
