"""Integer EGGROLL: the int8 evolution strategy of the EGG model (PAPER.md §6).

Every parameter is ``int8`` in ``[-127, 127]`` and holds a fixed-point number with 4 fractional bits (16 = 1.0).
A generation has ``N`` members in antithetic pairs ``(2k, 2k+1)`` with signs ``+1 / -1``.

**Noise.** Entries are ``int8`` values distributed as ``round(16 · N(0, 1))`` (clipped to ±127): entry ``j`` of a
draw is ``NORMAL_TABLE[h(k, j) >> 16]`` where ``h`` is a counter hash of the member key ``k`` (see
:func:`esx.noise.hash_bits`) and ``NORMAL_TABLE`` (:func:`normal_table`, 64 KiB) holds the 65536 quantiles
``round(16 · Φ⁻¹((u + ½) / 65536))``. ``k = member_key(base_key, leaf path, generation // noise_reuse, pair)``
(:func:`esx.noise.member_key`), so the noise is a pure function of (key, leaf, generation, pair) and is never stored.
The bits are :func:`esx.noise.hash_bits` (the counter hash of the ``"hash"`` / ``"binomial"`` float sources).

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
``|E| > z_{α_t/2} · v · √P`` (``P`` = number of pairs with ``F ≠ 0``) happens for a fraction ``α_t`` of the
entries. Those weights move by ``sign(E)`` (±1, saturating at ±127); all others stay.
``α_t = α / (decay · t + 1)`` (``decay = 0.015`` by default). The threshold is integer arithmetic: ``z`` comes from
an ``int32`` table of ``round(256 · z_{α_t/2})`` for ``t < 65536`` (clamped after) and ``√P`` from an ``int32``
table of ``round(256 √P)``.

**Strategy interface.** :func:`int_eggroll` returns an :class:`esx.Strategy` (``init / ask / view / evaluate / tell /
gradient / apply``) on the same :class:`esx.State` pytree (``opt_state`` is ``()``, ``sigma`` is the ``int32`` shift
σ̂, ``table`` the ``int8`` normal table); ``gradient`` returns the ``int32`` tallies and ``apply`` thresholds them,
so a sharded update can sum tallies over devices. ``evaluate`` also accepts ``data_per_member=True`` (every data
leaf has a leading axis ``N``): this is how truncated ES carries each member's hidden state across generations.

The integer ops (:func:`int_dense`, :func:`int_embed`, :func:`int_value`, :class:`IntLowRank`, :class:`IntFull`,
:func:`rshift`, :func:`saturate`, :func:`matmul_i32`, :data:`FRAC_BITS`) live in :mod:`esx.int_ops` and are
re-exported here; the member / pair / group arithmetic and the population vmap are :mod:`esx._members`'.
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

from esx import _members
from esx import labels as labels_lib
from esx import noise as noise_lib
from esx.base import Metrics, State, Strategy, fitness_stats, population_diagnostics, update_norms
from esx.int_ops import (  # noqa: F401  (re-exported: the integer ops' historical home)
    FRAC_BITS,
    IntFull,
    IntLowRank,
    int_dense,
    int_embed,
    int_value,
    matmul_i32,
    rshift,
    saturate,
)

__all__ = [
    "FRAC_BITS", "IntConfig", "IntFull", "IntLowRank", "IntMetrics", "IntPopulation", "NOISE_SCALE", "TABLE_BITS",
    "Z_TABLE_SIZE", "alpha_at", "int_dense", "int_eggroll", "int_embed", "int_noise", "int_value", "matmul_i32",
    "noise_bits", "normal_table", "pair_signs", "rshift", "saturate", "sqrt_table", "table_variance", "z_table",
]

NOISE_SCALE = 16          # noise entries are round(NOISE_SCALE · N(0, 1))
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
    """Variance of one noise entry of :func:`normal_table` (a Python float, ``≈ 256``)."""
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
# noise

#: ``uint32[shape]`` counter-hash bits of a key: :func:`esx.noise.hash_bits` (this module's historical name).
noise_bits = noise_lib.hash_bits


def int_noise(key: jax.Array, shape: tuple[int, ...], table: jax.Array) -> jax.Array:
    """``int8[shape]`` entries ``table[bits >> 16]`` (≈ ``round(16 · N(0, 1))``), a pure function of ``key``.

    ``bits = esx.noise.hash_bits(key, shape)``; ``table: int8[65536]`` (:func:`normal_table`).
    """
    idx = jnp.right_shift(noise_lib.hash_bits(key, tuple(shape)), jnp.uint32(32 - TABLE_BITS)).astype(jnp.int32)
    return table[idx]


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
    member_batch: int | None = None

    @property
    def num_pairs(self) -> int:
        """``N / 2`` antithetic pairs."""
        return self.population_size // 2


class IntPopulation(NamedTuple):
    """``ask``'s pre-generated noise: a list per leaf of ``(A, B)`` (``int8[P, ...]``), ``ε`` or ``None``."""

    noise: list
    sigma: jax.Array


