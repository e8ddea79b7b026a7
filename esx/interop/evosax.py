"""EGGROLL as an evosax strategy: swap ``Open_ES`` for :class:`EGGROLL` and keep evosax's loop as it is.

evosax (>= 0.3) runs every algorithm through one ask-eval-tell loop over *materialised* candidates, and it
**minimises**::

    from esx.interop.evosax import EGGROLL            # instead of: from evosax.algorithms import Open_ES

    es = EGGROLL(population_size=64, solution=solution, sigma=0.05, optimizer=optax.adam(1e-2), rank=4)
    params = es.default_params
    state = es.init(key, mean, params)                 # mean: a pytree shaped like `solution`
    for _ in range(num_generations):
        key, key_ask, key_eval, key_tell = jax.random.split(key, 4)
        population, state = es.ask(key_ask, state, params)        # `solution` pytree, leading axis N
        fitness = jax.vmap(loss)(population)                      # float[N], lower is better
        state, metrics = es.tell(key_tell, population, fitness, state, params)
    es.get_mean(state), state.best_solution, state.best_fitness

:class:`EGGROLL` subclasses evosax's ``DistributionBasedAlgorithm`` (so ``isinstance`` checks, ``get_mean``,
``num_dims``, ``default_params``, evosax's ``metrics_fn`` and its restart wrappers work) and delegates the ES itself
to :func:`esx.eggroll`: each member of a matrix leaf ``W: [m, n]`` is ``W + σ s_i A_i B_iᵀ / √r`` (rank ``r``),
other leaves get full-rank noise (``labels`` as in esx).

**The trade-off.** evosax hands the user a population of *parameters*, so :meth:`EGGROLL.ask` materialises every
member: ``N`` full copies of the parameters (``m×n`` per matrix per member), and the user's loss then runs a dense
forward per member. That is what Open_ES costs too; EGGROLL's speed comes from never forming the perturbed
matrix (``esx.dense(x, view)`` computes ``x W + c (x A) Bᵀ``), which only the native API does. For wide layers use
the native loop -- ``es.strategy`` (the :class:`esx.Strategy`) and ``state.esx_state`` (its :class:`esx.State`)
with ``esx.step`` / ``strategy.evaluate`` and ``esx.dense`` views; this adapter is for evosax code and problems
(``evosax.problems``) as they are.

**Solution shapes.** ``solution`` is evosax's template pytree: it fixes the structure, shapes and dtypes of the
mean and of every member. EGGROLL's low-rank noise applies to floating leaves with ``ndim >= 2``; a flat vector
solution (e.g. a BBOB problem's ``float[D]``) makes every leaf ``"full"``, i.e. plain Open_ES. Give such a problem a
matrix solution (``float[a, b]`` with ``a·b = D``) and reshape the population to ``[N, D]`` before evaluating it.

**Keys and determinism.** The noise of generation ``g`` is a function of the key given to :meth:`EGGROLL.init`
and ``g`` (esx regenerates it in ``tell`` instead of reading it back from the population). The key arguments of
``ask`` and ``tell`` are accepted for evosax's signature; ``ask`` ignores its key (the same state gives the same
population whatever the key) and ``tell`` passes its key to ``metrics_fn`` only. The same ``init`` key and the same
fitness give the same run.

**Minimisation.** ``tell`` gives esx ``-fitness`` (esx is higher-is-better). Non-finite fitness (NaN, ±inf) counts
as a failed evaluation and ranks last (esx's rule), a generation with no finite fitness is skipped.

**Hyperparameters.** σ, the learning rate (in ``optimizer``), rank and shaping are constructor arguments, as
evosax's ``Open_ES`` keeps them; ``default_params`` is an empty :class:`Params` (no field is read). Open_ES's
keywords are accepted as aliases: ``std_schedule`` (= ``sigma``; a float or a schedule ``generation -> σ``),
``use_antithetic_sampling`` (= ``antithetic``), ``fitness_shaping_fn`` (an evosax shaping
``(population: float[N, D], fitness: float[N], state, params) -> float[N]``, lower is better; replaces
``shaping``) and ``metrics_fn``. Defaults are Open_ES's (σ = 1, ``optax.sgd(1e-3)``) so that a swap keeps the
hyperparameters; neural networks usually want σ ≈ 0.05 and Adam. A schedule gives generation ``g`` the σ
``schedule(g)`` (esx's rule; evosax's Open_ES uses ``std_schedule(g - 1)`` from generation 1 on).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.algorithms.base import update_best_solution_and_fitness
from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm
from evosax.algorithms.distribution_based.base import Params as _EvosaxParams
from evosax.algorithms.distribution_based.base import State as _EvosaxState
from evosax.algorithms.distribution_based.base import metrics_fn as evosax_metrics_fn
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct

import esx

__all__ = ["EGGROLL", "Params", "State"]


@struct.dataclass
class State(_EvosaxState):
    """evosax's distribution state plus the esx state that drives it (a pytree).

    Attributes:
      mean: ``float[D]`` the ravelled mean (evosax's convention; ``es.get_mean(state)`` gives the pytree). A copy
        of ``esx_state.params``, rewritten by ``init`` and ``tell``: change the mean through ``esx_state``.
      best_solution: ``float[D]`` the ravelled member with the lowest fitness told so far (NaN before any).
      best_fitness: ``float32[]`` its fitness (``inf`` before any).
      generation_counter: ``int32[]`` completed generations.
      std: ``float32[]`` σ of the current generation (``esx_state.sigma``).
      esx_state: the :class:`esx.State` (parameters, optimizer state, σ, generation, noise key).
    """

    std: jax.Array
    esx_state: esx.State


@struct.dataclass
class Params(_EvosaxParams):
    """evosax's strategy parameters: empty (σ, learning rate and shaping are constructor arguments)."""


def _is_view(x: Any) -> bool:
    return isinstance(x, (esx.LowRank, esx.SplitLowRank, esx.Full))


def _materialise(view: Any) -> Any:
    """A member view as plain arrays: ``W + c A Bᵀ`` per low-rank leaf (``m×n`` each), ``w + c ε`` per full one."""
    return jax.tree_util.tree_map(esx.value, view, is_leaf=_is_view)


def _alias(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    if value is not None and alias_value is not None:
        raise ValueError(f"give {name}= or its evosax alias {alias}=, not both")
    if value is not None:
        return value
    return default if alias_value is None else alias_value


class EGGROLL(DistributionBasedAlgorithm):
    """EGGROLL (:func:`esx.eggroll`) behind evosax's ``init / ask / tell`` (see the module docstring).

    Args:
      population_size: ``N`` (even with antithetic sampling).
      solution: a template pytree of the parameters (evosax's ``solution``); ``D`` = its total size.
      rank: ``r >= 1``, the rank of each member's perturbation of a matrix leaf.
      sigma: σ > 0, or a schedule ``generation -> σ`` (default 1.0, Open_ES's). Alias: ``std_schedule``.
      optimizer: an ``optax.GradientTransformation`` (default ``optax.sgd(1e-3)``, Open_ES's); it steps the mean
        along the ES estimate of ``-∇ E[fitness]``.
      antithetic: members ``2k`` / ``2k+1`` are ``±`` the same noise (default True). Alias:
        ``use_antithetic_sampling``.
      shaping: an esx shaping (``"centered_rank"``, the default, ``"z_score"``, ``"pair_sign"``, ``"identity"``
        or ``float[N] -> float[N]``, higher is better), applied to ``-fitness``.
      noise_reuse, noise_source, labels: as :func:`esx.eggroll`.
      member_batch: materialise ``member_batch`` members at a time in ``ask`` (``lax.map``) and contract the update
        in chunks of that many (as :func:`esx.eggroll`); ``None``: all at once.
      std_schedule, use_antithetic_sampling: Open_ES's names for ``sigma`` and ``antithetic`` (give one of each
        pair).
      fitness_shaping_fn: an evosax shaping ``(population: float[N, D], fitness: float[N], state, params) ->
        float[N]`` (lower is better), used instead of ``shaping``: esx is told ``-fitness_shaping_fn(...)`` without
        further shaping.
      metrics_fn: evosax's ``(key, population: float[N, D], fitness: float[N], state, params) -> metrics``
        (default: evosax's distribution-based ``metrics_fn``).

    Attributes:
      strategy: the :class:`esx.Strategy` doing the work (the native, faster API; see the module docstring).
    """

    def __init__(
        self,
        population_size: int,
        solution: Any,
        *,
        rank: int = 1,
        sigma: float | Callable[[jax.Array], jax.Array] | None = None,
        optimizer: optax.GradientTransformation | None = None,
        antithetic: bool | None = None,
        shaping: str | Callable[[jax.Array], jax.Array] | None = None,
        noise_reuse: int = 1,
        noise_source: str = "normal",
        labels: Any = None,
        member_batch: int | None = None,
        std_schedule: float | Callable[[jax.Array], jax.Array] | None = None,
        use_antithetic_sampling: bool | None = None,
        fitness_shaping_fn: Callable | None = None,
        metrics_fn: Callable = evosax_metrics_fn,
    ):
        super().__init__(population_size, solution, identity_fitness_shaping_fn, metrics_fn)
        sigma = _alias("sigma", sigma, "std_schedule", std_schedule, 1.0)
        antithetic = _alias("antithetic", antithetic, "use_antithetic_sampling", use_antithetic_sampling, True)
        if shaping is not None and fitness_shaping_fn is not None:
            raise ValueError("give shaping= (esx, higher is better) or fitness_shaping_fn= (evosax), not both")
        self.evosax_shaping_fn = fitness_shaping_fn
        self.member_batch = member_batch
        self.strategy = esx.eggroll(
            population_size=population_size, sigma=sigma,
            optimizer=optax.sgd(1e-3) if optimizer is None else optimizer, rank=rank, antithetic=bool(antithetic),
            shaping="identity" if fitness_shaping_fn is not None else (shaping or "centered_rank"),
            noise_reuse=noise_reuse, noise_source=noise_source, labels=labels, member_batch=member_batch,
        )

    @property
    def _default_params(self) -> Params:
        return Params()

    def _params_of(self, mean: Any) -> Any:
        """``mean`` (a ``solution``-shaped pytree, or anything that ravels to ``float[D]``) as a ``solution``
        pytree, as evosax reads it."""
        flat = self._ravel_solution(mean)
        if flat.shape != (self.num_dims,):
            raise ValueError(
                f"init: mean has {flat.size} entries; the solution has num_dims={self.num_dims} "
                "(give a pytree shaped like `solution`, or its ravelled float[num_dims])")
        return self._unravel_solution(flat)

    @functools.partial(jax.jit, static_argnames=("self",))
    def init(self, key: jax.Array, mean: Any, params: Params) -> State:
        """The first state: ``mean`` is the initial parameters (shaped like ``solution``, or ``float[D]``).

        ``key`` (a typed ``jax.random.key``) seeds every generation's noise. ``params`` is not read.
        """
        del params
        with jax.ensure_compile_time_eval():   # esx's init checks a σ schedule's first value in Python
            esx_state = self.strategy.init(key, self._params_of(mean))
        return State(
            mean=self._ravel_solution(esx_state.params),
            best_solution=jnp.full((self.num_dims,), jnp.nan, self.solution_flat.dtype),
            best_fitness=jnp.asarray(jnp.inf, jnp.float32),
            generation_counter=jnp.zeros((), jnp.int32),
            std=esx_state.sigma,
            esx_state=esx_state,
        )

    @functools.partial(jax.jit, static_argnames=("self",))
    def ask(self, key: jax.Array, state: State, params: Params) -> tuple[Any, State]:
        """``(population, state)``: the materialised members, a ``solution`` pytree with a leading axis ``N``.

        Member ``i`` equals ``esx.value`` of ``es.strategy.view(state.esx_state, es.strategy.ask(...), i)`` leaf by
        leaf. ``key`` and ``params`` are not read (the noise comes from the esx state); ``state`` is returned
        unchanged.
        """
        del key, params
        esx_state = state.esx_state
        noise = self.strategy.ask(esx_state)

        def member(i):
            return _materialise(self.strategy.view(esx_state, noise, i))

        members = jnp.arange(self.population_size, dtype=jnp.int32)
        if self.member_batch is None:
            population = jax.vmap(member)(members)
        else:
            population = jax.lax.map(member, members, batch_size=self.member_batch)
        return population, state

    @functools.partial(jax.jit, static_argnames=("self",))
    def tell(self, key: jax.Array, population: Any, fitness: jax.Array, state: State,
             params: Params) -> tuple[State, dict]:
        """``(state, metrics)`` after one generation: ``fitness: float[N]`` (lower is better) of ``ask``'s members.

        The update is esx's ``tell(state.esx_state, -fitness)``: the noise is regenerated from the esx state, so
        ``population`` (leading axis ``N``) only feeds the best-solution archive and ``metrics_fn``; it must be the
        population ``ask`` returned for ``state``. ``metrics`` is ``metrics_fn``'s (evosax's keys:
        ``best_fitness``, ``best_fitness_in_generation``, ``mean``, ... computed before the update, as evosax does)
        plus ``"esx"``: the :class:`esx.Metrics` of the update (of the negated fitness esx was told).

        Raises:
          ValueError: ``fitness`` is not ``float[N]``, or a ``population`` leaf has no leading axis ``N``.
        """
        n = self.population_size
        fitness = jnp.asarray(fitness)
        if fitness.shape != (n,):
            raise ValueError(
                f"tell: fitness must have shape ({n},) (one value per member, population_size={n}), "
                f"got {fitness.shape}")
        for path, leaf in jax.tree_util.tree_flatten_with_path(population)[0]:
            if np.shape(leaf)[:1] != (n,):
                raise ValueError(
                    f"tell: population leaf {jax.tree_util.keystr(path) or '(root)'} has shape {np.shape(leaf)}; "
                    f"expected a leading axis of population_size={n} (give tell the population ask returned)")
        flat_population = jax.vmap(self._ravel_solution)(population)
        best_solution, best_fitness = update_best_solution_and_fitness(
            flat_population, fitness, state.best_solution, state.best_fitness)
        state = state.replace(best_solution=best_solution, best_fitness=best_fitness)
        metrics = self.metrics_fn(key, flat_population, fitness, state, params)

        if self.evosax_shaping_fn is not None:
            told = -self.evosax_shaping_fn(flat_population, fitness, state, params)
        else:
            told = -fitness
        esx_state, esx_metrics = self.strategy.tell(state.esx_state, told)
        state = state.replace(
            mean=self._ravel_solution(esx_state.params),
            std=esx_state.sigma,
            generation_counter=state.generation_counter + 1,
            esx_state=esx_state,
        )
        if isinstance(metrics, dict):
            metrics = {**metrics, "esx": esx_metrics}
        return state, metrics

    def get_mean(self, state: State) -> Any:
        """The current mean as a ``solution`` pytree (``state.esx_state.params``)."""
        return state.esx_state.params
