"""The training driver shared by the CLI, the notebooks and library users.

``train(config, run_dir=...)`` runs any config of :mod:`esx.configs` end to end -- an RL policy
(:class:`~esx.configs.TrainConfig`), the integer EGG language model (:class:`~esx.configs.EggTrainConfig`) or an
LLM on a verifiable task (:class:`~esx.configs.LLMTrainConfig`):

* ``chunk`` generations per call of the setup's ``run_chunk`` (for RL one jitted ``lax.fori_loop``, one compile;
  EGG and LLM loop over a jitted generation on the host because their data / verifiers live there); logging,
  evaluation and checkpoints happen between chunks. Every random draw of generation ``g`` is a function of the run
  seed and ``g`` only, so the chunk size, interruptions and resumes never change the trajectory;
* an evaluation of the unperturbed parameters every ``eval_every`` generations (RL: greedy return; EGG: validation
  bits/byte; LLM: greedy validation accuracy), a tqdm progress bar (generation, best / mean fitness, the latest
  evaluation, generations per second, ETA), metrics appended to ``metrics.jsonl`` and ``metrics.csv`` (and, with
  ``tensorboard=True``, TensorBoard event files), the learning curve ``learning_curve.png``;
* full-state checkpoints (orbax) every ``checkpoint_every`` generations, at the end, on Ctrl-C and when the
  ``minutes`` budget runs out: the esx :class:`~esx.State` (params, optimizer state, σ, generation, noise key), the
  task's carried state (RL observation statistics, EGG hidden states), the run key and the config. Each is written
  to a temporary folder and renamed into place; the previous one is kept.
* ``train(config, run_dir, resume=True)`` continues from the newest checkpoint and ends bit-identical to an
  uninterrupted run.

A task plugs in by returning a :class:`Setup` from a builder registered in :data:`BUILDERS` (keyed by the config
class's ``KIND``). orbax, tqdm, matplotlib and the plug-ins are imported inside the functions that use them
(``import esx`` stays light).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import esx
from esx import configs as configs_lib
from esx.configs import RUN_CONTROL_FIELDS, ConfigError, TrainConfig, validate


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, from another run or another config)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DriverState:
    """Everything needed to continue a run exactly.

    Attributes:
      es: the :class:`esx.State` (params, optimizer state, σ, generation, noise key).
      carry: the task's state carried across generations: RL :class:`esx_envs.rl.ObsStats` running observation
        statistics, EGG ``int8[N, B, L, D]`` hidden states, ``None`` for the LLM task.
      key: the run key (constant; per-generation keys are folded from it and the generation index).
    """

    es: esx.State
    carry: Any
    key: jax.Array

    @property
    def generation(self) -> int:
        return int(self.es.generation)

    @property
    def obs_stats(self):
        """The RL name of :attr:`carry`."""
        return self.carry


@dataclasses.dataclass(frozen=True)
class Setup:
    """The pieces of a run built from its config (see :func:`make_setup`); what a task plug-in provides.

    Attributes:
      config: the run's config.
      strategy: the esx strategy.
      run_chunk: ``(DriverState, length) -> (DriverState, metrics)``: runs ``length`` (<= the chunk) generations;
        ``metrics`` is an :class:`esx.Metrics`-like NamedTuple (``fitness_mean/std/max/min``, ``grad_norm``,
        ``sigma``, ``generation`` -- the generation before the update) stacked over ``length``.
      initial_state: ``() -> DriverState`` the generation-0 state (a pure function of the config).
      evaluate: ``(DriverState, final: bool) -> (dict, values or None)``: the evaluation of the unperturbed
        parameters (``final``: the larger end-of-run one); the dict holds ``score`` and other numbers, ``values``
        the per-episode returns (RL) or ``None``.
      score: the key of the headline number in ``evaluate``'s dict (``"eval_return_mean"``, ``"valid_bpb"``,
        ``"val_accuracy"``).
      higher_is_better: the direction of ``score`` (for the target and the progress bar).
      eval_at_start: also evaluate at generation 0 (the "before" number; RL skips it: a random policy's return is
        uninformative and costs episodes).
      target: stop once ``score`` reaches this (``None``: never).
      fitness_name: per-generation records have ``<fitness_name>_mean/_max/_min/_std``.
      train_extra: ``(metrics, i) -> dict`` extra per-generation fields (e.g. EGG training bits/byte).
      plot_keys: per-generation fields drawn in the learning curve.
      ylabel, references: the plot's y label and horizontal reference lines ``{label: value}``.
      adapter, policy, fitness, evaluator, final_evaluator: the RL pieces (``None`` for other tasks).
    """

    config: Any
    strategy: esx.Strategy
    run_chunk: Callable
    initial_state: Callable[[], DriverState]
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
    adapter: Any = None
    policy: Any = None
    fitness: Callable | None = None
    evaluator: Callable | None = None
    final_evaluator: Callable | None = None

    def better(self, a: float, b: float) -> bool:
        """``a`` is at least as good as ``b``."""
        return a >= b if self.higher_is_better else a <= b


#: Setup builders by config kind: ``"module:function"`` taking the validated config.
BUILDERS: dict[str, str] = {
    "rl": "esx.driver:_rl_setup",
    "egg": "esx_envs.egg:driver_setup",
    "llm": "esx_envs.llm.driver:driver_setup",
}


def make_setup(config) -> Setup:
    """Builds the strategy, the task and the chunk function of ``config`` (any :mod:`esx.configs` class).

    The expensive part is memoised on the config without its run-control fields
    (:data:`~esx.configs.RUN_CONTROL_FIELDS`), so repeated or resumed runs of one config in a process compile once.
    """
    config = validate(config)
    module, func = BUILDERS[config.KIND].split(":")
    return getattr(importlib.import_module(module), func)(config)


def core_config(config):
    """``config`` with its run-control fields at their class defaults and no name (the memoisation key)."""
    defaults = type(config)()
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, name="", **{f: getattr(defaults, f) for f in RUN_CONTROL_FIELDS & names})


def chunk_capacity(config) -> int:
    """Generations per chunk: ``chunk`` reduced so that evaluations and checkpoints fall on chunk ends."""
    length = config.chunk
    for every in (config.eval_every, config.checkpoint_every):
        if every:
            length = math.gcd(length, every)
    return length


def host_chunk(generation: Callable) -> Callable:
    """A ``run_chunk`` for tasks whose generation runs on the host: ``generation(state) -> (state, metrics)`` is
    called ``length`` times and the metrics are stacked (numpy) over the generations."""
    def run_chunk(state: DriverState, length: int):
        if length < 1:
            raise ValueError(f"run_chunk: length={length}; must be >= 1")
        ms = []
        for _ in range(length):
            state, m = generation(state)
            ms.append(jax.device_get(m))
        return state, jax.tree_util.tree_map(lambda *x: np.stack(x), *ms)
    return run_chunk


def _rl_setup(config: TrainConfig) -> Setup:
    core = core_config(config)
    adapter, policy, strategy, fitness, run_chunk = _build(core, _num_devices(config), config.placement)
    evaluator = _evaluator(core, config.eval_episodes)
    final_evaluator = _evaluator(core, config.final_eval_episodes)

    def initial_state() -> DriverState:
        from esx_envs import rl

        run_key = jax.random.key(config.seed)
        params = policy.init(jax.random.fold_in(run_key, 3))
        es_state = strategy.init(jax.random.fold_in(run_key, 1), params)
        return DriverState(es_state, rl.ObsStats.create(adapter.observation_shape), run_key)

    def evaluate(state: DriverState, final: bool):
        if final:
            r = np.asarray(final_evaluator(state.es.params, jax.random.fold_in(eval_key(state), 1), state.carry))
        else:
            r = np.asarray(evaluator(state.es.params, eval_key(state), state.carry))
        return {"eval_return_mean": float(r.mean()), "eval_return_std": float(r.std()),
                "eval_return_min": float(r.min())}, r

    return Setup(config, strategy, functools.partial(run_chunk, capacity=chunk_capacity(config)), initial_state,
                 evaluate, score="eval_return_mean", higher_is_better=True, eval_at_start=False,
                 target=config.target_return,
                 fitness_name="return", plot_keys=("return_mean", "return_max"), ylabel="episode return",
                 adapter=adapter, policy=policy, fitness=fitness, evaluator=evaluator,
                 final_evaluator=final_evaluator)


@functools.lru_cache(maxsize=8)
def _evaluator(core: TrainConfig, episodes: int) -> Callable:
    from esx_envs import rl

    adapter, policy, *_ = _build(core)
    return rl.make_evaluator(adapter, policy, episodes=episodes, obs_norm=core.obs_norm)


def _num_devices(config: TrainConfig) -> int:
    available = jax.device_count()
    n = available if config.devices == 0 else config.devices
    if n > available:
        raise ConfigError(f"devices={config.devices}; only {available} device(s) are available")
    pairs = config.population_size // 2
    if pairs % n:
        raise ConfigError(
            f"population_size={config.population_size} has {pairs} antithetic pairs, which is not divisible by "
            f"{n} devices; use a population_size that is a multiple of {2 * n} or another device count"
        )
    return n


@functools.lru_cache(maxsize=8)
def _build(config: TrainConfig, num_devices: int = 1, placement: str = "gather"):
    from esx_envs import rl

    adapter = rl.make_adapter(config.env, max_steps=config.max_steps or None)
    policy = rl.Policy.for_adapter(adapter, width=config.width, depth=config.depth,
                                   layer_norm=config.layer_norm, action_std=config.action_std,
                                   form=config.policy_form)
    optimizer = optax.sgd(config.learning_rate) if config.optimizer == "sgd" else optax.adam(config.learning_rate)
    common = dict(population_size=config.population_size, sigma=config.sigma, optimizer=optimizer,
                  shaping=config.shaping, group_size=2 if config.share_env_seed else 1)
    if config.strategy == "eggroll":
        strategy = esx.eggroll(rank=config.rank, **common)
    else:
        strategy = esx.open_es(**common)
    fitness = rl.make_fitness(adapter, policy, episodes=config.episodes, mode=config.action_mode,
                              obs_norm=config.obs_norm)
    mesh = None
    step_strategy = strategy
    if num_devices > 1:
        from esx import distributed as dist

        mesh = dist.make_mesh(jax.devices()[:num_devices])
        # Collective evaluate/tell: members sharded over the mesh, fitnesses (and aux) gathered.
        step_strategy = dist.shard_strategy(strategy, placement=placement)

    def generation(state: DriverState, _):
        key = jax.random.fold_in(jax.random.fold_in(state.key, 0), state.es.generation)
        returns, moments = step_strategy.evaluate(state.es, fitness, key, state.carry, has_aux=True)
        es_state, metrics = step_strategy.tell(state.es, returns)
        stats = rl.update_obs_stats(state.carry, moments) if config.obs_norm else state.carry
        return DriverState(es_state, stats, state.key), metrics

    def _chunk_body(state, length, capacity):
        # A while loop with a traced trip count: one compiled body serves every chunk length <= capacity, so
        # where chunks start and end can never change the numbers (nor cost a recompile).
        shapes = jax.eval_shape(generation, state, None)[1]
        buf = jax.tree_util.tree_map(lambda x: jnp.zeros((capacity, *x.shape), x.dtype), shapes)

        def body(i, carry):
            s, b = carry
            s, m = generation(s, None)
            return s, jax.tree_util.tree_map(lambda bb, x: bb.at[i].set(x), b, m)

        return lax.fori_loop(0, length, body, (state, buf))

    @functools.partial(jax.jit, static_argnames="capacity")
    def _chunk(state, length, capacity):
        if mesh is None:
            return _chunk_body(state, length, capacity)
        return dist.replicated_map(lambda s, n: _chunk_body(s, n, capacity), mesh=mesh)(state, length)

    def run_chunk(state: DriverState, length: int, *, capacity: int):
        """Runs ``length <= capacity`` generations; returns the new state and the metrics of each."""
        if not 1 <= length <= capacity:
            raise ValueError(f"run_chunk: length={length}; must be in [1, {capacity}]")
        if mesh is not None:
            state = dist.replicate(state, mesh)
        new_state, metrics = _chunk(state, jnp.asarray(length, jnp.int32), capacity=int(capacity))
        return new_state, jax.tree_util.tree_map(lambda x: x[:length], metrics)

    return adapter, policy, strategy, fitness, run_chunk


def init_state(setup: Setup) -> DriverState:
    """The generation-0 state of ``setup.config`` (a pure function of the config)."""
    return setup.initial_state()


def eval_key(state: DriverState) -> jax.Array:
    """The key of the evaluation at ``state``'s generation."""
    return jax.random.fold_in(jax.random.fold_in(state.key, 2), state.es.generation)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
