"""What a task hands the runner (:class:`Setup`), the run state (:class:`RunState`), chunk helpers and the task
registry.

A *task* is anything that turns a config into a :class:`Setup`: the strategy, a function that runs a chunk of
generations, the initial state, an evaluation of the unperturbed parameters, and the names of the numbers to log.
The runner (:func:`esx.run.train`) does everything else: progress, logs, plots, checkpoints, exact resume, time
and target stops, the final evaluation.

* Your own fitness: :func:`fitness_task` builds a :class:`Setup` from a strategy, parameters and a fitness
  function (the quickstart's ``(view, key, data) -> float[]``).
* A job kind of ``esx train``: a :class:`esx.run.RunConfig` subclass with a ``KIND`` and a ``setup()`` method,
  registered under the entry-point group ``esx.tasks`` (``kind = "package.module:ConfigClass"``) of any installed
  distribution. The runner finds kinds through :func:`task_classes` and never names a task itself.

Keys: every random draw of a run derives from ``jax.random.key(config.seed)`` through the named streams of
:func:`esx.noise.stream_key` (``params``, ``noise``, ``data`` per generation, ``eval`` per generation).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import esx
from esx import distributed as dist
from esx.noise import stream_key
from esx.run.config import ConfigError, RunConfig

#: the entry-point group through which installed packages register task config classes.
ENTRY_POINT_GROUP = "esx.tasks"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunState:
    """Everything needed to continue a run exactly (one pytree; what a checkpoint holds).

    Attributes:
      es: the :class:`esx.State` (params, optimizer state, σ, generation, noise key).
      carry: the task's state carried across generations (RL: observation statistics; EGG: ``int8[N, B, L, D]``
        hidden states; ``None`` when there is none).
      key: the run key ``jax.random.key(seed)`` (constant; per-generation keys are streams of it).
    """

    es: esx.State
    carry: Any
    key: jax.Array

    @property
    def generation(self) -> int:
        """The number of completed generations (a Python int)."""
        return int(self.es.generation)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The pieces of a run; what a task provides to :func:`esx.run.train`.

    Attributes:
      config: the run's config (a :class:`~esx.run.RunConfig`: the runner reads its run-control fields).
      strategy: the esx strategy.
      run_chunk: ``(RunState, length) -> (RunState, metrics)``: runs ``length`` (<= ``chunk``) generations;
        ``metrics`` is an :class:`esx.Metrics`-like NamedTuple (``fitness_mean/std/max/min``, ``grad_norm``,
        ``sigma``, ``generation`` -- the generation before the update), each field stacked over ``length``.
      initial_state: ``() -> RunState`` the generation-0 state (a pure function of the config).
      evaluate: ``(RunState, final: bool) -> (dict, values or None)``: the evaluation of the unperturbed
        parameters (``final``: the larger end-of-run one); the dict holds ``score`` and other numbers, ``values``
        per-episode numbers (RL returns) or ``None``.
      score: the key of the headline number in ``evaluate``'s dict.
      higher_is_better: the direction of ``score`` (for the target and the progress bar).
      eval_at_start: also evaluate at generation 0 (the "before" number).
      target: stop once ``score`` reaches this (``None``: never).
      fitness_name: per-generation records have ``<fitness_name>_mean/_max/_min/_std``.
      train_extra: ``(metrics, i) -> dict`` extra per-generation fields.
      plot_keys: per-generation fields drawn in the learning curve.
      ylabel, references: the plot's y label and horizontal reference lines ``((label, value), ...)``.
      summary_extra: fields added to ``summary.json``.
      parts: task-specific pieces for the task's own tools (RL: adapter, policy, fitness, evaluators).
      memory: the :class:`MemoryPlan` of the task's ``member_batch`` (:func:`choose_member_batch`), or ``None``;
        the runner prints its estimate at the start (``member_batch="auto"``) and writes it to ``summary.json``.
      cumulative: ``{name: per-generation field}``: the runner adds ``name``, the running sum of that field of the
        train records since generation 0 (carried across resumes through ``metrics.jsonl``), to every train,
        eval and final record (the LLM task: ``{"token_passes": "gen_token_passes"}``).
    """

    config: Any
    strategy: Any
    run_chunk: Callable
    initial_state: Callable[[], RunState]
    evaluate: Callable
    score: str
    higher_is_better: bool = True
    eval_at_start: bool = True
    target: float | None = None
    fitness_name: str = "fitness"
    train_extra: Callable | None = None
    plot_keys: tuple = ("fitness_mean", "fitness_max")
    ylabel: str = "fitness"
    references: tuple = ()
    summary_extra: dict = dataclasses.field(default_factory=dict)
    parts: Any = None
    memory: Any = None
    cumulative: dict = dataclasses.field(default_factory=dict)

    @property
    def member_batch(self) -> int | None:
        """The strategy's ``member_batch`` (``None``: every member at once)."""
        return getattr(getattr(self.strategy, "config", None), "member_batch", None)

    def better(self, a: float, b: float) -> bool:
        """``a`` is at least as good as ``b``."""
        return a >= b if self.higher_is_better else a <= b


