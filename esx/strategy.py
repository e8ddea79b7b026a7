"""The float strategies ``eggroll`` and ``open_es`` (:func:`make_strategy`), on the interface of :mod:`esx.base`.

The interface (``init / ask / view / evaluate / tell``, ``esx.step``) is :mod:`esx.base`'s; this module holds the
float maths only.

``fitness_fn(view, key, data) -> float[]`` receives a *member view*: the parameter pytree in which perturbed leaves
are :class:`esx.LowRank` / :class:`esx.Full` objects that the ops :func:`esx.dense`, :func:`esx.embed` and
:func:`esx.value` understand. ``key`` is ``fold_in(key, member // group_size)``, so the ``group_size``
consecutive members of a group share it (and their slice of ``data`` when ``data_per_group=True``).

The gradient handed to optax is the negated textbook ES estimate of the gradient of expected fitness::

    g = 1 / (N σ) · Σ_i f_i s_i E_i          (E_i = A_i B_iᵀ / √r for low-rank leaves, ε_i otherwise)

where ``f_i`` is the shaped fitness and ``s_i = ±1`` the antithetic sign. Since optax minimises, ``-g`` is passed
to ``optimizer.update``, so ``optax.sgd(lr)`` moves the parameters by ``+lr · g``.

Converting the paper's learning rates: its code hands the optimizer ``√N · σ · Δ`` with
``Δ = 1/N Σ f_i s_i E_i``, which equals ``√N σ² · g``. For SGD, ``lr_esx = lr_paper · √N · σ²``
(:func:`paper_learning_rate`); Adam and other scale-invariant optimizers take the same learning rate.

This module holds the float family's own maths (the low-rank and full views, the ES contraction, the optax step);
the interface (:class:`State`, :class:`Metrics`, :class:`Strategy`, :func:`step`, ...) is :mod:`esx.base`'s and is
re-exported here, and the member arithmetic and the population vmap are :mod:`esx._members`'.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esx import _members
from esx import labels as labels_lib
from esx import noise as noise_lib
from esx import shaping as shaping_lib
from esx.base import (  # noqa: F401  (re-exported: the interface's historical home)
    Config,
    FitnessFn,
    Metrics,
    Population,
    State,
    Strategy,
    _all_finite,
    _global_norm,
    _select,
    fitness_stats,
    paper_learning_rate,
    population_diagnostics,
    step,
    update_norms,
)
from esx.ops import Full, LowRank

_resolve_labels = _members.resolve_labels

__all__ = ["Config", "FitnessFn", "Metrics", "Population", "State", "Strategy", "fitness_stats", "make_strategy",
           "paper_learning_rate", "step"]


def _validate(population_size, rank, sigma, antithetic, group_size, noise_reuse, noise_source,
              table_size, optimizer):
    if not isinstance(population_size, (int, np.integer)) or population_size < 1:
        raise ValueError(f"population_size={population_size!r}; must be an integer >= 1")
    if antithetic and population_size % 2:
        raise ValueError(
            f"population_size={population_size} is odd but antithetic=True pairs members (2k, 2k+1); "
            "use an even population_size or antithetic=False"
        )
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; must be an integer >= 1")
    if population_size % group_size:
        raise ValueError(
            f"population_size={population_size} is not divisible by group_size={group_size}"
        )
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r}; must be an integer >= 1")
    if not callable(sigma):
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma={sigma!r}; must be a finite number > 0 (or a schedule)")
    if not isinstance(noise_reuse, (int, np.integer)) or noise_reuse < 0:
        raise ValueError(
            f"noise_reuse={noise_reuse!r}; must be an integer >= 0 (0 = same noise every generation)"
        )
    if noise_source not in noise_lib.NOISE_SOURCES:
        raise ValueError(f"noise_source={noise_source!r}; valid sources are {noise_lib.NOISE_SOURCES}")
    if table_size < 1:
        raise ValueError(f"table_size={table_size}; must be >= 1")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer={optimizer!r}; must be an optax.GradientTransformation")


def _sigma_at(cfg: Config, generation: jax.Array) -> jax.Array:
    """``float32[]``: σ at ``generation: int32[]`` (the schedule's value, or the constant)."""
    if callable(cfg.sigma):
        return jnp.asarray(cfg.sigma(generation), jnp.float32)
    return jnp.asarray(cfg.sigma, jnp.float32)


def _next_sigma(cfg: Config, state: State) -> jax.Array:
    """σ of the next generation under a schedule: ``schedule(g + 1)`` while ``state.sigma`` is ``schedule(g)``; a σ
    set in the state by hand (``state.replace(sigma=...)``, e.g. vmapped over a sweep) is kept and follows the
    schedule's shape: ``σ · schedule(g + 1) / schedule(g)``."""
    now, nxt = _sigma_at(cfg, state.generation), _sigma_at(cfg, state.generation + 1)
    scaled = state.sigma * jnp.where(now != 0, nxt / jnp.where(now != 0, now, 1.0), 1.0)
    return jnp.where(state.sigma == now, nxt, scaled)


def _check_leaf(path: str, leaf: Any, label: str) -> None:
    if label != labels_lib.FROZEN and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
        raise TypeError(
            f"init: parameter {path!r} has dtype {jnp.asarray(leaf).dtype}; a float strategy needs "
            "floating parameters (label it 'frozen', or use the integer strategy for int8 models)"
        )


def _check_table_size(cfg: Config, params: Any, table: _members.LeafTable) -> None:
    biggest = 0
    for i, (leaf, lab) in enumerate(zip(jax.tree_util.tree_leaves(params), table.labels)):
        shp = table.matrix_shape(i, np.shape(leaf))
        if lab == labels_lib.LOWRANK:
            biggest = max(biggest, (shp[-2] + shp[-1]) * cfg.rank)
        elif lab == labels_lib.FULL:
            biggest = max(biggest, math.prod(shp))
    if biggest > cfg.table_size:
        raise ValueError(
            f"table_size={cfg.table_size} is smaller than the largest single draw ({biggest} entries)"
        )


def _init(cfg: Config, key: jax.Array, params: Any) -> State:
    key = _members.check_key(key)
    table = _members.leaf_table(params, cfg.labels, lowrank=cfg.lowrank)
    _members.check_leaves(table, params, _check_leaf)
    if cfg.noise_source == "table":
        _check_table_size(cfg, params, table)
    generation = jnp.zeros((), jnp.int32)
    with jax.ensure_compile_time_eval():   # a schedule's value at 0 is a constant, also when init is jitted
        sigma0 = _sigma_at(cfg, jnp.zeros((), jnp.int32))
    if callable(cfg.sigma) and not isinstance(sigma0, jax.core.Tracer) and (
            not np.isfinite(float(sigma0)) or float(sigma0) <= 0):
        raise ValueError(f"sigma schedule gives sigma={float(sigma0)} at generation 0; must be > 0")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return State(
        params=params,
        opt_state=cfg.optimizer.init(params),
        sigma=sigma0,
        generation=generation,
        key=key,
        table=noise_lib.make_table(cfg.table_size) if cfg.noise_source == "table" else None,
    )


def _pair_noise(cfg: Config, state: State, table: _members.LeafTable, pair: jax.Array) -> list:
    """One pair's noise, one entry per leaf (as :class:`Population`'s, without the leading axis)."""
    leaves = [jax.ShapeDtypeStruct(table.matrix_shape(i, leaf.shape), leaf.dtype)
              for i, leaf in enumerate(jax.tree_util.tree_leaves(state.params))]
    keys = noise_lib.member_keys(state.key, table.paths, state.generation, pair, cfg.noise_reuse)
    return noise_lib.leaf_noise(keys, leaves, table.labels, cfg.rank, cfg.noise_source, state.table)


def _member_view(cfg: Config, state: State, table: _members.LeafTable, noise: list, sign: jax.Array) -> Any:
    """The view of the member with sign ``sign: float32[]``: :class:`LowRank` / :class:`Full` leaves with
    ``coef = σ s / √r`` (low-rank, shape ``stack``) or ``σ s`` (full, shape ``shape[:-1]``)."""
    leaves = []
    for i, (leaf, lab, nz) in enumerate(zip(jax.tree_util.tree_leaves(state.params), table.labels, noise)):
        if lab == labels_lib.FROZEN:
            leaves.append(leaf)
        elif lab == labels_lib.LOWRANK and table.rows[i] is not None:   # tensor leaf: one matrix, rows = k axes
            a, b = nz
            k = table.rows[i]
            coef = (state.sigma * sign / math.sqrt(cfg.rank)).astype(jnp.float32)
            leaves.append(LowRank(leaf, a.reshape(leaf.shape[:k] + a.shape[-1:]),
                                  b.reshape(leaf.shape[k:] + b.shape[-1:]), coef))
        elif lab == labels_lib.LOWRANK:
            a, b = nz
            coef = state.sigma * sign / math.sqrt(cfg.rank)
            coef = jnp.broadcast_to(coef, leaf.shape[:-2]).astype(jnp.float32)
            leaves.append(LowRank(leaf, a, b, coef))
        else:
            coef = jnp.broadcast_to(state.sigma * sign, leaf.shape[:-1]).astype(jnp.float32)
            leaves.append(Full(leaf, nz, coef))
    return jax.tree_util.tree_unflatten(table.treedef, leaves)


def _check_fitness(cfg: Config, fitness: jax.Array) -> jax.Array:
    return _members.check_fitness(fitness, cfg.population_size).astype(jnp.float32)


def _pair_weights(cfg: Config, fitness: jax.Array) -> jax.Array:
    """``float32[N] -> float32[P]``: the shaped fitness, as ``f_{2k} - f_{2k+1}`` with antithetic sampling."""
    _, finite = shaping_lib.sanitize(fitness)
    shaped = jnp.where(jnp.any(finite), cfg.shaping(fitness), 0.0).astype(jnp.float32)
    return shaped[0::2] - shaped[1::2] if cfg.antithetic else shaped


def _gradient(cfg: Config, perturbation: _members.Perturbation, members: _members.Members, state: State,
              fitness: jax.Array, pairs: jax.Array | None, weights: jax.Array | None = None) -> Any:
    """The ES estimate ``g = 1/(Nσ) Σ_k w_k E_k`` (params-shaped), summed over ``pairs`` only if given; with
    ``member_batch`` the sum runs chunk by chunk, each chunk's noise regenerated (:func:`esx._members.chunk_sum`).
    ``weights``: the pair weights of ``fitness`` when the caller has them (``tell``: shaped once)."""
    fitness = _check_fitness(cfg, fitness)
    table = perturbation.table_of(state.params)
    all_weights = _pair_weights(cfg, fitness) if weights is None else weights
    pairs = members.pairs(pairs)
    leaves = jax.tree_util.tree_leaves(state.params)

    def contract(pairs: jax.Array) -> list:
        """``Σ_k w_k A_k B_kᵀ`` (``Σ_k w_k ε_k``) per leaf over ``pairs`` (``None`` for frozen leaves)."""
        weights = all_weights[pairs]
        noise = _members.pair_noises(perturbation, state, table, pairs)
        n_local = pairs.shape[0]
        sums = []
        for lab, nz in zip(table.labels, noise):
            if lab == labels_lib.FROZEN:
                sums.append(None)
            elif lab == labels_lib.LOWRANK:
                a, b = nz
                wa = a * weights.astype(a.dtype).reshape((n_local,) + (1,) * (a.ndim - 1))
                sums.append(jnp.einsum("p...mr,p...nr->...mn", wa, b))
            else:
                sums.append(jnp.tensordot(weights.astype(nz.dtype), nz, axes=1))
        return sums

    sums = _members.chunk_sum(members, pairs, contract)
    scale = 1.0 / (cfg.population_size * state.sigma)
    grads = []
    for leaf, lab, g in zip(leaves, table.labels, sums):
        if lab == labels_lib.FROZEN:
            grads.append(jnp.zeros_like(leaf))
        elif lab == labels_lib.LOWRANK:   # (a tensor leaf's [prod(in), prod(out)] sum takes the leaf's shape)
            grads.append((g * (scale / math.sqrt(cfg.rank))).astype(leaf.dtype).reshape(leaf.shape))
        else:
            grads.append((g * scale).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(table.treedef, grads)


def _apply(cfg: Config, perturbation: _members.Perturbation, state: State, grad_tree: Any,
           fitness: jax.Array, weights: jax.Array | None = None) -> tuple[State, Metrics]:
    """Hands ``-g`` to the optimizer and advances the generation; ``fitness`` (and its pair ``weights``, shaped
    here unless given) feed the metrics. A step that makes a parameter or the optimizer state non-finite (or a
    generation without finite fitness) is skipped."""
    fitness = _check_fitness(cfg, fitness)
    weights = _pair_weights(cfg, fitness) if weights is None else weights
    table = perturbation.table_of(state.params)
    _, finite = shaping_lib.sanitize(fitness)
    neg = jax.tree_util.tree_map(jnp.negative, grad_tree)
    updates, opt_state = cfg.optimizer.update(neg, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree_util.tree_unflatten(table.treedef, [
        old if lab == labels_lib.FROZEN else new
        for old, new, lab in zip(jax.tree_util.tree_leaves(state.params),
                                 jax.tree_util.tree_leaves(params), table.labels)
    ])
    ok = _all_finite(params) & _all_finite(opt_state) & jnp.any(finite)
    params = _select(ok, params, state.params)
    opt_state = _select(ok, opt_state, state.opt_state)
    generation = state.generation + 1
    new_sigma = _next_sigma(cfg, state) if callable(cfg.sigma) else state.sigma
    metrics = Metrics(
        **fitness_stats(fitness),
        grad_norm=_global_norm(grad_tree),
        sigma=state.sigma,
        generation=state.generation,
        skipped=~ok,
        **population_diagnostics(fitness, weights, group_size=cfg.group_size, antithetic=cfg.antithetic),
        **update_norms(grad_tree, table.labels),
    )
    new_state = state.replace(params=params, opt_state=opt_state, generation=generation,
                              sigma=jnp.asarray(new_sigma, jnp.float32))
    return new_state, metrics


# ``member_order`` (see :func:`esx.eggroll`): the layout of evaluate's member vmap; the same fitness either way.
MEMBER_ORDERS = ("signs_outer", "pairs_outer")


def make_strategy(
    *,
    population_size: int,
    rank: int,
    sigma: float | Callable[[jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    lowrank: bool,
    antithetic: bool = True,
    group_size: int = 1,
    shaping: str | Callable[[jax.Array], jax.Array] = "centered_rank",
    noise_reuse: int = 1,
    noise_source: str = "normal",
    table_size: int = 1 << 22,
    labels: Any = None,
    member_batch: int | None = None,
    member_order: str = "signs_outer",
) -> Strategy:
    """Builds a float ES strategy; see :func:`esx.eggroll` (``lowrank=True``) and :func:`esx.open_es`
    (``lowrank=False``: every ``"lowrank"`` label becomes ``"full"``) for the arguments.

    Returns:
      a :class:`Strategy`: ``evaluate -> float[N]``, ``gradient -> g`` (params-shaped), ``tell -> (State,
      Metrics)``.
    """
    _validate(population_size, rank, sigma, antithetic, group_size, noise_reuse, noise_source,
              table_size, optimizer)
    shape_fn = shaping_lib.get(shaping, group_size)
    if shape_fn is shaping_lib.pair_sign and not antithetic:
        raise ValueError("shaping='pair_sign' needs antithetic=True")
    member_batch = _members.check_member_batch(member_batch, population_size, antithetic)
    if member_order not in MEMBER_ORDERS:
        raise ValueError(f"member_order={member_order!r}; valid orders are {', '.join(map(repr, MEMBER_ORDERS))}")
    cfg = Config(population_size, int(rank), lowrank, antithetic, int(group_size), int(noise_reuse),
                 noise_source, int(table_size), shape_fn, optimizer, sigma, labels, member_batch, member_order)
    members = _members.Members(cfg.population_size, cfg.group_size, cfg.antithetic, cfg.member_batch)
    perturbation = _members.Perturbation(
        table_of=lambda params: _members.leaf_table(params, cfg.labels, lowrank=cfg.lowrank),
        pair_noise=lambda state, table, pair: _pair_noise(cfg, state, table, pair),
        member_view=lambda state, table, noise, sign: _member_view(cfg, state, table, noise, sign),
        sign_dtype=jnp.float32,
        population=Population,
        sign_major=cfg.member_order == "signs_outer",
    )
    ask, view, evaluate = _members.population_functions(members, perturbation)

    def init(key: jax.Array, params: Any) -> State:
        return _init(cfg, key, params)

    def gradient(state: State, fitness: jax.Array, pairs: jax.Array | None = None) -> Any:
        return _gradient(cfg, perturbation, members, state, fitness, pairs)

    def apply(state: State, grad_tree: Any, fitness: jax.Array) -> tuple[State, Metrics]:
        return _apply(cfg, perturbation, state, grad_tree, fitness)

    def tell(state: State, fitness: jax.Array) -> tuple[State, Metrics]:
        # apply(state, gradient(state, fitness), fitness), with the fitness shaped once for both halves
        weights = _pair_weights(cfg, _check_fitness(cfg, fitness))
        grads = _gradient(cfg, perturbation, members, state, fitness, None, weights)
        return _apply(cfg, perturbation, state, grads, fitness, weights)

    return Strategy(cfg, init, ask, view, evaluate, tell, gradient, apply)