#: Per-generation metrics of :func:`int_eggroll`: every field of :class:`esx.Metrics` (same order; ``sigma`` is
#: ``2^-sigma_shift``, ``grad_norm`` and ``update_norm_*`` the norms of the vote tallies, ``ess`` the number of decided
#: pairs: the pair signs are the weights) plus ``alpha`` (the update threshold fraction),
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



def _validate(population_size, sigma_shift, rank, alpha, alpha_decay, group_size, noise_reuse) -> None:
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


def _check_leaf(path: str, leaf: Any, label: str) -> None:
    leaf = jnp.asarray(leaf)
    if leaf.dtype != jnp.int8:
        raise TypeError(f"init: parameter {path!r} has dtype {leaf.dtype}; int_eggroll needs int8 leaves")
    if label == labels_lib.LOWRANK and leaf.ndim < 2:
        raise ValueError(f"init: parameter {path!r} of shape {leaf.shape} cannot be 'lowrank'")


def _init(cfg: IntConfig, key: jax.Array, params: Any) -> State:
    key = _members.check_key(key)
    _members.check_leaves(_members.leaf_table(params, cfg.labels, lowrank=True, tensors=False), params, _check_leaf)
    params = jax.tree_util.tree_map(lambda x: jnp.clip(jnp.asarray(x), -127, 127).astype(jnp.int8), params)
    return State(params=params, opt_state=(), sigma=jnp.asarray(cfg.sigma_shift, jnp.int32),
                 generation=jnp.zeros((), jnp.int32), key=key, table=jnp.asarray(normal_table()))


def _pair_noise(cfg: IntConfig, state: State, table: _members.LeafTable, pair: jax.Array) -> list:
    """One pair's noise: ``(A: int8[*stack, m, r], B: int8[*stack, n, r])``, ``ε: int8[shape]`` or ``None``."""
    out = []
    for path, leaf, lab in zip(table.paths, jax.tree_util.tree_leaves(state.params), table.labels):
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


def _member_view(state: State, table: _members.LeafTable, noise: list, sign: jax.Array) -> Any:
    """The view of the member with sign ``sign: int32[]``: :class:`IntLowRank` / :class:`IntFull` leaves."""
    leaves = []
    for leaf, lab, nz in zip(jax.tree_util.tree_leaves(state.params), table.labels, noise):
        if lab == labels_lib.FROZEN:
            leaves.append(leaf)
        elif lab == labels_lib.LOWRANK:
            stack = leaf.shape[:-2]
            leaves.append(IntLowRank(leaf, nz[0], nz[1], jnp.broadcast_to(sign, stack),
                                     jnp.broadcast_to(state.sigma, stack)))
        else:
            stack = leaf.shape[:-1]
            leaves.append(IntFull(leaf, nz, jnp.broadcast_to(sign, stack), jnp.broadcast_to(state.sigma, stack)))
    return jax.tree_util.tree_unflatten(table.treedef, leaves)


def _gradient(cfg: IntConfig, perturbation: _members.Perturbation, members: _members.Members, state: State,
              fitness: jax.Array, pairs: jax.Array | None) -> Any:
    """The int32 tallies ``E = Σ_k F_k A_k B_kᵀ`` (``Σ_k F_k ε_k``) per leaf, over ``pairs`` if given; with
    ``member_batch`` summed chunk by chunk (integers: exactly the unbatched tallies)."""
    fitness = _members.check_fitness(fitness, cfg.population_size)
    table = perturbation.table_of(state.params)
    all_signs = pair_signs(fitness)
    pairs = members.pairs(pairs)
    leaves = jax.tree_util.tree_leaves(state.params)

    def contract(pairs: jax.Array) -> list:
        signs = all_signs[pairs]
        noise = _members.pair_noises(perturbation, state, table, pairs)
        tallies = []
        for lab, nz in zip(table.labels, noise):
            if lab == labels_lib.FROZEN:
                tallies.append(None)      # zeros, filled in below (not carried through the chunk loop)
            elif lab == labels_lib.LOWRANK:
                a, b = nz
                fa = a.astype(jnp.int32) * signs.reshape((-1,) + (1,) * (a.ndim - 1))
                tallies.append(jnp.einsum("p...mr,p...nr->...mn", fa, b.astype(jnp.int32),
                                          preferred_element_type=jnp.int32))
            else:
                tallies.append(jnp.einsum("p,p...->...", signs, nz.astype(jnp.int32),
                                          preferred_element_type=jnp.int32))
        return tallies

    tallies = _members.chunk_sum(members, pairs, contract)
    tallies = [jnp.zeros(leaf.shape, jnp.int32) if t is None else t for leaf, t in zip(leaves, tallies)]
    return jax.tree_util.tree_unflatten(table.treedef, tallies)


