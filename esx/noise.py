"""Counter-based perturbation noise: a pure function of (base key, leaf, generation, member).

Every key derivation of the engine lives here: the named run-key schedule (:func:`stream_key`), the member keys
(:func:`member_key`, batched as :func:`member_keys`), and every draw (:func:`sample`, :func:`lowrank_factors`,
:func:`full_noise`, a pair's draws for all leaves at once in :func:`leaf_noise`, and the counter hash
:func:`hash_bits` that the integer strategy's noise also uses).

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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from esx import labels as labels_lib

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
    """Stable 31-bit identity (a Python ``int``) of a leaf, derived from its path string (never from its position)."""
    return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


def noise_index(generation: jax.Array, noise_reuse: int) -> jax.Array:
    """``int32[] -> uint32[]``: ``generation // noise_reuse``, or ``0`` for ``noise_reuse == 0`` (same noise every
    generation)."""
    if noise_reuse == 0:
        return jnp.zeros((), jnp.uint32)
    return (generation // noise_reuse).astype(jnp.uint32)


def member_key(base_key: jax.Array, path: str, generation: jax.Array, pair: jax.Array,
               noise_reuse: int) -> jax.Array:
    """The key of one leaf's noise for one antithetic pair (or member) in one generation.

    ``base_key``: a PRNG key; ``generation``, ``pair``: ``int32[]``; returns a PRNG key (scalar).
    """
    k = jax.random.fold_in(base_key, leaf_id(path))
    k = jax.random.fold_in(k, noise_index(generation, noise_reuse))
    return jax.random.fold_in(k, jnp.asarray(pair).astype(jnp.uint32))


def member_keys(base_key: jax.Array, paths: Sequence[str], generation: jax.Array, pair: jax.Array,
                noise_reuse: int) -> jax.Array:
    """``key[L]``: :func:`member_key` of each of the ``L`` leaf ``paths`` (the same keys), in one batched pass.

    One vmapped ``fold_in`` chain instead of three threefry calls per leaf: compile time stays flat in the leaf
    count. ``generation``, ``pair``: ``int32[]``.
    """
    ids = jnp.asarray([leaf_id(p) for p in paths], jnp.uint32)
    idx = noise_index(generation, noise_reuse)
    pair_u = jnp.asarray(pair).astype(jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(base_key, i), idx), pair_u))(ids)


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


def leaf_noise(keys: jax.Array, leaves: Sequence[jax.Array], labels: Sequence[str], rank: int, source: str,
               table: jax.Array | None = None) -> list:
    """The noise of one pair (or member) for every leaf, drawn from ``keys`` (:func:`member_keys`).

    Args:
      keys: ``key[L]``, one per leaf.
      leaves: the ``L`` parameter leaves (only their shapes and dtypes are used).
      labels: the ``L`` labels (``"lowrank"`` / ``"full"`` / ``"frozen"``, see :mod:`esx.labels`).
      rank: ``r`` of the low-rank factors.
      source: one of :data:`NOISE_SOURCES`.
      table: the shared table for ``source == "table"``.

    Returns:
      a list of ``L`` entries: ``(A: dtype[*stack, m, r], B: dtype[*stack, n, r])`` for low-rank leaves (as
      :func:`lowrank_factors`), ``ε: dtype[shape]`` for full ones (as :func:`full_noise`), ``None`` for frozen ones.

    The values are those of :func:`lowrank_factors` / :func:`full_noise` on ``keys[i]``. With ``"normal"``, the
    Gaussian draws of leaves of similar size share one vmapped call (padded to the next power of two, then
    sliced): each ``jax.random`` call is a loop of its own that XLA compiles separately (on CPU ~0.3 s each), so
    this cuts compile time by the leaf count. Same values: with threefry's partitionable counters a draw of shape
    ``(k,)`` is the prefix of a longer draw from the same key (tests/test_core.py checks it).
    """
    out: list = [None] * len(leaves)
    classes: dict = {}
    for i, (leaf, lab) in enumerate(zip(leaves, labels)):
        if lab == labels_lib.FROZEN:
            continue
        k = keys[i]
        if source == "normal" and (lab != labels_lib.LOWRANK or leaf.ndim == 2):
            shape = (leaf.shape[0] + leaf.shape[1], rank) if lab == labels_lib.LOWRANK else leaf.shape
            size = math.prod(shape)
            padded = 1 << max(size - 1, 0).bit_length()
            classes.setdefault((padded, jnp.dtype(leaf.dtype)), []).append((i, shape))
        elif lab == labels_lib.LOWRANK:
            out[i] = lowrank_factors(k, leaf.shape, rank, leaf.dtype, source, table)
        else:
            out[i] = full_noise(k, leaf.shape, leaf.dtype, source, table)
    for (padded, dtype), items in _merge_small_classes(classes).items():
        sel = jnp.asarray([i for i, _ in items], jnp.int32)
        draws = jax.vmap(lambda k, p=padded, d=dtype: jax.random.normal(k, (p,), d))(keys[sel])
        for row, (i, shape) in enumerate(items):
            x = draws[row, :math.prod(shape)].reshape(shape)
            if labels[i] == labels_lib.LOWRANK:
                m = leaves[i].shape[0]
                out[i] = (x[:m], x[m:])
            else:
                out[i] = x
    return out


def _merge_small_classes(classes: dict) -> dict:
    """Merges the size classes ``{(padded, dtype): [(leaf index, shape), ...]}`` of one dtype into the largest one
    when everything padded to the largest draw costs <= 64K numbers per pair, or <= 4x the real draw (small
    models: one call per dtype). Updates ``classes`` in place and returns it."""
    merged: dict = {}
    for (padded, dtype), items in classes.items():
        merged.setdefault(dtype, []).append((padded, items))
    for dtype, groups in merged.items():
        n_items = sum(len(items) for _, items in groups)
        top = max(p for p, _ in groups)
        total = sum(math.prod(shape) for _, items in groups for _, shape in items)
        if len(groups) > 1 and n_items * top <= max(4 * total, 65536):
            for p, _ in groups:
                del classes[(p, dtype)]
            classes[(top, dtype)] = [it for _, items in groups for it in items]
    return classes