def eval_key(state: RunState) -> jax.Array:
    """The key of the evaluation at ``state``'s generation (stream ``eval``)."""
    return stream_key(state.key, "eval", state.es.generation)


def data_key(state: RunState) -> jax.Array:
    """The key of the fitness evaluation of ``state``'s generation (stream ``data``)."""
    return stream_key(state.key, "data", state.es.generation)


def chunk_capacity(config: RunConfig) -> int:
    """Generations per chunk: ``chunk`` reduced so that evaluations and checkpoints fall on chunk ends."""
    length = config.chunk
    for every in (config.eval_every, config.checkpoint_every):
        if every:
            length = math.gcd(length, every)
    return length


def host_chunk(generation: Callable) -> Callable:
    """A ``run_chunk`` for tasks whose generation runs on the host: ``generation(state) -> (state, metrics)`` is
    called ``length`` times and the metrics are stacked (numpy) over the generations."""
    def run_chunk(state: RunState, length: int):
        if length < 1:
            raise ValueError(f"run_chunk: length={length}; must be >= 1")
        ms = []
        for _ in range(length):
            state, m = generation(state)
            ms.append(jax.device_get(m))
        return state, jax.tree_util.tree_map(lambda *x: np.stack(x), *ms)
    return run_chunk


def device_chunk(generation: Callable, capacity: int, *, mesh=None) -> Callable:
    """A ``run_chunk`` that runs ``generation(state) -> (state, metrics)`` (pure, traceable) ``length <= capacity``
    times inside one jitted ``lax.fori_loop``.

    The trip count is traced, so one compiled body serves every chunk length and where chunks start and end never
    changes the numbers. With a ``mesh`` the state is replicated over it and the loop runs under
    :func:`esx.distributed.replicated_map` (``generation`` may then use a sharded strategy's collectives).
    """
    def body(state, length):
        shapes = jax.eval_shape(generation, state)[1]
        buf = jax.tree_util.tree_map(lambda x: jnp.zeros((capacity, *x.shape), x.dtype), shapes)

        def step(i, carry):
            s, b = carry
            s, m = generation(s)
            return s, jax.tree_util.tree_map(lambda bb, x: bb.at[i].set(x), b, m)

        return lax.fori_loop(0, length, step, (state, buf))

    compiled = jax.jit(body if mesh is None else dist.replicated_map(body, mesh=mesh))

    def run_chunk(state: RunState, length: int):
        if not 1 <= length <= capacity:
            raise ValueError(f"run_chunk: length={length}; must be in [1, {capacity}]")
        if mesh is not None:
            state = dist.replicate(state, mesh)
        new_state, metrics = compiled(state, jnp.asarray(length, jnp.int32))
        return new_state, jax.tree_util.tree_map(lambda x: x[:length], metrics)

    return run_chunk


