"""Model-side ops that work on plain arrays and on perturbed leaves.

Write the model once with :func:`dense`, :func:`embed` and :func:`value`; called on plain arrays they are the
ordinary operations, called on the member views that :func:`esx.Strategy.evaluate` builds they add the member's
perturbation without ever forming a per-member ``m×n`` matrix for low-rank leaves:

* :class:`LowRank` -- ``W + c · A Bᵀ`` with ``A: [m, r]``, ``B: [n, r]`` and ``c = σ s / √r`` (``s = ±1``, the
  antithetic sign). ``dense`` costs the shared product plus ``O(r (m + n))`` per input row.
* :class:`Full` -- ``W + c · ε`` with ``c = σ s`` (non-matrix leaves, and every leaf of ``open_es``).

Both are pytrees, so stacked layers can be sliced by ``lax.scan``: ``c`` has the shape of the stack axes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Layout = Literal["in_out", "out_in"]


def _refuse(op: str):
    """A dunder that raises the :class:`TypeError` of an unsupported operation ``op`` on a member view."""

    def method(self, *args, **kwargs):
        raise TypeError(
            f"esx.{type(self).__name__} (a member view of shape {tuple(self.shape)}) does not support {op}: a "
            "perturbed parameter reaches your fitness as a view. Use `x @ w` / esx.dense(x, w) (low-rank, the fast "
            "path), esx.embed(ids, w), or esx.value(w) for a plain array (it materialises a full m×n matrix per "
            "member); Flax, Equinox and evosax models run unchanged through esx.interop (linen, nnx, equinox, "
            "evosax): see docs/interop.md")

    method.__name__ = f"_refused_{op}"
    return method


class _ArrayLike:
    """What model code sees of a perturbed leaf: ``shape`` / ``dtype`` / ``ndim`` of its ``base``, the products
    ``x @ w`` (:func:`dense`, ``w: [m, n]``) and ``w @ x`` (``x @ wᵀ``: Equinox / PyTorch ``[out, in]`` weights), and
    ``w.T``; every other operation (``w + 1``, ``w[i]``, ``jnp.asarray(w)``, ``float(w)``) raises a
    :class:`TypeError` that names :func:`value` and :mod:`esx.interop`."""

    __array_priority__ = 100   # numpy defers ``ndarray @ view`` to ``view.__rmatmul__``

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self):
        return self.base.ndim

    @property
    def size(self):
        return self.base.size

    def __rmatmul__(self, x):
        """``x @ w = dense(x, w)``: ``x: float[..., m]``, ``w: [m, n]`` -> ``float[..., n]``."""
        return dense(x, self)

    def __matmul__(self, x):
        """``w @ x`` for ``w: [m, n]``: ``x: float[n]`` -> ``float[m]``; ``x: float[..., n, k]`` -> ``float[..., m, k]``
        (as ``jnp.matmul``), computed as :func:`dense` with ``layout="out_in"``, never materialising ``w``."""
        if self.ndim != 2:
            return _refuse("`@` on a stacked or tensor view (slice it to a matrix first)")(self)
        x = jnp.asarray(x)
        if x.ndim == 1:
            return dense(x, self, layout="out_in")
        return jnp.swapaxes(dense(jnp.swapaxes(x, -1, -2), self, layout="out_in"), -1, -2)

    __add__ = __radd__ = _refuse("`+`")
    __sub__ = __rsub__ = _refuse("`-`")
    __mul__ = __rmul__ = _refuse("`*`")
    __truediv__ = __rtruediv__ = _refuse("`/`")
    __floordiv__ = __rfloordiv__ = _refuse("`//`")
    __pow__ = __rpow__ = _refuse("`**`")
    __neg__ = _refuse("negation")
    __pos__ = _refuse("unary `+`")
    __abs__ = _refuse("abs()")
    __getitem__ = _refuse("indexing (`w[...]`; Flax NNX reads `variable[...]`)")
    __iter__ = _refuse("iteration")
    __array__ = _refuse("conversion to an array (jnp.asarray / np.asarray)")
    __float__ = _refuse("float()")
    __int__ = _refuse("int()")

    def astype(self, dtype):
        return _refuse(f"astype({dtype})")(self)

    def reshape(self, *shape):
        return _refuse("reshape()")(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(_ArrayLike):
    """A low-rank perturbed matrix ``base + coef · a bᵀ``.

    Attributes:
      base: ``float[*stack, m, n]`` the unperturbed parameter (shared by the whole population).
      a: ``float[*stack, m, r]``.
      b: ``float[*stack, n, r]``.
      coef: ``float[*stack]`` equal to ``σ s / √r``.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    coef: jax.Array

    @property
    def T(self) -> "LowRank":
        """The transpose ``Wᵀ + c · B Aᵀ`` of a matrix view (still low-rank)."""
        if self.ndim != 2 or _tensor_rows(self) is not None:
            return _refuse("`.T` on a stacked or tensor view")(self)
        return LowRank(self.base.T, self.b, self.a, self.coef)


