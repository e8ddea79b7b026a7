"""The strategy interface shared by ``eggroll`` and ``open_es``, and the free :func:`step`.

A strategy is a small NamedTuple of pure functions (as optax's ``GradientTransformation``)::

    strategy = esx.eggroll(population_size=256, rank=4, sigma=0.05, optimizer=optax.adam(1e-2))
    state = strategy.init(key, params)                      # State pytree
    fitness = strategy.evaluate(state, fitness_fn, key, data)  # float[N], higher is better
    state, metrics = strategy.tell(state, fitness)
    # or a whole generation under one jit:
    state, metrics = esx.step(strategy, state, fitness_fn, key, data)

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
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esx import labels as labels_lib
from esx import noise as noise_lib
from esx import shaping as shaping_lib
from esx.ops import Full, LowRank

FitnessFn = Callable[[Any, jax.Array, Any], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The whole state of a run: one immutable pytree, checkpointable as is.

    Attributes:
      params: the current (unperturbed) parameters.
      opt_state: the optax optimizer state.
      sigma: ``float32[]`` the noise scale of the current generation (a leaf: it may be vmapped over).
      generation: ``int32[]`` number of completed generations.
      key: the base PRNG key of the noise (constant over a run).
      table: ``float32[table_size]`` shared noise table for ``noise_source="table"``, else ``None``.
    """

    params: Any
    opt_state: Any
    sigma: jax.Array
    generation: jax.Array
    key: jax.Array
    table: jax.Array | None = None

    def replace(self, **changes) -> "State":
        return dataclasses.replace(self, **changes)


class Metrics(NamedTuple):
    """Per-generation metrics returned by ``tell`` (all scalars)."""

    fitness_mean: jax.Array
    fitness_std: jax.Array
    fitness_max: jax.Array
    fitness_min: jax.Array
    num_nonfinite: jax.Array
    grad_norm: jax.Array
    sigma: jax.Array
    generation: jax.Array
    skipped: jax.Array


