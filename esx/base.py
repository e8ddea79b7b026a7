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
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from esx import labels as labels_lib
from esx import shaping as shaping_lib

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
    """Per-generation metrics returned by ``tell`` (all scalars).

    The fitness statistics (:func:`fitness_stats`), the update's size and the generation, then the population
    diagnostics (:func:`population_diagnostics`, :func:`update_norms`; docs/hyperscale.md, "Diagnostics"):

    * ``tie_fraction``: ``float32``, the fraction of members whose fitness equals another member's (non-finite
      fitness counted as the worst finite value, as the shaping sees it);
    * ``flat_group_fraction``: ``float32``, the fraction of groups whose members all scored the same (a prompt
      every member solves or fails): groups of ``group_size`` members, or with ``group_size=1`` the antithetic
      pairs, or without either the whole population (then 1 exactly when the fitness is constant);
    * ``ess``: ``float32``, the effective sample size of the shaped pair weights ``w`` (one per antithetic pair, or
      per member): ``(Σ|w|)² / Σw²``, the number of pairs when every weight has the same magnitude, 0 when all
      are zero;
    * ``update_norm_lowrank``, ``update_norm_full``: ``float32``, the 2-norm of the update (the ES gradient, or the
      integer tallies) over the ``"lowrank"`` / ``"full"`` leaves (``grad_norm`` is both together);
    * ``no_signal``: ``bool``, the generation carried no information about the perturbations: every shaped weight
      is zero (the update is zero) or every group is flat (``flat_group_fraction == 1``).
    """

    fitness_mean: jax.Array
    fitness_std: jax.Array
    fitness_max: jax.Array
    fitness_min: jax.Array
    num_nonfinite: jax.Array
    grad_norm: jax.Array
    sigma: jax.Array
    generation: jax.Array
    skipped: jax.Array
    tie_fraction: jax.Array
    flat_group_fraction: jax.Array
    ess: jax.Array
    update_norm_lowrank: jax.Array
    update_norm_full: jax.Array
    no_signal: jax.Array


#: the population diagnostics of :class:`Metrics` (logged by the runner when a task's metrics have them).
DIAGNOSTICS = ("tie_fraction", "flat_group_fraction", "ess", "update_norm_lowrank", "update_norm_full", "no_signal")


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
    member_order: str = "signs_outer"  # the member axes of evaluate's vmap: [signs, pairs] or [pairs, signs]

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

    def make_step(self, fitness_fn: FitnessFn, *, data_per_group: bool = False) -> Callable:
        """The fast path: ``step(state, key, data=None) -> (State, Metrics)``, one generation (evaluate + tell) of
        this strategy on ``fitness_fn`` under one ``jit``, compiled once (per data shape) however often it runs.

        The same as :func:`step` with the function fixed; ask → view → tell by hand draws the noise twice and
        gathers views, and runs slower (docs/interop.md).
        """
        strategy = self

        @jax.jit
        def bound(state: State, key: jax.Array, data: Any = None) -> tuple[State, Metrics]:
            fitness = strategy.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group)
            return strategy.tell(state, fitness)

        return bound


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