def _tensor_rows(w: LowRank) -> int | None:
    """``k`` for a *tensor* view (a leaf labelled ``"lowrank:k"``: ``base [*in, *out]``, ``a [*in, r]``,
    ``b [*out, r]``, one matrix whose rows are the first ``k`` axes), ``None`` for a matrix or a stack of them."""
    if w.base.ndim > 2 and w.a.ndim + w.b.ndim - 2 == w.base.ndim:
        return w.a.ndim - 1
    return None


def _as_matrix(w: LowRank) -> LowRank:
    """A tensor view as the ``[prod(in), prod(out)]`` matrix view it stands for (reshapes only)."""
    r = w.a.shape[-1]
    m, n = math.prod(w.a.shape[:-1]), math.prod(w.b.shape[:-1])
    return LowRank(w.base.reshape(m, n), w.a.reshape(m, r), w.b.reshape(n, r), w.coef)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Full(_ArrayLike):
    """A full-rank perturbed leaf ``base + coef · eps``.

    Attributes:
      base: ``float[*shape]``.
      eps: ``float[*shape]``.
      coef: ``float[*shape[:-1]]`` (a scalar for vectors and scalars), every entry ``σ s``: one coefficient
        per row, so that ``lax.scan`` can slice stacked leaves (e.g. biases ``[layers, d]``) like low-rank ones.
    """

    base: jax.Array
    eps: jax.Array
    coef: jax.Array

    @property
    def T(self) -> "Full":
        """The transpose of a matrix view."""
        if self.ndim != 2:
            return _refuse("`.T` on a view that is not a matrix")(self)
        return Full(self.base.T, self.eps.T, jnp.broadcast_to(self.coef[:1], self.base.shape[1:]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitLowRank(_ArrayLike):
    """A :class:`LowRank` matrix with its rank columns held as separate arrays: ``base + c · Σ_k a_k b_kᵀ``.

    Made by :func:`prepare` for a member view that is used many times in a loop (an RL rollout's steps, a
    decoder's tokens): inside a ``lax.while_loop``/``scan`` body, :func:`dense` on a :class:`LowRank` leaf slices
    ``a[:, k]`` and ``b[:, k]`` at every iteration, and XLA:CPU does not hoist those per-member copies out of the
    loop (a 2-layer 64-wide policy at rank 4 spent more time copying columns than multiplying).

    Attributes:
      base: ``float[m, n]``.
      a: tuple of ``r`` arrays ``float[m]``.
      b: tuple of ``r`` arrays ``float[n]``.
      coef: ``float[]`` equal to ``σ s / √r``.
    """

    base: jax.Array
    a: tuple
    b: tuple
    coef: jax.Array

    @property
    def T(self) -> "SplitLowRank":
        """The transpose (still low-rank)."""
        return SplitLowRank(self.base.T, self.b, self.a, self.coef)


def _is_leaf(x) -> bool:
    return isinstance(x, (LowRank, SplitLowRank, Full))


def prepare(view):
    """Resolves a member view for repeated use, e.g. once before an RL rollout's loop.

    :class:`Full` leaves become plain arrays (``base + c ε`` is computed once instead of at every use);
    2-D :class:`LowRank` leaves become :class:`SplitLowRank` (their columns sliced once; at rank 1 too: inside a
    ``scan`` XLA:CPU copied the loop-invariant factor for the slice ``a[:, 0]`` at every step); stacked
    (``ndim > 2``) low-rank leaves and plain arrays are returned as they are. :func:`dense`, :func:`embed` and
    :func:`value` give the same values on the result, up to float rounding.

    Args:
      view: any pytree (a member view from :meth:`esx.Strategy.evaluate`, or plain parameters).

    Returns:
      The same structure with the leaves resolved as above.
    """

    def resolve(x):
        if isinstance(x, Full):
            return value(x)
        if isinstance(x, LowRank) and x.ndim == 2:
            r = x.a.shape[-1]
            return SplitLowRank(x.base, tuple(x.a[:, k] for k in range(r)), tuple(x.b[:, k] for k in range(r)),
                                x.coef)
        return x

    return jax.tree_util.tree_map(resolve, view, is_leaf=_is_leaf)


def _split_product(x: jax.Array, u: tuple, v: tuple) -> jax.Array:
    """``Σ_k (x u_k) v_kᵀ`` for ``x: [..., m]``, ``u_k: [m]``, ``v_k: [n]``."""
    if x.ndim == 1:
        return _row_lowrank(x, u, v)
    out = (x @ u[0])[..., None] * v[0]
    for uk, vk in zip(u[1:], v[1:]):
        out = out + (x @ uk)[..., None] * vk
    return out


# One-row products with an input or output dimension at most this are computed elementwise on CPU (_row_product).
_TINY = 8


def _cpu_forms(x: jax.Array, *ws: jax.Array) -> bool:
    """Whether the CPU forms of :func:`_row_product` / :func:`_row_lowrank` apply: one float32 input row."""
    return x.ndim == 1 and all(jnp.dtype(a.dtype) == jnp.float32 for a in (x, *ws))


def _fma_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_k x[k] w[k]`` for ``x: [m]``, ``w: [m, ...]``: ``x @ w`` as ``m`` multiply-adds (no dot, no reduction)."""
    out = x[0] * w[0]
    for k in range(1, x.shape[0]):
        out = out + x[k] * w[k]
    return out


def _row_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x: [..., m]`` and ``w: [m, n]``.

    For one float32 input row (``x: [m]``) with a tiny ``m`` or ``n`` (<= 8: an RL policy's observation layer or
    action head), on CPU: ``m`` multiply-adds of rows of ``w`` (``m <= 8``) or ``n`` dot products with its columns.
    Under ``vmap`` over a population XLA:CPU runs ``x @ w`` as one small GEMM call per step plus a pass of its own
    for the bias and activation, while the elementwise form fuses with them (4→32→2 CartPole policy, 4096
    members, 200 steps: pure inference 1.7x faster, EGGROLL evaluate + tell 1.3x; ``docs/results_history.md``). Everything else,
    and other platforms (chosen at lowering, ``lax.platform_dependent``): ``x @ w``. Equal up to float rounding.
    """
    if w.ndim != 2 or not _cpu_forms(x, w) or min(w.shape) > _TINY:
        return x @ w
    m, n = w.shape

    def cpu(x, w):
        if m <= _TINY:
            return _fma_rows(x, w)
        return jnp.stack([jnp.dot(x, w[:, o]) for o in range(n)])

    return lax.platform_dependent(x, w, cpu=cpu, default=lambda x, w: x @ w)


def _row_lowrank(x: jax.Array, u, v) -> jax.Array:
    """``Σ_k (x·u_k) v_k`` for one input row ``x: [m]``, with ``u_k: [m]`` and ``v_k: [n]`` given as arrays
    ``u: [m, r]``, ``v: [n, r]`` or as tuples of ``r`` columns (:class:`SplitLowRank`).

    Computed one rank column at a time: a dot product times ``v_k``. Under ``vmap`` over members (each with its own
    ``u``, ``v``) the matrix form ``(x u) vᵀ`` of rank > 1 is a batched product of tiny per-member matrices, which
    XLA:CPU runs as one small GEMM call per member (3.5x slower rollouts at rank 4 for a 4→32→2 policy). On CPU
    with float32 the dot product is also used at rank 1, and for ``m <= 8`` it is ``m`` scalar multiply-adds (as in
    :func:`_row_product`); elsewhere rank 1 keeps the matrix form. Equal up to float rounding.
    """
    us = u if isinstance(u, tuple) else tuple(u[:, k] for k in range(u.shape[-1]))
    vs = v if isinstance(v, tuple) else tuple(v[:, k] for k in range(v.shape[-1]))

    def columns(fma):
        def f(x, us, vs):
            out = None
            for uk, vk in zip(us, vs):
                xu = _fma_rows(x, uk) if fma else jnp.dot(x, uk)
                out = xu * vk if out is None else out + xu * vk
            return out
        return f

    if isinstance(u, tuple) or u.shape[-1] > 1:
        default = columns(False)
    else:
        default = lambda x, us, vs: (x @ u) @ v.T  # noqa: E731  (rank 1: the matrix form, as before)
    if not _cpu_forms(x, *us, *vs):
        return default(x, us, vs)
    return lax.platform_dependent(x, us, vs, cpu=columns(x.shape[0] <= _TINY), default=default)


def _lowrank_product(x: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """``(x u) vᵀ`` for ``x: [..., m]``, ``u: [m, r]``, ``v: [n, r]``.

    One input row (``x: [m]``, e.g. one observation in an RL policy) goes through :func:`_row_lowrank`; inputs
    with several rows (sequences) keep the matrix form.
    """
    if x.ndim == 1:
        return _row_lowrank(x, u, v)
    return (x @ u) @ v.T


def _check_matrix(w, name: str) -> None:
    if w.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D weight, got shape {w.shape}; slice stacked layers first "
            "(for example with lax.scan over the leading axis)"
        )


def dense(x: jax.Array, w, *, layout: Layout = "in_out", rows: int | None = None) -> jax.Array:
    """``x @ W`` for ``layout="in_out"`` (Flax's ``kernel``) or ``x @ Wᵀ`` for ``layout="out_in"`` (PyTorch).

    Args:
      x: ``float[..., d_in]`` (``float[..., *in]`` for a tensor weight).
      w: a plain ``float[d_in, d_out]`` (``in_out``) / ``float[d_out, d_in]`` (``out_in``) array, or a
        :class:`LowRank` / :class:`Full` leaf of that shape; or a tensor weight ``[*in, *out]`` (a leaf labelled
        ``"lowrank:k"``, Flax's ``DenseGeneral`` kernel): one matrix whose rows are its first ``k`` axes, the last
        ``k`` axes of ``x`` contracted with them.
      layout: ``"in_out"`` or ``"out_in"``.
      rows: ``k`` for a tensor weight: needed for plain arrays and full views (the trained parameters), read off a
        tensor view (checked when given).

    Returns:
      ``float[..., d_out]`` (``float[..., *out]`` for a tensor weight).
    """
    if layout not in ("in_out", "out_in"):
        raise ValueError(f"dense: layout={layout!r}; valid layouts are 'in_out' and 'out_in'")
    view_rows = _tensor_rows(w) if isinstance(w, LowRank) else None
    if rows is not None and (view_rows if view_rows is not None else rows) != rows:
        raise ValueError(f"dense: rows={rows} but the view is a tensor over its first {view_rows} axes")
    if rows is not None and view_rows is None and (not isinstance(rows, int) or not 1 <= rows < w.ndim):
        raise ValueError(f"dense: rows={rows!r} for a weight of shape {tuple(w.shape)}; needs 1 <= rows < ndim")
    if rows is not None and view_rows is None:   # a plain / full tensor weight: the flattened matrix
        if layout != "in_out":
            raise ValueError(f"dense: a tensor weight (rows={rows}) takes layout='in_out' only")
        if tuple(x.shape[x.ndim - rows:]) != tuple(w.shape[:rows]):
            raise ValueError(f"dense: input {x.shape} does not end in the weight's input axes {w.shape[:rows]}")
        w = value(w)
        mat = w.reshape(math.prod(w.shape[:rows]), -1)
        return dense(x.reshape(x.shape[:x.ndim - rows] + (-1,)), mat).reshape(x.shape[:x.ndim - rows] + w.shape[rows:])
    if view_rows is not None:
        k = view_rows
        if layout != "in_out":
            raise ValueError(f"dense: a tensor view (label 'lowrank:{k}') takes layout='in_out' only")
        if tuple(x.shape[x.ndim - k:]) != tuple(w.a.shape[:-1]):
            raise ValueError(f"dense: input {x.shape} does not end in the view's input axes {w.a.shape[:-1]}")
        out = dense(x.reshape(x.shape[:x.ndim - k] + (-1,)), _as_matrix(w))
        return out.reshape(x.shape[:x.ndim - k] + w.b.shape[:-1])
    if isinstance(w, LowRank):
        _check_matrix(w, "dense")
        c = w.coef.astype(x.dtype)
        if layout == "in_out":  # x (W + c A Bᵀ) = x W + c (x A) Bᵀ
            return _row_product(x, w.base) + c * _lowrank_product(x, w.a.astype(x.dtype), w.b.astype(x.dtype))
        # x (W + c A Bᵀ)ᵀ = x Wᵀ + c (x B) Aᵀ
        return _row_product(x, w.base.T) + c * _lowrank_product(x, w.b.astype(x.dtype), w.a.astype(x.dtype))
    if isinstance(w, SplitLowRank):
        c = w.coef.astype(x.dtype)
        if layout == "in_out":
            return _row_product(x, w.base) + c * _split_product(x, w.a, w.b)
        return _row_product(x, w.base.T) + c * _split_product(x, w.b, w.a)
    if isinstance(w, Full):
        _check_matrix(w, "dense")
        w = value(w)
    return _row_product(x, w if layout == "in_out" else w.T)


def embed(ids: jax.Array, table) -> jax.Array:
    """Row lookup ``table[ids]`` of an embedding table ``float[vocab, dim]``.

    For a :class:`LowRank` table the perturbed row is ``W[t] + c · A[t] Bᵀ`` (only the looked-up rows of ``A`` are
    touched).

    Args:
      ids: ``int[...]``.
      table: plain ``float[vocab, dim]`` or a :class:`LowRank` / :class:`Full` leaf.

    Returns:
      ``float[..., dim]``.
    """
    if isinstance(table, LowRank):
        _check_matrix(table, "embed")
        c = table.coef.astype(table.base.dtype)
        return table.base[ids] + c * (table.a[ids] @ table.b.T)
    if isinstance(table, SplitLowRank):
        c = table.coef.astype(table.base.dtype)
        return table.base[ids] + c * sum(ak[ids][..., None] * bk for ak, bk in zip(table.a, table.b))
    if isinstance(table, Full):
        _check_matrix(table, "embed")
        return table.base[ids] + table.coef.astype(table.base.dtype)[ids][..., None] * table.eps[ids]
    return table[ids]


def value(v) -> jax.Array:
    """The (perturbed) value of a leaf as a plain array.

    Meant for non-matrix leaves (biases, norm scales). On a :class:`LowRank` leaf it materialises
    ``base + c · A Bᵀ`` -- correct, but it costs a full ``m×n`` matrix per member.
    """
    if isinstance(v, LowRank) and _tensor_rows(v) is not None:
        return value(_as_matrix(v)).reshape(v.base.shape)
    if isinstance(v, LowRank):
        c = v.coef.astype(v.base.dtype)[..., None, None]
        return v.base + c * jnp.einsum("...mr,...nr->...mn", v.a, v.b)
    if isinstance(v, SplitLowRank):
        c = v.coef.astype(v.base.dtype)
        return v.base + c * sum(jnp.outer(ak, bk) for ak, bk in zip(v.a, v.b))
    if isinstance(v, Full):
        c = v.coef.astype(v.base.dtype)
        return v.base + (c[..., None] if v.base.ndim >= 1 else c) * v.eps
    return v
