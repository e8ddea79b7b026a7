"""Integer EGGROLL: the int8 evolution strategy of the EGG model (PAPER.md §6).

Every parameter is ``int8`` in ``[-127, 127]`` and holds a fixed-point number with 4 fractional bits (16 = 1.0).
A generation has ``N`` members in antithetic pairs ``(2k, 2k+1)`` with signs ``+1 / -1``.

**Noise.** Entries are ``int8`` values distributed as ``round(16 · N(0, 1))`` (clipped to ±127): entry ``j`` of a
draw is ``NORMAL_TABLE[h(k, j) >> 16]`` where ``h`` is a counter hash of the member key ``k`` (see
:func:`noise_bits`) and ``NORMAL_TABLE`` (:func:`normal_table`, 64 KiB) holds the 65536 quantiles
``round(16 · Φ⁻¹((u + ½) / 65536))``. ``k = member_key(base_key, leaf path, generation // noise_reuse, pair)``
(:func:`esx.noise.member_key`), so the noise is a pure function of (key, leaf, generation, pair) and is never stored.

* ``"lowrank"`` leaves ``W: int8[*stack, m, n]`` get ``A: int8[*stack, m, r]``, ``B: int8[*stack, n, r]``; the member's
  weight is, in fixed point, ``W + s · (A Bᵀ) / 2^(4 + σ̂)`` (``A Bᵀ`` has scale 16·16, so with σ̂ = 4 one
  perturbation has a standard deviation of one int8 step). It is never formed: :func:`int_dense` computes
  ``x W + s · rshift(rshift(x A, 4) Bᵀ, σ̂)`` with int32 accumulation.
* ``"full"`` leaves (biases, norm gains) get ``ε: int8[shape]`` and the member value ``W + s · rshift(ε, σ̂)``.
* ``rshift(x, k)`` rounds ``|x| / 2^k`` half up and keeps the sign, so antithetic partners are exact opposites.
* σ = 2^-σ̂ with σ̂ = ``sigma_shift`` (an ``int32`` leaf of the state, ``State.sigma``).

**Fitness** is any integer (or float) score, higher is better; only the sign of the antithetic difference is used:
``F_k = sign(f[2k] - f[2k+1]) ∈ {-1, 0, +1}`` (pair sign).

**Update** (no optimizer, no momentum). Per leaf the int32 tally ``E = Σ_k F_k A_k B_kᵀ`` (``Σ_k F_k ε_k`` for full
leaves) is compared with a two-sided z-test threshold: under the null (fitness independent of the noise) each term
has standard deviation ``v`` (``v = Var(table) ≈ 256`` for low-rank, ``√v ≈ 16`` for full leaves), so
``|E| > z_{α_t/2} · v · √P`` (``P`` = number of pairs with ``F ≠ 0``) happens for a fraction ``α_t`` of the entries.
Those weights move by ``sign(E)`` (±1, saturating at ±127); all others stay. ``α_t = α / (decay · t + 1)``
(``decay = 0.015`` by default). The threshold is integer arithmetic: ``z`` comes from an ``int32`` table of
``round(256 · z_{α_t/2})`` for ``t < 65536`` (clamped after) and ``√P`` from an ``int32`` table of ``round(256 √P)``.

**Strategy interface.** :func:`int_eggroll` returns an :class:`esx.Strategy` (``init / ask / view / evaluate / tell /
gradient / apply``) on the same :class:`esx.State` pytree (``opt_state`` is ``()``, ``sigma`` is the ``int32`` shift
σ̂, ``table`` the ``int8`` normal table); ``gradient`` returns the ``int32`` tallies and ``apply`` thresholds them,
so a sharded update can sum tallies over devices. ``evaluate`` also accepts ``data_per_member=True`` (every data
leaf has a leading axis ``N``): this is how truncated ES carries each member's hidden state across generations.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from esx import labels as labels_lib
from esx import noise as noise_lib
from esx.strategy import Metrics, State, Strategy, _resolve_labels, fitness_stats

NOISE_SCALE = 16          # noise entries are round(NOISE_SCALE · N(0, 1))
FRAC_BITS = 4             # fixed point: 16 = 1.0
TABLE_BITS = 16           # the normal table has 2^16 entries
Z_TABLE_SIZE = 1 << 16    # generations covered by the z-threshold table (clamped after)

# ----------------------------------------------------------------------------------------------------------------
# tables (host-side numpy, built once)


@functools.lru_cache(maxsize=1)
def normal_table() -> np.ndarray:
    """``int8[65536]``: ``round(16 · Φ⁻¹((u + ½) / 65536))`` clipped to ±127, sorted ascending (symmetric)."""
    nd = statistics.NormalDist()
    n = 1 << TABLE_BITS
    half = np.array([nd.inv_cdf((u + 0.5) / n) for u in range(n // 2)], np.float64)
    q = np.clip(np.rint(NOISE_SCALE * half), -127, 127)
    return np.concatenate([q, -q[::-1]]).astype(np.int8)


@functools.lru_cache(maxsize=1)
def table_variance() -> float:
    """Variance of one noise entry (``≈ 256``)."""
    return float(np.mean(normal_table().astype(np.float64) ** 2))


@functools.lru_cache(maxsize=8)
def z_table(alpha: float, decay: float) -> np.ndarray:
    """``int32[65536]``: ``round(256 · z_{α_t / 2})`` with ``α_t = α / (decay · t + 1)``."""
    nd = statistics.NormalDist()
    t = np.arange(Z_TABLE_SIZE, dtype=np.float64)
    alphas = alpha / (decay * t + 1.0)
    # The quantile is monotone in α; evaluate on unique values only (many for large decay).
    return np.array([round(256.0 * nd.inv_cdf(1.0 - a / 2.0)) for a in alphas], np.int32)


def sqrt_table(num_pairs: int) -> np.ndarray:
    """``int32[num_pairs + 1]``: ``round(256 · √P)``."""
    return np.rint(256.0 * np.sqrt(np.arange(num_pairs + 1, dtype=np.float64))).astype(np.int32)


def alpha_at(alpha: float, decay: float, generation) -> float:
    """The nominal fraction of weights updated at ``generation``: ``α / (decay · t + 1)``."""
    return alpha / (decay * generation + 1.0)


# ----------------------------------------------------------------------------------------------------------------
# integer helpers


def rshift(x: jax.Array, k: jax.Array | int) -> jax.Array:
    """Sign-symmetric rounding right shift: ``sign(x) · floor((|x| + 2^(k-1)) / 2^k)`` (``k >= 0``).

    ``x: int32[...]``, ``k``: ``int32`` broadcastable to ``x``; returns ``int32[...]``. ``rshift(-x, k) == -rshift(x, k)``.
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