def population_diagnostics(fitness: jax.Array, weights: jax.Array, *, group_size: int,
                           antithetic: bool) -> dict:
    """The population fields of :class:`Metrics`: ``tie_fraction``, ``flat_group_fraction``, ``ess``, ``no_signal``.

    Args:
      fitness: ``float[N]`` or ``int[N]`` (non-finite floats count as the worst finite value, as in shaping; integer
        fitness is compared as integers).
      weights: the shaped pair weights ``float[P]`` that multiply the noise in the update (``P = N / 2`` with
        antithetic sampling, else ``N``; the integer strategy's pair signs).
      group_size, antithetic: the population's layout (see :class:`Metrics` for the groups).

    Everything is a count or a sum in a fixed order, so a sharded generation reports the same bits as
    :func:`step` (one sort of ``N`` values: ``O(N log N)``).
    """
    f = jnp.asarray(fitness)
    if not jnp.issubdtype(f.dtype, jnp.integer):
        f = shaping_lib.sanitize(f)[0]
    n = f.shape[0]
    s = jnp.sort(f)
    same = s[1:] == s[:-1]                                     # sorted neighbours equal
    false = jnp.zeros((1,), bool)
    tied = jnp.concatenate([false, same]) | jnp.concatenate([same, false])
    tie_fraction = jnp.sum(tied).astype(jnp.float32) / n
    size = group_size if group_size > 1 else (2 if antithetic else n)
    groups = f.reshape(n // size, size)
    flat = jnp.all(groups == groups[:, :1], axis=1)
    flat_group_fraction = jnp.sum(flat).astype(jnp.float32) / (n // size)
    w = jnp.abs(jnp.asarray(weights, jnp.float32))
    total, square = _ordered_sum(w), _ordered_sum(jax.lax.optimization_barrier(w * w))
    zero = square == 0
    ess = jnp.where(zero, 0.0, total * total / jnp.where(zero, 1.0, square)).astype(jnp.float32)
    return dict(tie_fraction=tie_fraction, flat_group_fraction=flat_group_fraction, ess=ess,
                no_signal=jnp.all(w == 0) | jnp.all(flat))


def _ordered_sum(x: jax.Array) -> jax.Array:
    """``float32[]``: the sum of ``x: float32[n]`` by halves in a fixed order (``x[:h] + x[h:]`` until one entry is
    left, zeros padding to a power of two): elementwise additions only, so every program that compiles it gets
    the same bits (XLA neither reorders them nor, behind the caller's barrier, fuses a product into them)."""
    n = 1 << max(x.shape[0] - 1, 0).bit_length()
    x = jnp.pad(x, (0, n - x.shape[0]))
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    return x[0]


def update_norms(tree: Any, labels: list) -> dict:
    """``update_norm_lowrank`` / ``update_norm_full``: the 2-norm of the leaves of ``tree`` (an update, params-shaped)
    whose label (one per leaf, flattening order) is ``"lowrank"`` / ``"full"`` (``0.0`` when there is none)."""
    def norm(kind):
        parts = [jnp.sum(jnp.square(x.astype(jnp.float32)))
                 for x, lab in zip(jax.tree_util.tree_leaves(tree), labels) if lab == kind]
        return jnp.sqrt(sum(parts)) if parts else jnp.zeros((), jnp.float32)

    return dict(update_norm_lowrank=norm(labels_lib.LOWRANK), update_norm_full=norm(labels_lib.FULL))


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
def _step(strategy: Strategy, state: State, fitness_fn: Callable, key: jax.Array, data: Any = None,
          *, data_per_group: bool = False) -> tuple[State, Metrics]:
    fitness = strategy.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group)
    return strategy.tell(state, fitness)


class _SameFunction:
    """A fitness function as ``jit``'s static argument, equal to another one that computes the same thing: the same
    code with the same closure, defaults and globals (a lambda or nested function made again each generation), or a
    ``functools.partial`` of an equal function with the same arguments (identity, or ``==`` for hashable ones)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._key = _function_key(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _SameFunction) and self._key == other._key


class _Same:
    """An argument compared by ``==`` when hashable, else by identity."""

    def __init__(self, value: Any, functions: bool = True):
        if functions and id(value) not in _IN_PROGRESS and (
                isinstance(value, functools.partial) or (callable(value) and hasattr(value, "__code__"))):
            value = _SameFunction(value)   # a function argument (a partial of a partial, a closure's helper)
        self.value = value
        try:
            self._hash = hash(("v", value))
            self.by_value = True
        except TypeError:
            self._hash, self.by_value = hash(("id", id(value))), False

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, _Same) or self.by_value != other.by_value:
            return False
        if not self.by_value:
            return self.value is other.value
        try:
            return bool(type(self.value) is type(other.value) and self.value == other.value)
        except Exception:   # an __eq__ that returns an array, or raises
            return self.value is other.value


_IN_PROGRESS: set = set()   # ids of the functions whose key is being built (a recursive closure compares by identity)


def _function_key(fn: Callable) -> tuple:
    _IN_PROGRESS.add(id(fn))
    try:
        return _key_of(fn)
    finally:
        _IN_PROGRESS.discard(id(fn))


def _key_of(fn: Callable) -> tuple:
    if isinstance(fn, functools.partial):
        return ("partial", _function_key(fn.func), tuple(map(_Same, fn.args)),
                tuple(sorted((k, _Same(v)) for k, v in fn.keywords.items())))
    code = getattr(fn, "__code__", None)
    if code is None or not hasattr(fn, "__globals__"):
        return ("object", _Same(fn))
    cells = tuple(_Same(c.cell_contents) if _filled(c) else None for c in (fn.__closure__ or ()))
    glob = fn.__globals__   # the globals it reads, by object: a module-level array rebound between calls differs
    used = tuple((name, _Same(glob[name], functions=False)) for name in code.co_names if name in glob)
    return ("function", code, id(glob), used, cells, tuple(map(_Same, fn.__defaults__ or ())),
            tuple(sorted((k, _Same(v)) for k, v in (fn.__kwdefaults__ or {}).items())))


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


_COMPILES: dict = {}   # code object -> distinct fitness functions compiled by step
_WARNED: set = set()
_WARN_AFTER = 3


def _note_compile(fn: Callable, key: _SameFunction) -> None:
    """Warns once per code object when ``step`` has compiled a third distinct function of the same code: a fitness
    that closes over a new array (or a ``partial`` with new arguments) each generation recompiles each time."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    code = getattr(inner, "__code__", type(inner))
    seen = _COMPILES.setdefault(code, [])
    if any(k == key for k in seen):
        return
    seen.append(key)
    del seen[:-_WARN_AFTER]
    if len(seen) >= _WARN_AFTER and code not in _WARNED:
        _WARNED.add(code)
        warnings.warn(
            f"esx.step compiled the whole generation again for a new fitness function "
            f"({getattr(inner, '__qualname__', inner)!r}, {_WARN_AFTER} different ones so far): a fitness made anew "
            "each call whose closure, defaults or partial arguments change (e.g. a new array) is a new program. "
            "Build the step once, `step = strategy.make_step(fitness_fn)`, and pass changing arrays as `data`.",
            stacklevel=3)


def step(strategy: Strategy, state: State, fitness_fn: FitnessFn, key: jax.Array, data: Any = None,
         *, data_per_group: bool = False) -> tuple[State, Metrics]:
    """One whole generation (evaluate + tell) under one ``jit``.

    Args:
      strategy: a :class:`Strategy` (static; hashed by identity).
      state: the current :class:`State`.
      fitness_fn: ``(view, key, data) -> float[]``, higher is better (wrap a loss with :func:`minimize`). Static:
        compiled once per distinct function; a lambda, nested function or ``functools.partial`` made again each
        call counts as the same function when its code, closure and arguments are the same objects (hashable
        values compare by ``==``). One that closes over a new array each call compiles each time -- pass the
        array as ``data``; ``step`` warns after the third such compile. :meth:`Strategy.make_step` builds a step
        bound to one fitness.
      key: the evaluation key of this generation (environment seeds, sampling); split it at the call site.
      data: anything the fitness function needs (shared, or one slice per group with ``data_per_group``).

    Returns:
      ``(new_state, metrics)``: ``fitness: float[N]`` is evaluated and told in one program.
    """
    same = fitness_fn if isinstance(fitness_fn, _SameFunction) else _SameFunction(fitness_fn)
    before = _step._cache_size()
    out = _step(strategy, state, same, key, data, data_per_group=data_per_group)
    if _step._cache_size() != before:
        _note_compile(same.fn, same)
    return out


step.lower = lambda strategy, state, fitness_fn, *args, **kwargs: _step.lower(   # noqa: E731
    strategy, state, _SameFunction(fitness_fn), *args, **kwargs)
step._cache_size = _step._cache_size


def minimize(loss_fn: Callable) -> Callable:
    """``loss_fn(view, key, data) -> float[]`` (lower is better) as an esx fitness (higher is better): its negation.

    esx maximises; evosax and most optimisers minimise. Write the direction where the fitness is made::

        state, metrics = esx.step(strategy, state, esx.minimize(mse), key, data)   # metrics report -mse

    With ``has_aux`` a ``(loss, aux)`` result becomes ``(-loss, aux)``. The wrapper of one ``loss_fn`` is built
    anew each call but compares equal, so :func:`step` does not recompile for it.
    """
    return functools.partial(_negated, loss_fn)


def _negated(loss_fn: Callable, *args, **kwargs):
    out = loss_fn(*args, **kwargs)
    if isinstance(out, tuple):
        return (-out[0],) + tuple(out[1:])
    return -out
