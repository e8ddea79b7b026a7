"""Fitness shaping. Fitness is **higher is better** everywhere in esx.

A shaping function maps raw fitness ``float[N]`` (members in order, antithetic partners at ``2k, 2k+1``) to the
weights ``float[N]`` that multiply each member's noise in the update. All of them follow one policy for
**non-finite fitness** (NaN, +inf, -inf): such a member counts as a failed evaluation and is given the worst
finite fitness of the population before shaping (so it ranks last, ties with the worst, and can never push
parameters to NaN). If no member is finite the generation is skipped: ``tell`` leaves parameters and optimizer
state untouched (only the generation counter advances) and reports ``metrics.skipped``. The number of
non-finite members is reported by ``tell`` as ``metrics.num_nonfinite``. ``tell`` also skips (and reports) any
update that would make a parameter or optimizer-state entry non-finite.

==================  =============================================================================
``centered_rank``   ``rank / (N - 1) - 0.5`` in ``[-0.5, 0.5]`` (ties share their mean rank)
``z_score``         ``(f - mean) / sqrt(var + 1e-5)``
``group_z_score``   subtract each group's mean (``group_size`` consecutive members), divide by global std
``pair_sign``       ``+sign(f⁺ - f⁻)`` for the ``+`` member of each antithetic pair, ``0`` for its partner
``identity``        ``f`` unchanged
==================  =============================================================================

**Bit-reproducible.** The weights depend only on the values of the fitness vector, never on how XLA compiles the
program around the shaping, so ``esx.step`` and a sharded generation (:mod:`esx.distributed`), which compile the
same shaping into different programs, get the same bits from the same fitness. Two things make that hold:

* the fitness enters and the weights leave through ``jax.lax.optimization_barrier``: XLA can neither recompute the
  fitness function's last operations inside the shaping's kernels (where LLVM may contract ``a * b + c`` into an
  FMA and round differently from the materialised fitness vector) nor fuse the shaping into its consumers;
* means and variances use :func:`reproducible_sum`, an integer (hence associative) accumulation whose result does
  not depend on the order in which XLA reduces.

A custom shaping callable is used as given; it is bit-reproducible if it follows the same two rules.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Shaping = Callable[[jax.Array], jax.Array]

#: bits of each summand kept below the largest magnitude by :func:`reproducible_sum` (at least)
SUM_BITS = 48
_BLOCK_LOG2 = 16  # reproducible_sum: summands per int32 accumulation on long axes (2^16 blocks of 2^16 at most)


def _pow2(k: jax.Array) -> jax.Array:
    """``float32 2^k`` for ``int32 k`` in ``[-126, 127]``, built from its bits (exact)."""
    return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _scale(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x · 2^k`` (``k: int32`` in ``[-252, 254]``) as two exact power-of-two products that stay normal."""
    half = k // 2
    return x * _pow2(half) * _pow2(k - half)