_CKPT_DIR = "checkpoints"
_PREFIX = "gen_"
_KEEP = 2


def _to_host(state: DriverState) -> list[np.ndarray]:
    leaves = jax.tree_util.tree_leaves(state)
    out = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _from_host(template: DriverState, arrays: list[np.ndarray]) -> DriverState:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves):
        raise CheckpointError(f"checkpoint has {len(arrays)} arrays, this config's state has {len(leaves)}")
    out = []
    for i, (t, a) in enumerate(zip(leaves, arrays)):
        is_key = jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
        want = jax.random.key_data(t) if is_key else t
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(f"checkpoint array {i} has shape {a.shape} {a.dtype}, expected "
                                  f"{want.shape} {want.dtype}")
        arr = jnp.asarray(a)
        out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(t)) if is_key else arr)
    return jax.tree_util.tree_unflatten(treedef, out)


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (a folder counts once its ``meta.json`` exists)."""
    root = Path(run_dir) / _CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def save_checkpoint(run_dir: str | os.PathLike, state: DriverState, config, run_id: str) -> Path:
    """Writes ``state`` to ``run_dir/checkpoints/gen_<generation>`` atomically; keeps the previous one.

    The arrays go through orbax into a temporary folder together with ``meta.json`` (config, generation, run id,
    a sha256 of the arrays); the folder is then renamed into place and checkpoints older than the last
    ``2`` are removed. If anything fails, the temporary folder is removed and the existing checkpoints are untouched.
    """
    import orbax.checkpoint as ocp

    root = Path(run_dir).absolute() / _CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    gen = state.generation
    final = root / f"{_PREFIX}{gen:08d}"
    tmp = root / f".tmp-{_PREFIX}{gen:08d}-{uuid.uuid4().hex[:8]}"
    arrays = _to_host(state)
    try:
        ocp.PyTreeCheckpointer().save(tmp / "state", {f"a{i:04d}": a for i, a in enumerate(arrays)})
        meta = {"generation": gen, "run_id": run_id, "config": configs_lib.to_dict(config),
                "num_arrays": len(arrays), "sha256": _digest(arrays), "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, template: DriverState) -> tuple[DriverState, dict]:
    """Reads one checkpoint folder into a state shaped like ``template``; verifies the arrays' sha256.

    Raises:
      CheckpointError: missing, truncated or corrupt data.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({e})") from None
    try:
        restored = ocp.PyTreeCheckpointer().restore(path / "state")
        arrays = [np.asarray(restored[f"a{i:04d}"]) for i in range(meta["num_arrays"])]
    except Exception as e:  # orbax raises many types for truncated / garbled files
        raise CheckpointError(f"checkpoint {path} is unreadable: {type(e).__name__}: {str(e)[:300]}") from None
    if _digest(arrays) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the sha256 in meta.json")
    return _from_host(template, arrays), meta