def noise_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Counter-based ``uint32[shape]`` bits: ``fmix32(fmix32(j · 0x9E3779B9 + k0) ^ k1)`` for flat index ``j``."""
    k = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    j = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return noise_lib.fmix32(noise_lib.fmix32(j * jnp.uint32(0x9E3779B9) + k[0]) ^ k[1])


def int_noise(key: jax.Array, shape: tuple[int, ...], table: jax.Array) -> jax.Array:
    """``int8[shape]`` entries ``table[bits >> 16]`` (≈ ``round(16 · N(0, 1))``), a pure function of ``key``."""
    idx = jnp.right_shift(noise_bits(key, tuple(shape)), jnp.uint32(32 - TABLE_BITS)).astype(jnp.int32)
    return table[idx]


# ----------------------------------------------------------------------------------------------------------------
# perturbed leaves and the model-side ops


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
        return self.base.shape


def int_dense(x: jax.Array, w) -> jax.Array:
    """The int32 accumulator of ``x @ W`` (scale 16 · 16 per unit), member perturbation included.

    Args:
      x: ``int8[..., m]``.
      w: ``int8[m, n]`` (layout in × out) or an :class:`IntLowRank` / :class:`IntFull` leaf of that shape.

    Returns:
      ``int32[..., n]``: ``x W + s · rshift(rshift(x A, 4) Bᵀ, σ̂)`` for a low-rank leaf (the fixed-point product with
      ``W + s A Bᵀ / 2^(4+σ̂)``, without forming it).
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
    """Row lookup ``int8[..., n]`` of ``table: int8[vocab, n]``; perturbed rows ``sat(W[t] + s · rshift(A[t] Bᵀ, 4 + σ̂))``."""
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


