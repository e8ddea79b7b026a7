"""Counter-based perturbation noise: a pure function of (base key, leaf, generation, member).

Nothing here is ever stored between calls. The noise of member ``i`` in generation ``t`` for the leaf at
path ``p`` is drawn from the key::

    k = fold_in(fold_in(fold_in(base_key, leaf_id(p)), t // noise_reuse), pair)

where ``pair = i // 2`` with antithetic sampling (members ``2k`` and ``2k+1`` share the draw and carry the signs
``+1`` and ``-1``) and ``pair = i`` without it. ``noise_reuse = k > 0`` keeps a member's perturbation for ``k``
consecutive generations; ``noise_reuse = 0`` means *the same noise every generation* (the index is always 0).
``leaf_id`` is a 31-bit CRC of the leaf's path string, so adding, removing or reordering other leaves never
changes a leaf's noise. Stacked leaves (a ``"lowrank"`` leaf with more than two dimensions) fold in the flat
index of each slice, so each slice of a layer stack has its own independent draw.

Noise sources (all zero-mean, unit-variance, i.i.d. entries; each is deterministic in the key):

* ``"normal"`` -- exact standard normals from ``jax.random.normal`` (the textbook choice, the default).
* ``"rademacher"`` -- ±1 entries, 32 of them from each 32-bit random word: by far the fewest random bits per
  entry. For low-rank noise the entries of ``E = A Bᵀ/√r`` are still zero-mean, unit-variance and approach
  a normal as ``r`` grows.
* ``"table"`` -- a contiguous slice of a shared table of standard normals (as in the 2017 OpenAI ES work); the
  slice offset is drawn from the key. The table lives in the strategy state (``table_size`` float32 entries).
"""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from jax import lax

NOISE_SOURCES = ("normal", "rademacher", "table")
TABLE_SEED = 0x5EED


def leaf_id(path: str) -> int:
    """Stable 31-bit identity of a leaf, derived from its path string (never from its position)."""
    return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


def noise_index(generation: jax.Array, noise_reuse: int) -> jax.Array:
    """``generation // noise_reuse``, or ``0`` for ``noise_reuse == 0`` (same noise every generation)."""
    if noise_reuse == 0:
        return jnp.zeros((), jnp.uint32)
    return (generation // noise_reuse).astype(jnp.uint32)


def member_key(base_key: jax.Array, path: str, generation: jax.Array, pair: jax.Array,
               noise_reuse: int) -> jax.Array:
    """The key of one leaf's noise for one antithetic pair (or member) in one generation."""
    k = jax.random.fold_in(base_key, leaf_id(path))
    k = jax.random.fold_in(k, noise_index(generation, noise_reuse))
    return jax.random.fold_in(k, jnp.asarray(pair).astype(jnp.uint32))


def make_table(size: int) -> jax.Array:
    """The shared noise table: ``float32[size]`` standard normals from a fixed seed."""
    return jax.random.normal(jax.random.key(TABLE_SEED), (size,), jnp.float32)


def sample(key: jax.Array, shape: tuple[int, ...], dtype, source: str,
           table: jax.Array | None = None) -> jax.Array:
    """I.i.d. zero-mean, unit-variance entries of ``shape`` from one key, with the given source.

    Args:
      key: a typed PRNG key.
      shape: output shape.
      dtype: a floating dtype.
      source: one of :data:`NOISE_SOURCES`.
      table: ``float32[T]``, required for ``source == "table"`` with ``T >= prod(shape)``.

    Returns:
      ``dtype[shape]``.
    """
    size = math.prod(shape)
    if source == "normal":
        return jax.random.normal(key, shape, dtype)
    if source == "rademacher":
        words = -(-size // 32)
        bits = jax.random.bits(key, (words,), jnp.uint32)
        shifts = jnp.arange(32, dtype=jnp.uint32)
        signs = ((bits[:, None] >> shifts[None, :]) & jnp.uint32(1)).reshape(-1)[:size]
        return (signs.astype(dtype) * 2 - 1).reshape(shape)
    if source == "table":
        if table is None:
            raise ValueError("noise_source='table' needs the noise table")
        t = table.shape[0]
        if size > t:
            raise ValueError(f"table_size={t} is smaller than one draw of {size} entries; raise table_size")
        offset = jax.random.randint(key, (), 0, t - size + 1)
        return lax.dynamic_slice(table, (offset,), (size,)).astype(dtype).reshape(shape)
    raise ValueError(f"noise_source={source!r}; valid sources are {NOISE_SOURCES}")


def lowrank_factors(key: jax.Array, shape: tuple[int, ...], rank: int, dtype, source: str,
                    table: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Low-rank factors for a (stack of) ``m×n`` matrices.

    Args:
      key: the member key of this leaf (see :func:`member_key`).
      shape: the leaf shape ``(*stack, m, n)``.
      rank: ``r >= 1``.

    Returns:
      ``A: dtype[*stack, m, r]`` and ``B: dtype[*stack, n, r]``; the perturbation direction of each slice is
      ``E = A Bᵀ / √r``.
    """
    *stack, m, n = shape
    if not stack:
        ab = sample(key, (m + n, rank), dtype, source, table)
        return ab[:m], ab[m:]
    count = math.prod(stack)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count, dtype=jnp.uint32))
    ab = jax.vmap(lambda k: sample(k, (m + n, rank), dtype, source, table))(keys)
    ab = ab.reshape(*stack, m + n, rank)
    return ab[..., :m, :], ab[..., m:, :]


def full_noise(key: jax.Array, shape: tuple[int, ...], dtype, source: str,
               table: jax.Array | None = None) -> jax.Array:
    """Full-rank noise ``ε: dtype[shape]`` for one leaf and one member."""
    return sample(key, tuple(shape), dtype, source, table)
