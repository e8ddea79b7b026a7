"""Integer ops of int8 models: the member-aware ops :func:`int_dense`, :func:`int_embed`, :func:`int_value` on
plain ``int8`` arrays and on the perturbed leaves :class:`IntLowRank` / :class:`IntFull` that
:func:`esx.int_eggroll.int_eggroll` builds, and the fixed-point helpers they use.

Fixed point: an ``int8`` holds a number with :data:`FRAC_BITS` = 4 fractional bits (16 = 1.0). Products
accumulate in ``int32``; :func:`rshift` rounds half up symmetrically (so antithetic partners are exact
opposites) and :func:`saturate` clips back to ``int8`` in ``[-127, 127]``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

FRAC_BITS = 4             # fixed point: 16 = 1.0


def rshift(x: jax.Array, k: jax.Array | int) -> jax.Array:
    """Sign-symmetric rounding right shift: ``sign(x) · floor((|x| + 2^(k-1)) / 2^k)`` (``k >= 0``).

    ``x: int32[...]``, ``k``: ``int32`` broadcastable to ``x``; returns ``int32[...]``.
    ``rshift(-x, k) == -rshift(x, k)``.
    """
    x = x.astype(jnp.int32)
    k = jnp.asarray(k, jnp.int32)
    mag = jnp.right_shift(jnp.abs(x) * 2 + jnp.left_shift(1, k), k + 1)
    return jnp.where(x < 0, -mag, mag)


def saturate(x: jax.Array) -> jax.Array:
    """``int32[...] -> int8[...]`` clipped to ``[-127, 127]``."""
    return jnp.clip(x, -127, 127).astype(jnp.int8)


def matmul_i32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` with int32 accumulation. ``x: int8[..., m]``, ``w: int8[m, n]`` -> ``int32[..., n]``."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntLowRank:
    """An int8 matrix perturbed by ``s · A Bᵀ / 2^(4 + σ̂)`` (fixed point).

    Attributes:
      base: ``int8[*stack, m, n]``.
      a: ``int8[*stack, m, r]``.
      b: ``int8[*stack, n, r]``.
      sign: ``int32[*stack]`` the antithetic sign ``±1``.
      shift: ``int32[*stack]`` σ̂.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    sign: jax.Array
    shift: jax.Array

    @property
    def shape(self):
        """The shape of ``base`` (what model code sees)."""
        return self.base.shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntFull:
    """An int8 leaf perturbed by ``s · rshift(ε, σ̂)``.

    Attributes:
      base: ``int8[*shape]``.
      eps: ``int8[*shape]``.
      sign: ``int32[*shape[:-1]]`` (``int32[]`` for vectors) the antithetic sign.
      shift: ``int32[*shape[:-1]]`` σ̂.
    """

    base: jax.Array
    eps: jax.Array
    sign: jax.Array
    shift: jax.Array

    @property
    def shape(self):
        """The shape of ``base`` (what model code sees)."""
        return self.base.shape


def int_dense(x: jax.Array, w) -> jax.Array:
    """The int32 accumulator of ``x @ W`` (scale 16 · 16 per unit), member perturbation included.

    Args:
      x: ``int8[..., m]``.
      w: ``int8[m, n]`` (layout in × out) or an :class:`IntLowRank` / :class:`IntFull` leaf of that shape.

    Returns:
      ``int32[..., n]``: ``x W + s · rshift(rshift(x A, 4) Bᵀ, σ̂)`` for a low-rank leaf (the fixed-point product
      with ``W + s A Bᵀ / 2^(4+σ̂)``, without forming it).
    """
    if isinstance(w, IntLowRank):
        if w.base.ndim != 2:
            raise ValueError(f"int_dense: expected a 2-D weight, got {w.base.shape}; slice stacked layers first")
        xa = rshift(matmul_i32(x, w.a), FRAC_BITS)                       # int32[..., r]
        corr = lax.dot_general(xa, w.b.astype(jnp.int32), (((xa.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)          # int32[..., n]
        return matmul_i32(x, w.base) + w.sign * rshift(corr, w.shift)
    return matmul_i32(x, int_value(w))


def int_embed(ids: jax.Array, table) -> jax.Array:
    """Row lookup ``int8[..., n]`` of ``table: int8[vocab, n]`` at ``ids: int[...]``.

    For an :class:`IntLowRank` table the perturbed rows are ``sat(W[t] + s · rshift(A[t] Bᵀ, 4 + σ̂))``.
    """
    if isinstance(table, IntLowRank):
        a = table.a[ids].astype(jnp.int32)                                # int32[..., r]
        corr = lax.dot_general(a, table.b.astype(jnp.int32), (((a.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
        return saturate(table.base[ids].astype(jnp.int32)
                        + table.sign * rshift(corr, table.shift + FRAC_BITS))
    return int_value(table)[ids]


def int_value(v) -> jax.Array:
    """The member's ``int8`` value of a leaf: ``sat(W + s · rshift(ε, σ̂))`` for :class:`IntFull`, ``W`` for arrays.

    On an :class:`IntLowRank` leaf it materialises ``sat(W + s · rshift(A Bᵀ, 4 + σ̂))`` (an ``m×n`` matrix).
    Returns ``int8[*shape]`` (the leaf's shape).
    """
    if isinstance(v, IntFull):
        sign = jnp.expand_dims(v.sign, -1) if v.base.ndim else v.sign
        shift = jnp.expand_dims(v.shift, -1) if v.base.ndim else v.shift
        return saturate(v.base.astype(jnp.int32) + sign * rshift(v.eps.astype(jnp.int32), shift))
    if isinstance(v, IntLowRank):
        ab = jnp.einsum("...mr,...nr->...mn", v.a.astype(jnp.int32), v.b.astype(jnp.int32))
        return saturate(v.base.astype(jnp.int32)
                        + v.sign[..., None, None] * rshift(ab, v.shift[..., None, None] + FRAC_BITS))
    return v