# ----------------------------------------------------------------------------------------------------------------
# the strategy


@dataclasses.dataclass(frozen=True, eq=False)
class IntConfig:
    """Static configuration of :func:`int_eggroll`."""

    population_size: int
    rank: int
    sigma_shift: int
    alpha: float
    alpha_decay: float
    group_size: int
    noise_reuse: int
    labels: Any
    antithetic: bool = True

    @property
    def num_pairs(self) -> int:
        return self.population_size // 2


class IntPopulation(NamedTuple):
    """``ask``'s pre-generated noise: a list per leaf of ``(A, B)`` (``int8[P, ...]``), ``ε`` or ``None``."""

    noise: list
    sigma: jax.Array


#: Per-generation metrics of :func:`int_eggroll`: every field of :class:`esx.Metrics` (same order; ``sigma`` is
#: ``2^-sigma_shift``, ``grad_norm`` the norm of the vote tallies) plus ``alpha`` (the update threshold fraction),
#: ``changed_fraction`` (weights that moved) and ``num_decided_pairs`` (pairs with unequal fitness).
IntMetrics = NamedTuple("IntMetrics", [(name, jax.Array) for name in Metrics._fields]
                        + [("alpha", jax.Array), ("changed_fraction", jax.Array), ("num_decided_pairs", jax.Array)])


def pair_signs(fitness: jax.Array) -> jax.Array:
    """``int32[N] or float[N] -> int32[N/2]``: ``sign(f[2k] - f[2k+1])``."""
    fitness = jnp.asarray(fitness)
    if jnp.issubdtype(fitness.dtype, jnp.floating):
        fitness = jnp.where(jnp.isfinite(fitness), fitness, -jnp.inf)
        d = fitness[0::2] - fitness[1::2]
        d = jnp.where(jnp.isnan(d), 0.0, d)
        return jnp.sign(d).astype(jnp.int32)
    return jnp.sign(fitness[0::2].astype(jnp.int32) - fitness[1::2].astype(jnp.int32))


