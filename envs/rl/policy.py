"""The RL policy: an MLP written with :func:`esx.dense` / :func:`esx.value` (so EGGROLL's perturbations of its matrices
stay low-rank inside the forward), in a vector form and a per-unit form (see :class:`Policy`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import esx
from esx_envs.rl.adapters import ActionKind, Adapter

ActionMode = Literal["greedy", "stochastic"]

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
        15-20% faster; ``docs/results_history.md``). In the ``"units"`` form it splits the per-member factors, biases and
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