def _limb_sums(y: jax.Array, bits: int) -> list:
    """``|y| < 1`` written exactly as ``Σ_k q_k 2^(-(k+1)·bits)`` (plus what lies below ``SUM_BITS`` bits, dropped),
    with integer ``|q_k| < 2^bits``; returns ``Σ q_k`` over the last axis, as ``int32``, for each ``k``."""
    sums = []
    for _ in range(math.ceil(SUM_BITS / bits)):
        t = y * float(1 << bits)  # exact
        q = jnp.trunc(t)
        y = t - q                 # exact: the fraction of t
        sums.append(jnp.sum(q.astype(jnp.int32), axis=-1))  # integers: the same in any summation order
    return sums


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def reproducible_sum(x: jax.Array, axis: int = -1) -> jax.Array:
    """The sum of ``x`` along ``axis``, bit for bit the same whatever order XLA (or the caller) sums in.

    Every summand is written exactly as integer limbs relative to the largest magnitude ``2^e`` on the axis
    (``SUM_BITS`` or more bits below it; lower bits are dropped, summand by summand), the limbs are summed as
    ``int32`` -- integer addition is associative, so the sums do not depend on the order, the blocking or the
    device -- and the integer sums are rounded to ``float32`` in a fixed order. The result is therefore a function
    of the multiset of summands (permuting ``x`` gives the same bits); its error is a few ulps of the sum plus at
    most ``n · 2^(e - SUM_BITS)``, no worse than a ``float32`` ``jnp.sum``. Up to ``2^30`` summands; a non-finite
    entry makes the result the plain ``jnp.sum`` (non-finite as well).

    Args:
      x: a ``float32`` array (other float dtypes are converted).
      axis: the axis to sum over.

    Returns:
      ``float32``, ``x``'s shape without ``axis``.
    """
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    n = x.shape[-1]
    if n == 0:
        return jnp.zeros(x.shape[:-1], jnp.float32)
    if n > 1 << 30:
        raise ValueError(f"reproducible_sum: {n} summands; at most 2^30")
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    clean = jnp.where(finite[..., None], x, 0.0)
    amax = jnp.max(jnp.abs(clean), axis=-1, keepdims=True)
    biased = (jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF
    e = jnp.maximum(biased, 1) - 126  # amax < 2^e (subnormals: 2^-126 bounds them)
    y = _scale(clean, -e)             # |y| < 1, exact
    if n <= 1 << _BLOCK_LOG2:
        bits = 30 - max(n - 1, 1).bit_length()  # n limbs of |q| < 2^bits: |Σ| < 2^30, no int32 overflow
        digits, top = _limb_sums(y, bits), 1      # digit j weighs 2^(-(j + top)·bits)
    else:  # blocks of 2^16 summands, then the blocks' integer sums split at `bits` so that they add up exactly
        bits = 30 - _BLOCK_LOG2
        blocks = -(-n // (1 << _BLOCK_LOG2))
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, blocks * (1 << _BLOCK_LOG2) - n)])
        sums = _limb_sums(y.reshape(*y.shape[:-1], blocks, 1 << _BLOCK_LOG2), bits)  # |s| < 2^30 per block
        high = [jnp.sum(s >> bits, axis=-1) for s in sums]                           # |Σ| < 2^14 · 2^16
        low = [jnp.sum(s - ((s >> bits) << bits), axis=-1) for s in sums]            # [0, 2^14 · 2^14)
        digits = [high[0]] + [lo + hi for lo, hi in zip(low, high[1:] + [jnp.zeros_like(high[0])])]
        top = 0
    for j in range(len(digits) - 1, 0, -1):  # carries up: every digit but the first in [0, 2^bits)
        carry = digits[j] >> bits
        digits[j] = digits[j] - (carry << bits)
        digits[j - 1] = digits[j - 1] + carry
    total = digits[-1].astype(jnp.float32)
    for d in digits[-2::-1]:  # Horner from the smallest digit; the products are exact
        total = total * (1.0 / (1 << bits)) + d.astype(jnp.float32)
    total = _scale(total, e[..., 0] - top * bits)
    return jnp.where(finite, total, jnp.sum(x, axis=-1))


@reproducible_sum.defjvp
def _reproducible_sum_jvp(axis, primals, tangents):  # the derivative of a sum (trunc's zero derivative is not it)
    (x,), (t,) = primals, tangents
    return reproducible_sum(x, axis), jnp.sum(jnp.asarray(t, jnp.float32), axis=axis)


def _mean(x: jax.Array, axis: int = -1) -> jax.Array:
    """``reproducible_sum / n`` along ``axis``, kept with size 1 (as ``keepdims=True``), materialised."""
    return jax.lax.optimization_barrier(jnp.expand_dims(reproducible_sum(x, axis) / x.shape[axis], axis))


def _var(x: jax.Array) -> jax.Array:
    """The population variance of ``x: float[N]`` (as ``jnp.var``), with :func:`reproducible_sum`."""
    d = x - _mean(x)
    return _mean(d * d)[0]


