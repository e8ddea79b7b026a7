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
* ``"hash"`` -- ±1 entries from a counter-based integer hash: entry ``j`` (row-major flat index of the draw) is
  ``1 - 2 · (h(k, j) >> 31)`` with ``h`` from :func:`hash_bits`. Each entry is a pure elementwise function of its
  index, so XLA fuses the generation into the op that consumes the noise (no noise array is ever written to
  memory) and it vectorises. Same distribution as ``"rademacher"``; a different, cheaper generator.
* ``"binomial"`` -- ``(popcount(h(k, j)) - 16) / √8``: a centred, scaled Binomial(32, ½) -- exactly zero-mean and
  unit-variance, 33 levels, excess kurtosis ``-1/16``, so already close to a normal for ``r = 1``. Same
  elementwise, fusable generator as ``"hash"``.

The counter hash ``h`` (used by ``"hash"`` and ``"binomial"``) takes the first two 32-bit words ``(k0, k1)`` of
``jax.random.key_data(key)`` (the 64 bits of a threefry key, already mixed by :func:`member_key`'s ``fold_in``;
no further threefry call, which keeps compile time flat) and for each index ``j``::

    h(k, j) = fmix32(fmix32(j · 0x9E3779B9 + k0) ^ k1)

where ``fmix32`` is the MurmurHash3 32-bit finaliser (``x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13;
x *= 0xC2B2AE35; x ^= x >> 16``), a bijection of ``uint32`` with full avalanche. Draws of more than ``2**32``
entries are not supported (the index wraps).
"""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from jax import lax

NOISE_SOURCES = ("normal", "rademacher", "table", "hash", "binomial")
TABLE_SEED = 0x5EED

#: The named streams of a run key (see :func:`stream_key`). The numbers are the ``fold_in`` data of each stream;
#: they are fixed forever (changing one changes every run's numbers). ``data`` feeds the fitness of generation
#: ``g`` (environment seeds, sampling, problem draws), ``noise`` is the strategy's base key (``strategy.init``),
#: ``eval`` the evaluations of the unperturbed parameters, ``params`` the initial parameters.
STREAMS = {"data": 0, "noise": 1, "eval": 2, "params": 3}


def stream_key(run_key: jax.Array, name: str, generation: jax.Array | int | None = None) -> jax.Array:
    """The key of stream ``name`` of a run: ``fold_in(run_key, STREAMS[name])``, then ``fold_in(·, generation)``
    when a generation is given (``data`` and ``eval`` are per generation; ``noise`` and ``params`` are not).

    Every random draw of a run derives from one run key through this function, so the streams are disjoint by
    construction: the noise of a member is drawn from ``fold_in`` chains below ``stream_key(run_key, "noise")``
    (:func:`member_key`), which never meet the chains below ``"data"`` or ``"eval"``.

    Args:
      run_key: the run's key, ``jax.random.key(seed)``.
      name: one of :data:`STREAMS`.
      generation: ``int32[]`` (or a Python int) for the per-generation streams.

    Returns:
      a PRNG key.

    Raises:
      ValueError: an unknown stream name.
    """
    if name not in STREAMS:
        raise ValueError(f"stream {name!r}; valid streams are {sorted(STREAMS)}")
    key = jax.random.fold_in(run_key, STREAMS[name])
    if generation is not None:
        key = jax.random.fold_in(key, jnp.asarray(generation).astype(jnp.uint32))
    return key


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


def fmix32(x: jax.Array) -> jax.Array:
    """The MurmurHash3 32-bit finaliser: a bijection ``uint32[...] -> uint32[...]`` with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Counter-based hash words ``uint32[shape]``: entry ``j`` (row-major) is ``fmix32(fmix32(j·φ + k0) ^ k1)``.

    ``(k0, k1)`` are the first two words of ``jax.random.key_data(key)`` and ``φ = 0x9E3779B9``. Elementwise
    in ``j``, so XLA fuses it into whatever consumes the result.
    """
    k = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    j = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) if shape else jnp.zeros((), jnp.uint32)
    return fmix32(fmix32(j * jnp.uint32(0x9E3779B9) + k[0]) ^ k[1])


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
    if source == "hash":
        return (1 - 2 * (hash_bits(key, tuple(shape)) >> 31).astype(jnp.int32)).astype(dtype)
    if source == "binomial":
        count = lax.population_count(hash_bits(key, tuple(shape))).astype(jnp.float32)
        return ((count - 16.0) * (1.0 / math.sqrt(8.0))).astype(dtype)
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