def int_eggroll(
    *,
    population_size: int,
    sigma_shift: int = 4,
    rank: int = 1,
    alpha: float = 0.1,
    alpha_decay: float = 0.015,
    group_size: int = 2,
    noise_reuse: int = 1,
    labels: Any = None,
) -> Strategy:
    """Integer EGGROLL for int8 models (see the module docstring for the exact rules).

    Args:
      population_size: ``N`` (even): members ``2k`` and ``2k+1`` are an antithetic pair.
      sigma_shift: σ̂ >= 0, σ = 2^-σ̂ (the state's ``sigma`` leaf, ``int32``).
      rank: rank ``r`` of each low-rank perturbation (the paper uses 1).
      alpha: the z-test level at generation 0 (≈ the fraction of weights moved per step under the null).
      alpha_decay: ``α_t = alpha / (alpha_decay · t + 1)``.
      group_size: consecutive members that share the evaluation key and (``data_per_group``) data; a multiple of 2
        keeps antithetic partners on identical bytes.
      noise_reuse: keep each pair's noise for this many generations (``0``: forever).
      labels: per-leaf ``"lowrank"`` / ``"full"`` / ``"frozen"`` (as :mod:`esx.labels`); default: ndim >= 2 low-rank.

    Returns:
      An :class:`esx.Strategy` whose ``init(key, params)`` takes a pytree of ``int8`` arrays.
    """
    if not isinstance(population_size, (int, np.integer)) or population_size < 2 or population_size % 2:
        raise ValueError(f"population_size={population_size!r}; must be an even integer >= 2 (antithetic pairs)")
    if not isinstance(sigma_shift, (int, np.integer)) or not 0 <= sigma_shift <= 15:
        raise ValueError(f"sigma_shift={sigma_shift!r}; must be an integer in [0, 15]")
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r}; must be an integer >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}; must be in (0, 1)")
    if alpha_decay < 0:
        raise ValueError(f"alpha_decay={alpha_decay!r}; must be >= 0")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1 or population_size % group_size:
        raise ValueError(f"group_size={group_size!r}; must divide population_size={population_size}")
    if not isinstance(noise_reuse, (int, np.integer)) or noise_reuse < 0:
        raise ValueError(f"noise_reuse={noise_reuse!r}; must be an integer >= 0")
    cfg = IntConfig(int(population_size), int(rank), int(sigma_shift), float(alpha), float(alpha_decay),
                    int(group_size), int(noise_reuse), labels)
    n_pop, n_pairs = cfg.population_size, cfg.num_pairs
    var = table_variance()
    std_lowrank = int(round(var))                 # std of one A_i B_j term (16 · 16)
    std_full = int(round(math.sqrt(var)))         # std of one ε term (16)

    def leaves_of(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [labels_lib.path_to_str(p) for p, _ in flat]
        labs = _resolve_labels(params, cfg.labels, True)
        return treedef, paths, labs

    def init(key: jax.Array, params: Any) -> State:
        if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
            raise TypeError("init: key must be a PRNG key from jax.random.key(seed)")
        treedef, paths, labs = leaves_of(params)
        seen: dict[int, str] = {}
        for path, leaf, lab in zip(paths, jax.tree_util.tree_leaves(params), labs):
            leaf = jnp.asarray(leaf)
            if leaf.dtype != jnp.int8:
                raise TypeError(f"init: parameter {path!r} has dtype {leaf.dtype}; int_eggroll needs int8 leaves")
            if lab == labels_lib.LOWRANK and leaf.ndim < 2:
                raise ValueError(f"init: parameter {path!r} of shape {leaf.shape} cannot be 'lowrank'")
            lid = noise_lib.leaf_id(path)
            if lid in seen and lab != labels_lib.FROZEN:
                raise ValueError(f"init: leaves {seen[lid]!r} and {path!r} share a noise id; rename one")
            seen[lid] = path
        params = jax.tree_util.tree_map(lambda x: jnp.clip(jnp.asarray(x), -127, 127).astype(jnp.int8), params)
        return State(params=params, opt_state=(), sigma=jnp.asarray(cfg.sigma_shift, jnp.int32),
                     generation=jnp.zeros((), jnp.int32), key=key, table=jnp.asarray(normal_table()))

    def pair_noise(state: State, paths, labs, pair: jax.Array) -> list:
        out = []
        for path, leaf, lab in zip(paths, jax.tree_util.tree_leaves(state.params), labs):
            if lab == labels_lib.FROZEN:
                out.append(None)
                continue
            k = noise_lib.member_key(state.key, path, state.generation, pair, cfg.noise_reuse)
            if lab == labels_lib.LOWRANK:
                *stack, m, n = leaf.shape
                ab = int_noise(k, (*stack, m + n, cfg.rank), state.table)
                out.append((ab[..., :m, :], ab[..., m:, :]))
            else:
                out.append(int_noise(k, leaf.shape, state.table))
        return out

    def member_view(state: State, treedef, labs, noise: list, sign: jax.Array) -> Any:
        leaves = []
        for leaf, lab, nz in zip(jax.tree_util.tree_leaves(state.params), labs, noise):
            if lab == labels_lib.FROZEN:
                leaves.append(leaf)
            elif lab == labels_lib.LOWRANK:
                stack = leaf.shape[:-2]
                leaves.append(IntLowRank(leaf, nz[0], nz[1], jnp.broadcast_to(sign, stack),
                                         jnp.broadcast_to(state.sigma, stack)))
            else:
                stack = leaf.shape[:-1]
                leaves.append(IntFull(leaf, nz, jnp.broadcast_to(sign, stack), jnp.broadcast_to(state.sigma, stack)))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def sign_of(member):
        return 1 - 2 * (member % 2).astype(jnp.int32)

    def ask(state: State) -> IntPopulation:
        _, paths, labs = leaves_of(state.params)
        noise = jax.vmap(lambda p: pair_noise(state, paths, labs, p))(jnp.arange(n_pairs, dtype=jnp.int32))
        return IntPopulation(noise=noise, sigma=state.sigma)

    def view(state: State, population: IntPopulation, member: jax.Array) -> Any:
        treedef, _, labs = leaves_of(state.params)
        member = jnp.asarray(member, jnp.int32)
        noise = jax.tree_util.tree_map(lambda x: x[member // 2], population.noise)
        return member_view(state, treedef, labs, noise, sign_of(member))

    def evaluate(state: State, fitness_fn: Callable, key: jax.Array, data: Any = None, *,
                 data_per_group: bool = False, data_per_member: bool = False, has_aux: bool = False,
                 pairs: jax.Array | None = None):
        """Fitness of every member (of the given ``pairs``): ``[N]`` (and ``aux`` with a leading ``N`` axis).

        ``fitness_fn(view, key, data)`` gets ``key = fold_in(key, member // group_size)`` and, with
        ``data_per_group``, ``data[member // group_size]``; with ``data_per_member``, ``data[member]``.
        """
        if data_per_group and data_per_member:
            raise ValueError("evaluate: choose data_per_group or data_per_member, not both")
        treedef, paths, labs = leaves_of(state.params)
        if pairs is None:
            pairs = jnp.arange(n_pairs, dtype=jnp.int32)
        pairs = jnp.asarray(pairs, jnp.int32)
        members = pairs[:, None] * 2 + jnp.arange(2, dtype=jnp.int32)[None, :]
        lead = n_pop // cfg.group_size if data_per_group else n_pop if data_per_member else None
        if lead is not None:
            for x in jax.tree_util.tree_leaves(data):
                if np.shape(x)[:1] != (lead,):
                    raise ValueError(f"evaluate: every data leaf needs a leading axis of {lead}, got {np.shape(x)}")

        def one_member(noise, member):
            group = member // cfg.group_size
            mkey = jax.random.fold_in(key, group.astype(jnp.uint32))
            if data_per_group:
                d = jax.tree_util.tree_map(lambda x: x[group], data)
            elif data_per_member:
                d = jax.tree_util.tree_map(lambda x: x[member], data)
            else:
                d = data
            return fitness_fn(member_view(state, treedef, labs, noise, sign_of(member)), mkey, d)

        def one_pair(pair, mem):
            noise = pair_noise(state, paths, labs, pair)
            return jax.vmap(lambda m: one_member(noise, m))(mem)

        out = jax.vmap(one_pair)(pairs, members)
        return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)

    def check_fitness(fitness):
        fitness = jnp.asarray(fitness)
        if fitness.shape != (n_pop,):
            raise ValueError(f"tell: fitness must have shape ({n_pop},), got {fitness.shape}")
        return fitness

    def gradient(state: State, fitness: jax.Array, pairs: jax.Array | None = None) -> Any:
        """The int32 tallies ``E = Σ_k F_k A_k B_kᵀ`` (``Σ_k F_k ε_k``) per leaf, over ``pairs`` if given."""
        fitness = check_fitness(fitness)
        treedef, paths, labs = leaves_of(state.params)
        signs = pair_signs(fitness)
        if pairs is None:
            pairs = jnp.arange(n_pairs, dtype=jnp.int32)
        pairs = jnp.asarray(pairs, jnp.int32)
        signs = signs[pairs]
        noise = jax.vmap(lambda p: pair_noise(state, paths, labs, p))(pairs)
        tallies = []
        for leaf, lab, nz in zip(jax.tree_util.tree_leaves(state.params), labs, noise):
            if lab == labels_lib.FROZEN:
                tallies.append(jnp.zeros(leaf.shape, jnp.int32))
            elif lab == labels_lib.LOWRANK:
                a, b = nz
                fa = a.astype(jnp.int32) * signs.reshape((-1,) + (1,) * (a.ndim - 1))
                tallies.append(jnp.einsum("p...mr,p...nr->...mn", fa, b.astype(jnp.int32),
                                          preferred_element_type=jnp.int32))
            else:
                tallies.append(jnp.einsum("p,p...->...", signs, nz.astype(jnp.int32),
                                          preferred_element_type=jnp.int32))
        return jax.tree_util.tree_unflatten(treedef, tallies)

    z_tab = z_table(cfg.alpha, cfg.alpha_decay)
    s_tab = sqrt_table(n_pairs)

    def thresholds(generation: jax.Array, decided: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``int32`` thresholds ``z_{α_t/2} · v · √P`` for low-rank and full leaves."""
        z = jnp.asarray(z_tab)[jnp.minimum(generation, Z_TABLE_SIZE - 1)]
        zs = jnp.right_shift(z * jnp.asarray(s_tab)[decided], 8)       # 256 · z √P
        return (jnp.right_shift(zs * std_lowrank, 8), jnp.right_shift(zs * std_full, 8))

    def apply(state: State, tallies: Any, fitness: jax.Array) -> tuple[State, IntMetrics]:
        """Moves by ±1 (saturating) every weight whose ``|E|`` passes the threshold; advances the generation."""
        fitness = check_fitness(fitness)
        treedef, _, labs = leaves_of(state.params)
        decided = jnp.sum(pair_signs(fitness) != 0).astype(jnp.int32)
        thr_lr, thr_full = thresholds(state.generation, decided)
        new, changed, total = [], jnp.zeros((), jnp.int32), 0
        for leaf, lab, e in zip(jax.tree_util.tree_leaves(state.params), labs, jax.tree_util.tree_leaves(tallies)):
            if lab == labels_lib.FROZEN:
                new.append(leaf)
                continue
            thr = thr_lr if lab == labels_lib.LOWRANK else thr_full
            step_ = jnp.where((jnp.abs(e) > thr) & (decided > 0), jnp.sign(e), 0).astype(jnp.int32)
            updated = jnp.clip(leaf.astype(jnp.int32) + step_, -127, 127).astype(jnp.int8)
            changed = changed + jnp.sum(updated != leaf).astype(jnp.int32)
            total += leaf.size
            new.append(updated)
        gen_f = state.generation.astype(jnp.float32)
        metrics = IntMetrics(
            **fitness_stats(fitness),
            grad_norm=jnp.sqrt(sum(jnp.sum(jnp.square(t.astype(jnp.float32)))
                                   for t in jax.tree_util.tree_leaves(tallies))),
            sigma=jnp.exp2(-state.sigma.astype(jnp.float32)),
            generation=state.generation,
            skipped=decided == 0,
            alpha=cfg.alpha / (cfg.alpha_decay * gen_f + 1.0),
            changed_fraction=changed.astype(jnp.float32) / max(total, 1),
            num_decided_pairs=decided,
        )
        params = jax.tree_util.tree_unflatten(treedef, new)
        return state.replace(params=params, generation=state.generation + 1), metrics

    def tell(state: State, fitness: jax.Array) -> tuple[State, IntMetrics]:
        return apply(state, gradient(state, fitness), fitness)

    return Strategy(cfg, init, ask, view, evaluate, tell, gradient, apply)