class MemoryPlan(NamedTuple):
    """How a task chose its ``member_batch`` (:func:`choose_member_batch`; ``Setup.memory``).

    Attributes:
      member_batch: the batch passed to the strategy (``None``: every member at once).
      estimate: the :class:`esx.MemoryEstimate` behind ``member_batch="auto"`` (``None`` otherwise).
      budget_bytes: the budget the choice was made for (``None`` without ``"auto"``).
    """

    member_batch: int | None
    estimate: Any = None
    budget_bytes: int | None = None

    def describe(self) -> str:
        """The line the runner prints at the start (``""`` without an estimate)."""
        if self.estimate is None:
            return ""
        return "member_batch=auto: " + self.estimate.describe(self.member_batch, self.budget_bytes)

    def summary(self) -> dict:
        """``summary.json``'s ``"memory"``."""
        if self.estimate is None:
            return {"member_batch": self.member_batch, "budget_bytes": self.budget_bytes}
        return self.estimate.summary(self.member_batch, self.budget_bytes)


def choose_member_batch(config: RunConfig, strategy, state: Any, fitness_fn: Callable, key: jax.Array,
                        data: Any = None, *, choices: Any = None, **evaluate_options) -> MemoryPlan:
    """``config.member_batch`` resolved for ``strategy``, as a :class:`MemoryPlan`.

    ``None`` or an integer are kept as they are (nothing is compiled). ``"auto"`` compiles the generation's
    programs for a few batch sizes (:func:`esx.memory_estimate`; ``state`` and ``data`` may be
    ``jax.ShapeDtypeStruct`` pytrees, ``evaluate_options`` are ``strategy.evaluate``'s ``data_per_group``,
    ``data_per_member``, ``has_aux``) and picks the largest valid batch (among ``choices`` when given) whose
    predicted peak fits ``config.memory_budget_bytes`` -- ``None`` when the unbatched generation fits.

    Raises:
      ConfigError: even the smallest batch does not fit the budget.
    """
    mb = getattr(config, "member_batch", None)
    if mb != "auto":
        return MemoryPlan(mb)
    budget = config.memory_budget_bytes
    estimate = esx.memory_estimate(strategy, state, fitness_fn, key, data, **evaluate_options)
    try:
        return MemoryPlan(estimate.batch_for(budget, choices=choices), estimate, budget)
    except ValueError as e:
        raise ConfigError(f"member_batch='auto': {e}") from None


def fitness_task(config: RunConfig, strategy, params: Any, fitness_fn: Callable, data: Any = None, *,
                 evaluate: Callable | None = None, score: str = "fitness", higher_is_better: bool = True,
                 target: float | None = None) -> Setup:
    """A :class:`Setup` for your own fitness function: ``esx.step`` generations in jitted chunks.

    Args:
      config: the run control (a :class:`~esx.run.RunConfig`; ``seed`` gives the noise and data keys). Its
        ``member_batch`` (an integer, or ``"auto"``: :func:`choose_member_batch`) rebuilds ``strategy`` with
        that batch (:func:`esx.with_member_batch`); ``None`` keeps the strategy's own.
      strategy: an esx strategy (``esx.eggroll(...)``, ``esx.open_es(...)``).
      params: the initial parameters (any pytree of float arrays).
      fitness_fn: ``(view, key, data) -> float[]``, higher is better (as for :func:`esx.step`); ``key`` derives
        from stream ``data`` of generation ``g``.
      data: the fitness function's data (shared by every member).
      evaluate: ``(params, key) -> float[] or dict`` the evaluation of the unperturbed parameters (a dict must hold
        ``score``); default: ``fitness_fn(params, key, data)`` (the esx ops accept plain arrays).
      score, higher_is_better, target: the headline number of ``evaluate``, its direction, and a stop target.

    Returns:
      a :class:`Setup` for :func:`esx.run.train`.
    """
    plan = None
    if getattr(config, "member_batch", None) is not None:
        shapes = jax.eval_shape(strategy.init, stream_key(jax.random.key(config.seed), "noise"), params)
        plan = choose_member_batch(config, strategy, shapes, fitness_fn, jax.random.key(config.seed), data)
        strategy = esx.with_member_batch(strategy, plan.member_batch)

    def generation(state: RunState):
        es_state, metrics = esx.step(strategy, state.es, fitness_fn, data_key(state), data)
        return RunState(es_state, state.carry, state.key), metrics

    def initial_state() -> RunState:
        run_key = jax.random.key(config.seed)
        return RunState(strategy.init(stream_key(run_key, "noise"), params), None, run_key)

    @jax.jit
    def _evaluate(p, key):
        out = evaluate(p, key) if evaluate is not None else fitness_fn(p, key, data)
        return out if isinstance(out, dict) else {score: out}

    def evaluate_state(state: RunState, final: bool):
        out = jax.device_get(_evaluate(state.es.params, eval_key(state)))
        if score not in out:
            raise KeyError(f"evaluate returned {sorted(out)}; it must hold the score {score!r}")
        return {k: float(np.asarray(v)) for k, v in out.items()}, None

    return Setup(config, strategy, device_chunk(generation, chunk_capacity(config)), initial_state,
                 evaluate_state, score=score, higher_is_better=higher_is_better, target=target, memory=plan)