def _config_diff(a: dict, b: dict) -> list[str]:
    a, b = {"kind": "rl", **a}, {"kind": "rl", **b}   # configs saved before kinds existed are RL configs
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RUN_CONTROL_FIELDS and k != "name" and a.get(k) != b.get(k)]


def restore_run(run_dir: str | os.PathLike, setup: Setup, run_id: str | None) -> tuple[DriverState, dict]:
    """The newest checkpoint of ``run_dir`` for ``setup.config``.

    Raises:
      CheckpointError: no checkpoint; a checkpoint written by another run (``run_id`` differs) or with a different
        config (the differing fields are named); a corrupt newest checkpoint (the message names the intact previous
        one, which is left in place).
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"nothing to resume: {Path(run_dir) / _CKPT_DIR} holds no checkpoint")
    newest = ckpts[-1]
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError) as e:
        meta = None
        err = CheckpointError(f"checkpoint {newest} has no readable meta.json ({e})")
    if meta is not None:
        if run_id is not None and meta.get("run_id") != run_id:
            raise CheckpointError(
                f"checkpoint {newest} belongs to another run (run id {meta.get('run_id')!r}, this run directory "
                f"is {run_id!r}); copy checkpoints only together with their run directory")
        now = configs_lib.to_dict(setup.config)
        diff = _config_diff(meta.get("config", {}), now)
        if diff:
            saved = {"kind": "rl", **meta["config"]}
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume {run_dir} with a different config ({detail}); only "
                                  f"{sorted(RUN_CONTROL_FIELDS)} may change on resume")
        try:
            return load_checkpoint(newest, init_state(setup))
        except CheckpointError as e:
            err = e
    previous = [str(p) for p in ckpts[:-1]]
    hint = (f"; the previous checkpoint {previous[-1]} is intact: delete {newest} to resume from it"
            if previous else "; there is no earlier checkpoint")
    raise CheckpointError(f"{err}{hint}")


# ----------------------------------------------------------------------------------------------------------------
# Logs and plots
# ----------------------------------------------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (``kind``: ``"train"`` per generation, ``"eval"`` for each periodic
    evaluation, ``"final"`` for the larger end-of-run evaluation, also in ``summary.json``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: everything before it is valid
    return out


def _truncate_logs(run_dir: Path, generation: int) -> None:
    """Drops records beyond ``generation`` (written after the checkpoint a resume starts from), and the previous
    segment's ``"final"`` evaluation (the run goes on, so it was not the end)."""
    records = [r for r in read_metrics(run_dir) if r["generation"] <= generation and r["kind"] != "final"]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    _write_csv(run_dir, records)