class Population(NamedTuple):
    """The pre-generated noise of one generation (returned by ``ask``).

    Attributes:
      noise: a list with one entry per parameter leaf (flattening order): ``(A, B)`` with
        ``A: float[P, *stack, m, r]``, ``B: float[P, *stack, n, r]`` for low-rank leaves, ``ε: float[P, *shape]``
        for full leaves, ``None`` for frozen ones. ``P = N / 2`` with antithetic sampling, else ``N``.
      sigma: ``float32[]``.
    """

    noise: list
    sigma: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
    """Static configuration (changing any of it changes shapes or forces a recompile)."""

    population_size: int
    rank: int
    lowrank: bool
    antithetic: bool
    group_size: int
    noise_reuse: int
    noise_source: str
    table_size: int
    shaping: Callable[[jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    sigma: float | Callable[[jax.Array], jax.Array]
    labels: Any

    @property
    def num_pairs(self) -> int:
        return self.population_size // 2 if self.antithetic else self.population_size


class Strategy(NamedTuple):
    """An ES strategy: ``init``, ``ask``, ``evaluate``, ``tell`` and ``view`` are pure functions.

    * ``init(key, params) -> State``
    * ``ask(state) -> Population`` -- pre-generates this generation's noise for custom evaluation loops.
    * ``view(state, population, member) -> pytree`` -- member ``member``'s perturbed view.
    * ``evaluate(state, fitness_fn, key, data=None, *, data_per_group=False, has_aux=False) -> float[N]``
      (and ``aux`` with a leading ``N`` axis when ``has_aux``) -- the whole population, noise drawn on the fly.
    * ``tell(state, fitness) -> (State, Metrics)`` -- fitness ``float[N]``, higher is better.
      ``tell = apply(state, gradient(state, fitness), fitness)``; the two halves exist for sharded updates:
    * ``gradient(state, fitness, pairs=None) -> grads`` -- the ES estimate ``g`` (params-shaped), restricted to
      the antithetic pairs (or members, without antithetic sampling) listed in ``pairs`` when given;
    * ``apply(state, grads, fitness) -> (State, Metrics)`` -- the optimizer step on ``-grads``.
    * ``evaluate(..., pairs=...)`` likewise evaluates only the members of the given pairs.
    """

    config: Config
    init: Callable
    ask: Callable
    view: Callable
    evaluate: Callable
    tell: Callable
    gradient: Callable
    apply: Callable


def paper_learning_rate(lr_paper: float, *, sigma: float, population_size: int) -> float:
    """Converts a learning rate of the paper's code (SGD) to the textbook convention used by esx.

    The paper's code steps by ``lr_paper · √N σ² · g``; esx steps by ``lr · g``.
    """
    return lr_paper * math.sqrt(population_size) * sigma**2


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


def _resolve_labels(params: Any, spec: Any, lowrank: bool) -> list[str]:
    if spec is None or callable(spec) or (
        isinstance(spec, Mapping) and all(isinstance(v, str) for v in spec.values())
    ):
        tree = labels_lib.make_labels(params, spec)
    else:
        labels_lib.check_labels(params, spec)
        tree = spec
    flat = jax.tree_util.tree_structure(params).flatten_up_to(tree)
    if not lowrank:
        flat = [labels_lib.FULL if lab == labels_lib.LOWRANK else lab for lab in flat]
    return list(flat)


class _Leaves(NamedTuple):
    treedef: Any
    paths: list
    labels: list


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
) -> Strategy:
    """Builds an ES strategy; see :func:`esx.eggroll` and :func:`esx.open_es` for the arguments."""
    _validate(population_size, rank, sigma, antithetic, group_size, noise_reuse, noise_source,
              table_size, optimizer)
    shape_fn = shaping_lib.get(shaping, group_size)
    if shape_fn is shaping_lib.pair_sign and not antithetic:
        raise ValueError("shaping='pair_sign' needs antithetic=True")
    cfg = Config(population_size, int(rank), lowrank, antithetic, int(group_size), int(noise_reuse),
                 noise_source, int(table_size), shape_fn, optimizer, sigma, labels)
    n_pop, n_pairs = cfg.population_size, cfg.num_pairs

    def leaves_of(params) -> _Leaves:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [labels_lib.path_to_str(p) for p, _ in flat]
        labs = _resolve_labels(params, cfg.labels, cfg.lowrank)
        return _Leaves(treedef, paths, labs)

    def sigma_at(generation):
        if callable(cfg.sigma):
            return jnp.asarray(cfg.sigma(generation), jnp.float32)
        return jnp.asarray(cfg.sigma, jnp.float32)

    def init(key: jax.Array, params: Any) -> State:
        if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
            if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
                key = jax.random.wrap_key_data(key)
            else:
                raise TypeError("init: key must be a PRNG key from jax.random.key(seed)")
        info = leaves_of(params)
        seen: dict[int, str] = {}
        for path, leaf, lab in zip(info.paths, jax.tree_util.tree_leaves(params), info.labels):
            if lab != labels_lib.FROZEN and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise TypeError(
                    f"init: parameter {path!r} has dtype {jnp.asarray(leaf).dtype}; a float strategy needs "
                    "floating parameters (label it 'frozen', or use the integer strategy for int8 models)"
                )
            lid = noise_lib.leaf_id(path)
            if lid in seen and lab != labels_lib.FROZEN:
                raise ValueError(f"init: leaves {seen[lid]!r} and {path!r} share a noise id; rename one")
            seen[lid] = path
        if cfg.noise_source == "table":
            biggest = 0
            for leaf, lab in zip(jax.tree_util.tree_leaves(params), info.labels):
                shp = np.shape(leaf)
                if lab == labels_lib.LOWRANK:
                    biggest = max(biggest, (shp[-2] + shp[-1]) * cfg.rank)
                elif lab == labels_lib.FULL:
                    biggest = max(biggest, math.prod(shp))
            if biggest > cfg.table_size:
                raise ValueError(
                    f"table_size={cfg.table_size} is smaller than the largest single draw ({biggest} entries)"
                )
        generation = jnp.zeros((), jnp.int32)
        sigma0 = sigma_at(generation)
        if callable(cfg.sigma) and (not bool(jnp.isfinite(sigma0)) or float(sigma0) <= 0):
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

    def pair_noise(state: State, info: _Leaves, pair: jax.Array) -> list:
        leaves = jax.tree_util.tree_leaves(state.params)
        out: list = [None] * len(leaves)
        # The keys of all leaves in one batched pass (the same fold_in chain as noise.member_key, so the
        # same keys), instead of three threefry calls per leaf: compile time stays flat in the leaf count.
        ids = jnp.asarray([noise_lib.leaf_id(p) for p in info.paths], jnp.uint32)
        idx = noise_lib.noise_index(state.generation, cfg.noise_reuse)
        pair_u = jnp.asarray(pair).astype(jnp.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(
            jax.random.fold_in(state.key, i), idx), pair_u))(ids)
        # Gaussian draws of leaves of similar size share one vmapped call (padded to the next power of two, then
        # sliced). Each jax.random call is a loop of its own that XLA compiles separately (on CPU ~0.3 s each),
        # so this cuts compile time by the leaf count. Same values: with threefry's partitionable counters a
        # draw of shape (k,) is the prefix of a longer draw from the same key (tests/test_core.py checks against
        # noise.lowrank_factors / noise.full_noise).
        classes: dict = {}
        for i, (leaf, lab) in enumerate(zip(leaves, info.labels)):
            if lab == labels_lib.FROZEN:
                continue
            k = keys[i]
            if cfg.noise_source == "normal" and (lab != labels_lib.LOWRANK or leaf.ndim == 2):
                shape = (leaf.shape[0] + leaf.shape[1], cfg.rank) if lab == labels_lib.LOWRANK else leaf.shape
                size = math.prod(shape)
                padded = 1 << max(size - 1, 0).bit_length()
                classes.setdefault((padded, jnp.dtype(leaf.dtype)), []).append((i, shape))
            elif lab == labels_lib.LOWRANK:
                out[i] = noise_lib.lowrank_factors(k, leaf.shape, cfg.rank, leaf.dtype, cfg.noise_source,
                                                   state.table)
            else:
                out[i] = noise_lib.full_noise(k, leaf.shape, leaf.dtype, cfg.noise_source, state.table)
        # Small models (everything padded to the largest draw costs <= 64K numbers per pair, or <= 4x the
        # real draw): one call per dtype.
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
        for (padded, dtype), items in classes.items():
            sel = jnp.asarray([i for i, _ in items], jnp.int32)
            draws = jax.vmap(lambda k, p=padded, d=dtype: jax.random.normal(k, (p,), d))(keys[sel])
            for row, (i, shape) in enumerate(items):
                x = draws[row, :math.prod(shape)].reshape(shape)
                if info.labels[i] == labels_lib.LOWRANK:
                    m = leaves[i].shape[0]
                    out[i] = (x[:m], x[m:])
                else:
                    out[i] = x
        return out

    def member_view(state: State, info: _Leaves, noise: list, sign: jax.Array) -> Any:
        leaves = []
        for leaf, lab, nz in zip(jax.tree_util.tree_leaves(state.params), info.labels, noise):
            if lab == labels_lib.FROZEN:
                leaves.append(leaf)
            elif lab == labels_lib.LOWRANK:
                a, b = nz
                coef = state.sigma * sign / math.sqrt(cfg.rank)
                coef = jnp.broadcast_to(coef, leaf.shape[:-2]).astype(jnp.float32)
                leaves.append(LowRank(leaf, a, b, coef))
            else:
                coef = jnp.broadcast_to(state.sigma * sign, leaf.shape[:-1]).astype(jnp.float32)
                leaves.append(Full(leaf, nz, coef))
        return jax.tree_util.tree_unflatten(info.treedef, leaves)

    def sign_of(member):
        if not cfg.antithetic:
            return jnp.ones((), jnp.float32)
        return 1.0 - 2.0 * (member % 2).astype(jnp.float32)

    def pair_of(member):
        return member // 2 if cfg.antithetic else member

    def ask(state: State) -> Population:
        info = leaves_of(state.params)
        noise = jax.vmap(lambda p: pair_noise(state, info, p))(jnp.arange(n_pairs, dtype=jnp.int32))
        return Population(noise=noise, sigma=state.sigma)

    def view(state: State, population: Population, member: jax.Array) -> Any:
        info = leaves_of(state.params)
        member = jnp.asarray(member, jnp.int32)
        noise = jax.tree_util.tree_map(lambda x: x[pair_of(member)], population.noise)
        return member_view(state, info, noise, sign_of(member))

    def evaluate(state: State, fitness_fn: FitnessFn, key: jax.Array, data: Any = None, *,
                 data_per_group: bool = False, has_aux: bool = False, pairs: jax.Array | None = None):
        info = leaves_of(state.params)
        per = 2 if cfg.antithetic else 1
        if pairs is None:
            pairs = jnp.arange(n_pairs, dtype=jnp.int32)
        pairs = jnp.asarray(pairs, jnp.int32)
        members = pairs[:, None] * per + jnp.arange(per, dtype=jnp.int32)[None, :]
        n_groups = n_pop // cfg.group_size
        if data_per_group:
            for x in jax.tree_util.tree_leaves(data):
                if np.shape(x)[:1] != (n_groups,):
                    raise ValueError(
                        f"evaluate: data_per_group=True needs a leading axis of {n_groups} groups "
                        f"(population_size / group_size) on every data leaf, got shape {np.shape(x)}"
                    )

        def one_member(noise, member):
            group = member // cfg.group_size
            mkey = jax.random.fold_in(key, group.astype(jnp.uint32))
            d = jax.tree_util.tree_map(lambda x: x[group], data) if data_per_group else data
            out = fitness_fn(member_view(state, info, noise, sign_of(member)), mkey, d)
            f = out[0] if has_aux else out
            if jnp.shape(f) != ():
                raise ValueError(f"evaluate: fitness_fn must return a scalar per member, got shape {jnp.shape(f)}")
            return out

        # The noise of every pair, drawn once and shared by its members. The signs are the outer vmap axis and the
        # pairs the inner one, so the member axes reach XLA as [per, pairs]: with the pairs outside and a minor
        # member axis of size 2 ([pairs, 2]), XLA:CPU's code for a fitness function's own per-member elementwise
        # work (e.g. an RL rollout's PRNG calls in every step) ran 2x slower. Same values either way.
        noise = jax.vmap(lambda p: pair_noise(state, info, p))(pairs)
        out = jax.vmap(lambda ms: jax.vmap(one_member)(noise, ms))(members.T)
        return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), out)

    def check_fitness(fitness: jax.Array) -> jax.Array:
        fitness = jnp.asarray(fitness)
        if fitness.shape != (n_pop,):
            raise ValueError(f"tell: fitness must have shape ({n_pop},) (population_size), got {fitness.shape}")
        if not (jnp.issubdtype(fitness.dtype, jnp.floating) or jnp.issubdtype(fitness.dtype, jnp.integer)):
            raise TypeError(f"tell: fitness must be a real float or integer array, got dtype {fitness.dtype}")
        return fitness.astype(jnp.float32)

    def pair_weights(fitness: jax.Array) -> jax.Array:
        _, finite = shaping_lib.sanitize(fitness)
        shaped = jnp.where(jnp.any(finite), cfg.shaping(fitness), 0.0).astype(jnp.float32)
        return shaped[0::2] - shaped[1::2] if cfg.antithetic else shaped

    def gradient(state: State, fitness: jax.Array, pairs: jax.Array | None = None) -> Any:
        """The ES estimate ``g`` (a params-shaped pytree), summed over ``pairs`` only if given."""
        fitness = check_fitness(fitness)
        info = leaves_of(state.params)
        weights = pair_weights(fitness)
        if pairs is None:
            pairs = jnp.arange(n_pairs, dtype=jnp.int32)
        pairs = jnp.asarray(pairs, jnp.int32)
        weights = weights[pairs]
        noise = jax.vmap(lambda p: pair_noise(state, info, p))(pairs)
        scale = 1.0 / (n_pop * state.sigma)
        n_local = pairs.shape[0]
        grads = []
        for leaf, lab, nz in zip(jax.tree_util.tree_leaves(state.params), info.labels, noise):
            if lab == labels_lib.FROZEN:
                grads.append(jnp.zeros_like(leaf))
            elif lab == labels_lib.LOWRANK:
                a, b = nz
                wa = a * weights.astype(a.dtype).reshape((n_local,) + (1,) * (a.ndim - 1))
                g = jnp.einsum("p...mr,p...nr->...mn", wa, b)
                grads.append((g * (scale / math.sqrt(cfg.rank))).astype(leaf.dtype))
            else:
                g = jnp.tensordot(weights.astype(nz.dtype), nz, axes=1)
                grads.append((g * scale).astype(leaf.dtype))
        return jax.tree_util.tree_unflatten(info.treedef, grads)

    def apply(state: State, grad_tree: Any, fitness: jax.Array) -> tuple[State, Metrics]:
        """Hands ``-g`` to the optimizer and advances the generation; ``fitness`` feeds the metrics."""
        fitness = check_fitness(fitness)
        info = leaves_of(state.params)
        _, finite = shaping_lib.sanitize(fitness)
        neg = jax.tree_util.tree_map(jnp.negative, grad_tree)
        updates, opt_state = cfg.optimizer.update(neg, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = jax.tree_util.tree_unflatten(info.treedef, [
            old if lab == labels_lib.FROZEN else new
            for old, new, lab in zip(jax.tree_util.tree_leaves(state.params),
                                     jax.tree_util.tree_leaves(params), info.labels)
        ])
        ok = _all_finite(params) & _all_finite(opt_state) & jnp.any(finite)
        params = _select(ok, params, state.params)
        opt_state = _select(ok, opt_state, state.opt_state)
        generation = state.generation + 1
        new_sigma = sigma_at(generation) if callable(cfg.sigma) else state.sigma
        metrics = Metrics(
            **fitness_stats(fitness),
            grad_norm=_global_norm(grad_tree),
            sigma=state.sigma,
            generation=state.generation,
            skipped=~ok,
        )
        new_state = state.replace(params=params, opt_state=opt_state, generation=generation,
                                  sigma=jnp.asarray(new_sigma, jnp.float32))
        return new_state, metrics

    def tell(state: State, fitness: jax.Array) -> tuple[State, Metrics]:
        return apply(state, gradient(state, fitness), fitness)

    return Strategy(cfg, init, ask, view, evaluate, tell, gradient, apply)


def fitness_stats(fitness: jax.Array) -> dict:
    """The fitness fields of :class:`Metrics` for ``fitness: float[N]`` (or int): mean, standard deviation, max and
    min over the finite entries, and the number of non-finite ones (``float32`` scalars, ``num_nonfinite`` int32).
    With no finite entry, mean and std are 0, max is ``-inf`` and min ``+inf``."""
    f = jnp.asarray(fitness).astype(jnp.float32)
    finite = jnp.isfinite(f)
    fin = finite.astype(jnp.float32)
    n_fin = jnp.maximum(fin.sum(), 1.0)
    clean = jnp.where(finite, f, 0.0)
    mean = jnp.sum(clean) / n_fin
    return dict(
        fitness_mean=mean,
        fitness_std=jnp.sqrt(jnp.sum(((clean - mean) * fin) ** 2) / n_fin),
        fitness_max=jnp.max(jnp.where(finite, f, -jnp.inf)),
        fitness_min=jnp.min(jnp.where(finite, f, jnp.inf)),
        num_nonfinite=jnp.sum(~finite).astype(jnp.int32),
    )


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


@functools.partial(jax.jit, static_argnames=("strategy", "fitness_fn", "data_per_group"))
def step(strategy: Strategy, state: State, fitness_fn: FitnessFn, key: jax.Array, data: Any = None,
         *, data_per_group: bool = False) -> tuple[State, Metrics]:
    """One whole generation (evaluate + tell) under one ``jit``.

    Args:
      strategy: a :class:`Strategy` (static; hashed by identity).
      state: the current :class:`State`.
      fitness_fn: ``(view, key, data) -> float[]`` (static; hashed by identity, so pass the same function
        object every call to avoid recompiling).
      key: the evaluation key of this generation (environment seeds, sampling); split it at the call site.
      data: anything the fitness function needs (shared, or one slice per group with ``data_per_group``).

    Returns:
      ``(new_state, metrics)``.
    """
    fitness = strategy.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group)
    return strategy.tell(state, fitness)