# ----------------------------------------------------------------------------------------------------------------
# The task registry (entry points)
# ----------------------------------------------------------------------------------------------------------------
def task_classes() -> dict[str, metadata.EntryPoint]:
    """``{kind: entry point}`` of every task registered under the entry-point group ``esx.tasks`` by an installed
    distribution (read on each call, so a package installed while the process runs is found; nothing is imported:
    :func:`task_class` loads one kind's class)."""
    out: dict[str, type] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in out:
            continue
        out[ep.name] = ep
    return out


@functools.lru_cache(maxsize=None)
def _load(kind: str, value: str) -> type:
    ep = metadata.EntryPoint(name=kind, value=value, group=ENTRY_POINT_GROUP)
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, RunConfig)):
        raise ConfigError(f"entry point {kind} = {value!r} of group {ENTRY_POINT_GROUP!r} is not a RunConfig subclass")
    if cls.KIND != kind:
        raise ConfigError(f"entry point {kind!r} names {cls.__name__}, whose KIND is {cls.KIND!r}")
    return cls


def task_class(kind: str) -> type:
    """The config class registered for ``kind``; :class:`ConfigError` naming the registered kinds otherwise."""
    found = task_classes()
    if kind not in found:
        close = difflib.get_close_matches(kind, list(found), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"no task of kind {kind!r}{hint} is installed; registered kinds are {sorted(found)} "
                          f"(entry-point group {ENTRY_POINT_GROUP!r})")
    return _load(kind, found[kind].value)


def config_from_dict(d: dict, *, default_kind: str | None = None) -> RunConfig:
    """The config saved by ``to_dict`` (``config.json``, checkpoints), built by its kind's registered class.

    Args:
      d: the saved dict.
      default_kind: the kind of a dict without ``"kind"`` (files written before kinds existed); ``None``: such a
        dict is an error.
    """
    kind = d.get("kind", default_kind)
    if kind is None:
        raise ConfigError(f"saved config has no 'kind' field; registered kinds are {sorted(task_classes())}")
    return task_class(kind).from_dict(d)


def make_setup(config) -> Setup:
    """``config.setup()``: the :class:`Setup` of a registered task's config."""
    if not hasattr(config, "setup"):
        raise TypeError(f"{type(config).__name__} has no setup(); pass esx.run.train a Setup "
                        "(e.g. esx.run.fitness_task(...)) or a task config")
    return config.setup()


__all__ = ["ENTRY_POINT_GROUP", "MemoryPlan", "RunState", "Setup", "choose_member_batch", "chunk_capacity",
           "config_from_dict", "data_key", "device_chunk", "eval_key", "fitness_task", "host_chunk", "make_setup",
           "task_class", "task_classes"]
