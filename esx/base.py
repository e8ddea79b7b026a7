"""The interface shared by every strategy (``eggroll``, ``open_es``, ``int_eggroll``) and the free :func:`step`.

A strategy is a small NamedTuple of pure functions (as optax's ``GradientTransformation``)::

    strategy = esx.eggroll(population_size=256, rank=4, sigma=0.05, optimizer=optax.adam(1e-2))
    state = strategy.init(key, params)                      # State pytree
    fitness = strategy.evaluate(state, fitness_fn, key, data)  # float[N], higher is better
    state, metrics = strategy.tell(state, fitness)
    # or a whole generation under one jit:
    state, metrics = esx.step(strategy, state, fitness_fn, key, data)

**Argument order.** Every function of the engine takes its arguments in one order: the strategy (or static
configuration) first, then the :class:`State`, then what the call is about (``population``, ``member``,
``fitness``, ``grads``), then the fitness function, then the key, then data; options are keyword-only
(``*, data_per_group, has_aux, pairs``) and an unknown option is an error. Keys are typed
(``jax.random.key``), split at the call site and never reused.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

#: ``fitness_fn(view, key, data) -> float[]`` (or ``(float[], aux)`` with ``has_aux``): the fitness of one member.
FitnessFn = Callable[[Any, jax.Array, Any], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The whole state of a run: one immutable pytree, checkpointable as is.

    Attributes:
      params: the current (unperturbed) parameters.
      opt_state: the optax optimizer state (``()`` for the integer strategy).
      sigma: ``float32[]`` the noise scale of the current generation (a leaf: it may be vmapped over); the
        integer strategy keeps the ``int32[]`` shift σ̂ here.
      generation: ``int32[]`` number of completed generations.
      key: the base PRNG key of the noise (constant over a run).
      table: ``float32[table_size]`` shared noise table for ``noise_source="table"`` (``int8[65536]`` for the
        integer strategy), else ``None``.
    """

    params: Any
    opt_state: Any
    sigma: jax.Array
    generation: jax.Array
    key: jax.Array
    table: jax.Array | None = None

    def replace(self, **changes) -> "State":
        """A copy with the given fields replaced."""
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
    member_batch: int | None = None   # members per evaluation / contraction chunk (None: all at once)

    @property
    def num_pairs(self) -> int:
        """``N / 2`` antithetic pairs, or ``N`` members without antithetic sampling."""
        return self.population_size // 2 if self.antithetic else self.population_size


class Strategy(NamedTuple):
    """An ES strategy: ``init``, ``ask``, ``evaluate``, ``tell`` and ``view`` are pure functions.

    * ``init(key, params) -> State``
    * ``ask(state) -> Population`` -- pre-generates this generation's noise for custom evaluation loops.
    * ``view(state, population, member) -> pytree`` -- member ``member``'s perturbed view.
    * ``evaluate(state, fitness_fn, key, data=None, *, data_per_group=False, data_per_member=False,
      has_aux=False, pairs=None) -> float[N]`` (and ``aux`` with a leading ``N`` axis when ``has_aux``) -- the
      whole population, noise drawn on the fly.
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

    The paper's code steps by ``lr_paper · √N σ² · g``; esx steps by ``lr · g``, so
    ``lr = lr_paper · √N σ²`` (all Python floats).
    """
    return lr_paper * math.sqrt(population_size) * sigma**2


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
    """``float32[]``: the 2-norm of every leaf of ``tree`` together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree: Any) -> jax.Array:
    """``bool[]``: every inexact leaf of ``tree`` is finite everywhere."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    """``a`` where ``pred: bool[]`` holds, else ``b`` (two pytrees of one structure), leaf by leaf."""
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
      ``(new_state, metrics)``: ``fitness: float[N]`` is evaluated and told in one program.
    """
    fitness = strategy.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group)
    return strategy.tell(state, fitness)