def _write_csv(run_dir: Path, records: list[dict]) -> None:
    """One row per generation: the train record's numbers, then the evaluation's numbers where there was one."""
    train = [r for r in records if r["kind"] == "train"]
    evals = {r["generation"]: r for r in records if r["kind"] == "eval"}
    skip = {"kind", "generation", "wall_time"}
    fields = ["generation"]
    for r in train[:1] + list(evals.values())[:1]:
        fields += [k for k, v in r.items() if k not in skip and k not in fields and isinstance(v, (int, float))]
    fields.append("wall_time")
    with open(run_dir / "metrics.csv", "w") as f:
        f.write(",".join(fields) + "\n")
        for r in train:
            row = {**evals.get(r["generation"], {}), **r}
            f.write(",".join(str(row.get(k, "")) for k in fields) + "\n")


def plot_learning_curve(run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                        title: str | None = None, setup: Setup | None = None) -> Path:
    """Saves the learning curve as PNG: per-generation fitness (``setup.plot_keys``; RL: population mean / best
    return) and the evaluations of the unperturbed parameters vs generation, with ``setup.references``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    keys = setup.plot_keys if setup is not None else ("return_mean", "return_max")
    score = setup.score if setup is not None else "eval_return_mean"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if train:
        g = [r["generation"] for r in train]
        for j, k in enumerate(keys):
            if k in train[0]:
                ax.plot(g, [r[k] for r in train], lw=1 if j == 0 else 0.8, alpha=1 if j == 0 else 0.6,
                        label=f"population {k.replace('_', ' ')}")
    if evals:
        ax.plot([r["generation"] for r in evals], [r.get(score, math.nan) for r in evals], "o-", ms=3,
                label=f"unperturbed: {score.replace('_', ' ')}")
    for label, value in (setup.references if setup is not None else ()):
        ax.axhline(value, ls="--", lw=0.8, c="gray")
        ax.annotate(label, (0, value), textcoords="offset points", xytext=(2, 2), fontsize=7, color="gray",
                    xycoords=("axes fraction", "data"))
    ax.set_xlabel("generation")
    ax.set_ylabel(setup.ylabel if setup is not None else "episode return")
    ax.set_title(textwrap.fill(title or str(run_dir.name), 72), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path) if path is not None else run_dir / "learning_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Result:
    """What :func:`train` returns.

    Attributes:
      state: the final :class:`DriverState`.
      run_dir: the run directory (``None`` when run without one).
      final: the final evaluation's numbers (``setup.evaluate(state, final=True)``; empty if interrupted).
      final_score: ``final[setup.score]`` (``nan`` if interrupted).
      final_returns: RL: ``float[final_eval_episodes]`` returns of the final evaluation (else ``None``).
      reached_target: an evaluation reached the config's target.
      time_to_target: seconds from the start of :func:`train` (compile included) to that evaluation, else ``None``.
      wall_time: seconds of the whole call.
      interrupted: stopped by Ctrl-C (a checkpoint was written).
      out_of_time: stopped by the config's ``minutes`` budget (a checkpoint was written; resume continues).
      history: the records written to ``metrics.jsonl`` by this call.
    """

    state: DriverState
    run_dir: Path | None
    final: dict
    final_score: float
    final_returns: np.ndarray | None
    reached_target: bool
    time_to_target: float | None
    wall_time: float
    interrupted: bool
    out_of_time: bool
    history: list

    @property
    def final_return(self) -> float:
        """RL name of :attr:`final_score` (mean greedy return over ``final_eval_episodes``)."""
        return self.final_score


def _train_records(setup: Setup, m, n: int, now: float) -> list[dict]:
    name = setup.fitness_name
    out = []
    for i in range(n):
        rec = {"kind": "train", "generation": int(m.generation[i]) + 1,
               f"{name}_mean": float(m.fitness_mean[i]), f"{name}_max": float(m.fitness_max[i]),
               f"{name}_min": float(m.fitness_min[i]), f"{name}_std": float(m.fitness_std[i]),
               "grad_norm": float(m.grad_norm[i]), "sigma": float(m.sigma[i])}
        if setup.train_extra is not None:
            rec.update(setup.train_extra(m, i))
        rec["wall_time"] = now
        out.append(rec)
    return out


def _stop_on_sigterm():
    """While training, SIGTERM (a scheduler's preemption, ``kill``) stops the run like Ctrl-C: the last completed
    generation is checkpointed. Returns the previous handler (``None`` outside the main thread, where signals
    cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


_NOT_SCALARS = frozenset({"kind", "generation", "wall_time"})


class _TensorBoard:
    """Optional TensorBoard output: every numeric field of a metrics record (but ``wall_time``: each event carries
    its own time) as the scalar ``<kind>/<field>`` at step ``generation``, in ``run_dir/tensorboard/`` (needs
    ``tensorboardX``: the ``tensorboard`` extra).

    A resumed run opens a new event file whose ``purge_step`` is the first generation it writes, so TensorBoard
    drops what the previous segment logged after the checkpoint (the same records :func:`_truncate_logs` drops).
    """

    @staticmethod
    def writer_class():
        """``tensorboardX.SummaryWriter``, or an ImportError that names the extra (checked before a run starts)."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard=True (--tensorboard) needs tensorboardX: pip install 'esx[tensorboard]'"
                              ) from e
        return SummaryWriter

    def __init__(self, run_dir: Path, first_generation: int):
        self.writer = self.writer_class()(logdir=str(run_dir / "tensorboard"),
                                          purge_step=first_generation if first_generation > 1 else None,
                                          filename_suffix=f".gen{first_generation:08d}", flush_secs=10)

    def write(self, record: dict) -> None:
        step = int(record["generation"])
        for k, v in record.items():
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{record['kind']}/{k}", float(v), step)

    def close(self) -> None:
        self.writer.close()


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list)) or v is None}


def train(config, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = None, tensorboard: bool = False) -> Result:
    """Trains ``config`` (any :mod:`esx.configs` class); see the module docstring.

    Args:
      config: the run's config.
      run_dir: where metrics, plots, checkpoints and ``config.json`` go (``None``: nothing is written).
      resume: continue from the newest checkpoint of ``run_dir`` (its config must match up to
        :data:`~esx.configs.RUN_CONTROL_FIELDS`).
      progress: show a tqdm progress bar.
      callback: called after every chunk with the last record (a ``dict``); may raise ``KeyboardInterrupt``.
      log: where to send one-line messages (default: ``print``).
      tensorboard: also write every metrics record to ``run_dir/tensorboard/`` (scalars ``train/...``,
        ``eval/...``, ``final/...`` by generation; needs the ``tensorboard`` extra and a ``run_dir``).

    Returns:
      :class:`Result`. A ``KeyboardInterrupt`` checkpoints the last completed generation and returns with
      ``interrupted=True`` (SIGTERM, e.g. a scheduler's preemption, does the same); so does running out of
      ``config.minutes`` (``out_of_time=True``, after the final
      evaluation).

    Raises:
      CheckpointError: see :func:`restore_run`; ConfigError: a bad config; FileExistsError: ``run_dir`` already
      holds a run and ``resume`` is false.
    """
    t_start = time.perf_counter()
    log = log or print
    config = validate(config)
    if tensorboard:
        if run_dir is None:
            raise ValueError("tensorboard=True needs a run_dir")
        _TensorBoard.writer_class()
    setup = make_setup(config)
    run_path = Path(run_dir) if run_dir is not None else None
    run_id = uuid.uuid4().hex
    records: list[dict] = []
    if run_path is not None:
        info_path = run_path / "run.json"
        if resume:
            if not info_path.exists():
                raise CheckpointError(f"nothing to resume: {run_path} is not a run directory (no run.json)")
            run_id = json.loads(info_path.read_text())["run_id"]
            state, _ = restore_run(run_path, setup, run_id)
            _truncate_logs(run_path, state.generation)
            log(f"resumed {run_path} at generation {state.generation}")
        else:
            if info_path.exists():
                raise FileExistsError(f"{run_path} already holds a run; pass resume=True (--resume) to continue "
                                      "it or choose another run directory")
            run_path.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps({"run_id": run_id, "created": time.time()}))
            state = init_state(setup)
        (run_path / "config.json").write_text(json.dumps(configs_lib.to_dict(config), indent=1, sort_keys=True))
    else:
        if resume:
            raise ValueError("resume=True needs a run_dir")
        state = init_state(setup)
    board = _TensorBoard(run_path, state.generation + 1) if tensorboard else None

    def emit(record: dict) -> None:
        records.append(record)
        if run_path is not None:
            with open(run_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if board is not None:
            board.write(record)

    def checkpoint(s: DriverState) -> None:
        if run_path is not None:
            save_checkpoint(run_path, s, config, run_id)

    def evaluation(s: DriverState) -> float:
        summary, _ = setup.evaluate(s, False)
        emit({"kind": "eval", "generation": s.generation, **_jsonable(summary),
              "wall_time": time.perf_counter() - t_start})
        return summary[setup.score]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.generations, initial=min(state.generation, config.generations), unit="gen",
                   dynamic_ncols=True, desc=config.name)
    length = chunk_capacity(config)
    best = -math.inf
    reached, time_to_target, interrupted, out_of_time = False, None, False, False
    last_eval = None
    last_ckpt = state.generation if resume else -1
    previous_handler = _stop_on_sigterm()
    try:
        if state.generation == 0 and setup.eval_at_start:
            last_eval = evaluation(state)
        while state.generation < config.generations and not reached:
            if config.minutes and time.perf_counter() - t_start >= 60.0 * config.minutes:
                out_of_time = True
                break
            n = min(length, config.generations - state.generation)
            new_state, metrics = setup.run_chunk(state, n)
            m = jax.device_get(metrics)
            state = new_state
            for rec in _train_records(setup, m, n, time.perf_counter() - t_start):
                best = max(best, rec[f"{setup.fitness_name}_max"])
                emit(rec)
            gen = state.generation
            if gen % config.eval_every == 0 or gen >= config.generations:
                last_eval = evaluation(state)
                if setup.target is not None and setup.better(last_eval, setup.target):
                    reached, time_to_target = True, time.perf_counter() - t_start
            if config.checkpoint_every and gen % config.checkpoint_every == 0:
                checkpoint(state)
                last_ckpt = gen
            if bar is not None:
                post = {"best": f"{best:.4g}", "mean": f"{float(m.fitness_mean[-1]):.4g}"}
                if last_eval is not None:
                    post[setup.score] = f"{last_eval:.4g}"
                bar.set_postfix(post, refresh=False)
                bar.update(n)
            if callback is not None:
                callback(records[-1])
    except KeyboardInterrupt:
        interrupted = True
        if bar is not None:
            bar.close()
            bar = None
        if run_path is not None:
            checkpoint(state)
            log(f"interrupted: checkpoint of generation {state.generation} saved in {run_path / _CKPT_DIR}; "
                "continue with resume=True (esx train ... --resume)")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.close()
    final, final_returns, final_score = {}, None, math.nan
    if not interrupted:
        if last_ckpt != state.generation:
            checkpoint(state)
        final, final_returns = setup.evaluate(state, True)
        final_score = float(final[setup.score])
        emit({"kind": "final", "generation": state.generation, **_jsonable(final),
              "wall_time": time.perf_counter() - t_start})
        if out_of_time:
            log(f"minutes={config.minutes:g} used up at generation {state.generation}; checkpoint saved, "
                "continue with resume=True (esx train ... --resume)")
    if board is not None:
        board.close()
    wall = time.perf_counter() - t_start
    if run_path is not None:
        summary = {"generation": state.generation, "score": setup.score, f"final_{setup.score}": final_score,
                   "final": _jsonable(final), "reached_target": reached, "time_to_target_s": time_to_target,
                   "wall_time_s": wall, "interrupted": interrupted, "out_of_time": out_of_time}
        if config.KIND == "rl":
            summary.update(final_greedy_return_mean=final_score, final_eval_episodes=config.final_eval_episodes)
        (run_path / "summary.json").write_text(json.dumps(summary, indent=1))
        _write_csv(run_path, read_metrics(run_path))
        plot_learning_curve(run_path, title=f"{config.name}: {config.summary()}", setup=setup)
    return Result(state, run_path, final, final_score, final_returns, reached, time_to_target, wall, interrupted,
                  out_of_time, records)


def load_run(run_dir: str | os.PathLike) -> tuple[Setup, DriverState]:
    """The setup and the newest checkpointed state of a run directory (for evaluation)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    config = configs_lib.from_dict(json.loads(cfg_path.read_text()))
    setup = make_setup(config)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"] if (run_dir / "run.json").exists() else None
    state, _ = restore_run(run_dir, setup, run_id)
    return setup, state


def evaluate_run(run_dir: str | os.PathLike, *, episodes: int = 100, seed: int = 12345) -> np.ndarray:
    """RL: greedy returns ``float[episodes]`` of the newest checkpoint of ``run_dir`` (other kinds:
    :func:`evaluate_run_summary`)."""
    setup, state = load_run(run_dir)
    if setup.config.KIND != "rl":
        raise ConfigError(f"{run_dir} is a {setup.config.KIND!r} run; use evaluate_run_summary")
    evaluator = _evaluator(core_config(setup.config), episodes)
    return np.asarray(evaluator(state.es.params, jax.random.key(seed), state.carry))


def evaluate_run_summary(run_dir: str | os.PathLike) -> tuple[Setup, DriverState, dict]:
    """The final evaluation (``setup.evaluate(state, final=True)``) of the newest checkpoint of any run."""
    setup, state = load_run(run_dir)
    summary, _ = setup.evaluate(state, True)
    return setup, state, summary


__all__ = ["BUILDERS", "CheckpointError", "ConfigError", "DriverState", "Result", "Setup", "chunk_capacity",
           "core_config", "evaluate_run", "evaluate_run_summary", "host_chunk", "init_state", "list_checkpoints",
           "load_checkpoint", "load_run", "make_setup", "plot_learning_curve", "read_metrics", "restore_run",
           "save_checkpoint", "train"]