def sanitize(fitness: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces non-finite entries by the worst finite fitness.

    Args:
      fitness: ``float[N]``.

    Returns:
      ``(clean float[N], finite bool[N])``. If nothing is finite, ``clean`` is all zeros.
    """
    # materialised: XLA must not recompute the fitness function's last operations inside the shaping's kernels
    fitness = jax.lax.optimization_barrier(jnp.asarray(fitness, jnp.float32))
    finite = jnp.isfinite(fitness)
    worst = jnp.min(jnp.where(finite, fitness, jnp.inf))
    worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
    return jnp.where(finite, fitness, worst), finite


def _out(weights: jax.Array) -> jax.Array:
    """The weights, materialised: XLA must not fuse the shaping's last operations into the update's kernels."""
    return jax.lax.optimization_barrier(weights)


def identity(fitness: jax.Array) -> jax.Array:
    """Raw fitness (non-finite replaced by the worst finite value). ``float[N] -> float[N]``."""
    return _out(sanitize(fitness)[0])


def centered_rank(fitness: jax.Array) -> jax.Array:
    """``rank / (N - 1) - 0.5``; tied values get the mean of their ranks. ``float[N] -> float[N]``."""
    f, _ = sanitize(fitness)
    n = f.shape[0]
    # Average rank of ties: (#less + (#less_or_equal - 1)) / 2, computed from a sort (O(N log N)).
    s = jnp.sort(f)
    less = jnp.searchsorted(s, f, side="left").astype(jnp.float32)
    less_eq = jnp.searchsorted(s, f, side="right").astype(jnp.float32)
    rank = (less + less_eq - 1.0) / 2.0
    return _out(rank / max(n - 1, 1) - 0.5)


def z_score(fitness: jax.Array) -> jax.Array:
    """``(f - mean) / sqrt(var + 1e-5)`` over the population. ``float[N] -> float[N]``."""
    f, _ = sanitize(fitness)
    return _out((f - _mean(f)) / jnp.sqrt(_var(f) + 1e-5))


def group_z_score(group_size: int) -> Shaping:
    """Per-group baseline, global scale (as in GRPO): ``(f - mean_group) / sqrt(var_global + 1e-5)``.

    Args:
      group_size: number of consecutive members that share data (a prompt, a sequence, an env seed).
        The population size must be a multiple of it.

    Returns:
      the shaping ``float[N] -> float[N]``.
    """
    if group_size < 1:
        raise ValueError(f"group_z_score: group_size={group_size}; must be >= 1")

    def shape(fitness: jax.Array) -> jax.Array:
        f, _ = sanitize(fitness)
        n = f.shape[0]
        if n % group_size:
            raise ValueError(
                f"group_z_score: population_size={n} is not a multiple of group_size={group_size}"
            )
        g = f.reshape(n // group_size, group_size)
        centered = (g - _mean(g, axis=1)).reshape(n)
        return _out(centered / jnp.sqrt(_var(f) + 1e-5))

    shape.group_size = group_size  # type: ignore[attr-defined]
    return shape


def pair_sign(fitness: jax.Array) -> jax.Array:
    """``sign(f[2k] - f[2k+1])`` on the ``+`` member of each antithetic pair and ``0`` on its partner.

    With antithetic noise the update weight of a pair is ``w[2k] - w[2k+1]``, so this gives each pair
    a weight in ``{-1, 0, +1}``. ``float[N] -> float[N]`` (``N`` even).
    """
    f, _ = sanitize(fitness)
    n = f.shape[0]
    if n % 2:
        raise ValueError(f"pair_sign: population_size={n} must be even (antithetic pairs)")
    d = jnp.sign(f[0::2] - f[1::2])
    return _out(jnp.stack([d, jnp.zeros_like(d)], axis=1).reshape(n))


SHAPINGS: dict[str, Shaping] = {
    "centered_rank": centered_rank,
    "z_score": z_score,
    "pair_sign": pair_sign,
    "identity": identity,
}


def get(name_or_fn: str | Shaping, group_size: int = 1) -> Shaping:
    """Resolves a shaping name (``"centered_rank"``, ``"z_score"``, ``"group_z_score"``, ``"pair_sign"``,
    ``"identity"``) or returns a callable unchanged: a shaping ``float[N] -> float[N]``."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn == "group_z_score":
        return group_z_score(group_size)
    if name_or_fn not in SHAPINGS:
        raise ValueError(
            f"shaping={name_or_fn!r}; valid names are {sorted([*SHAPINGS, 'group_z_score'])} or a callable"
        )
    return SHAPINGS[name_or_fn]