def _make_thresholds(cfg: IntConfig) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(generation: int32[], decided: int32[]) -> (int32[], int32[])``: the thresholds ``z_{α_t/2} · v · √P`` of
    low-rank and full leaves (tables built once, here)."""
    var = table_variance()
    std_lowrank = int(round(var))                 # std of one A_i B_j term (16 · 16)
    std_full = int(round(math.sqrt(var)))         # std of one ε term (16)
    z_tab = z_table(cfg.alpha, cfg.alpha_decay)
    s_tab = sqrt_table(cfg.num_pairs)

    def thresholds(generation: jax.Array, decided: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = jnp.asarray(z_tab)[jnp.minimum(generation, Z_TABLE_SIZE - 1)]
        zs = jnp.right_shift(z * jnp.asarray(s_tab)[decided], 8)       # 256 · z √P
        return (jnp.right_shift(zs * std_lowrank, 8), jnp.right_shift(zs * std_full, 8))

    return thresholds


def _apply(cfg: IntConfig, perturbation: _members.Perturbation, thresholds: Callable, state: State, tallies: Any,
           fitness: jax.Array) -> tuple[State, IntMetrics]:
    """Moves by ±1 (saturating) every weight whose ``|E|`` passes the threshold; advances the generation."""
    fitness = _members.check_fitness(fitness, cfg.population_size)
    table = perturbation.table_of(state.params)
    decided = jnp.sum(pair_signs(fitness) != 0).astype(jnp.int32)
    thr_lr, thr_full = thresholds(state.generation, decided)
    new, changed, total = [], jnp.zeros((), jnp.int32), 0
    for leaf, lab, e in zip(jax.tree_util.tree_leaves(state.params), table.labels,
                            jax.tree_util.tree_leaves(tallies)):
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
        **population_diagnostics(fitness, pair_signs(fitness), group_size=cfg.group_size, antithetic=True),
        **update_norms(tallies, table.labels),
        alpha=cfg.alpha / (cfg.alpha_decay * gen_f + 1.0),
        changed_fraction=changed.astype(jnp.float32) / max(total, 1),
        num_decided_pairs=decided,
    )
    params = jax.tree_util.tree_unflatten(table.treedef, new)
    return state.replace(params=params, generation=state.generation + 1), metrics


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
    member_batch: int | None = None,
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
      member_batch: evaluate and tally ``member_batch`` members at a time (an even divisor of
        ``population_size``; ``None``: all at once); same fitness, exactly the same tallies (docs/hyperscale.md).

    Returns:
      An :class:`esx.Strategy` whose ``init(key, params)`` takes a pytree of ``int8`` arrays; ``tell`` and
      ``apply`` return :data:`IntMetrics`, ``gradient`` the ``int32`` tallies (params-shaped).
    """
    _validate(population_size, sigma_shift, rank, alpha, alpha_decay, group_size, noise_reuse)
    member_batch = _members.check_member_batch(member_batch, population_size, antithetic=True)
    cfg = IntConfig(int(population_size), int(rank), int(sigma_shift), float(alpha), float(alpha_decay),
                    int(group_size), int(noise_reuse), labels, member_batch=member_batch)
    members = _members.Members(cfg.population_size, cfg.group_size, antithetic=True, member_batch=member_batch)
    perturbation = _members.Perturbation(
        table_of=lambda params: _members.leaf_table(params, cfg.labels, lowrank=True, tensors=False),
        pair_noise=lambda state, table, pair: _pair_noise(cfg, state, table, pair),
        member_view=_member_view,
        sign_dtype=jnp.int32,
        population=IntPopulation,
        sign_major=False,
    )
    ask, view, evaluate = _members.population_functions(members, perturbation)
    thresholds = _make_thresholds(cfg)

    def init(key: jax.Array, params: Any) -> State:
        return _init(cfg, key, params)

    def gradient(state: State, fitness: jax.Array, pairs: jax.Array | None = None) -> Any:
        return _gradient(cfg, perturbation, members, state, fitness, pairs)

    def apply(state: State, tallies: Any, fitness: jax.Array) -> tuple[State, IntMetrics]:
        return _apply(cfg, perturbation, thresholds, state, tallies, fitness)

    def tell(state: State, fitness: jax.Array) -> tuple[State, IntMetrics]:
        return apply(state, gradient(state, fitness), fitness)

    return Strategy(cfg, init, ask, view, evaluate, tell, gradient, apply)
