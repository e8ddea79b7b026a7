"""The training driver shared by the CLI, the notebooks and library users.

``train(config, run_dir=...)`` runs an RL config (:class:`esx.configs.TrainConfig`) end to end:

* ``chunk`` generations per jitted ``lax.scan`` (one compile; logging, evaluation and checkpoints happen between
  chunks); the evaluation key of generation ``g`` is ``fold_in(fold_in(run_key, 0), g)`` -- a function of the
  generation index only, so the chunk size, interruptions and resumes never change the trajectory;
* a greedy evaluation of the unperturbed policy every ``eval_every`` generations, a tqdm progress bar
  (generation, best / mean return, generations per second, ETA), metrics appended to ``metrics.jsonl`` and
  ``metrics.csv``, the learning curve ``learning_curve.png``;
* full-state checkpoints (orbax) every ``checkpoint_every`` generations, at the end, and on Ctrl-C: the esx
  :class:`~esx.State` (params, optimizer state, σ, generation, noise key), the observation statistics, the run key and
  the config. Each is written to a temporary folder and renamed into place; the previous one is kept.
* ``train(config, run_dir, resume=True)`` continues from the newest checkpoint and ends bit-identical to an
  uninterrupted run.

orbax, tqdm and matplotlib are imported inside the functions that use them (``import esx`` stays light).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
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
from esx.configs import RUN_CONTROL_FIELDS, ConfigError, TrainConfig, validate


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, from another run or another config)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DriverState:
    """Everything needed to continue a run exactly.

    Attributes:
      es: the :class:`esx.State` (params, optimizer state, σ, generation, noise key).
      obs_stats: :class:`esx_envs.rl.ObsStats` running observation statistics.
      key: the run key (constant; per-generation keys are folded from it and the generation index).
    """

    es: esx.State
    obs_stats: Any
    key: jax.Array

    @property
    def generation(self) -> int:
        return int(self.es.generation)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static pieces of a run built from its config (see :func:`make_setup`)."""

    config: TrainConfig
    adapter: Any
    policy: Any
    strategy: esx.Strategy
    fitness: Callable
    evaluator: Callable          # (params, key, obs_stats) -> float[eval_episodes]
    final_evaluator: Callable    # (params, key, obs_stats) -> float[final_eval_episodes]
    run_chunk: Callable          # (DriverState, length <= chunk) -> (DriverState, esx.Metrics stacked over length)


def make_setup(config: TrainConfig) -> Setup:
    """Builds the environment adapter, the policy, the strategy and the jitted chunk function of ``config``.

    Memoised on the config without its run-control fields (:data:`~esx.configs.RUN_CONTROL_FIELDS`), so repeated
    or resumed runs of one config in a process compile once.
    """
    config = validate(config)
    core = _core_config(config)
    adapter, policy, strategy, fitness, run_chunk = _build(core, _num_devices(config), config.placement)
    return Setup(config, adapter, policy, strategy, fitness, _evaluator(core, config.eval_episodes),
                 _evaluator(core, config.final_eval_episodes),
                 functools.partial(run_chunk, capacity=_chunk_length(config)))


def _core_config(config: TrainConfig) -> TrainConfig:
    defaults = TrainConfig()
    return dataclasses.replace(config, name="", **{f: getattr(defaults, f) for f in RUN_CONTROL_FIELDS})


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
                                   layer_norm=config.layer_norm, action_std=config.action_std)
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
        returns, moments = step_strategy.evaluate(state.es, fitness, key, state.obs_stats, has_aux=True)
        es_state, metrics = step_strategy.tell(state.es, returns)
        stats = rl.update_obs_stats(state.obs_stats, moments) if config.obs_norm else state.obs_stats
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
    from esx_envs import rl

    run_key = jax.random.key(setup.config.seed)
    params = setup.policy.init(jax.random.fold_in(run_key, 3))
    es_state = setup.strategy.init(jax.random.fold_in(run_key, 1), params)
    return DriverState(es_state, rl.ObsStats.create(setup.adapter.observation_shape), run_key)


def eval_key(state: DriverState) -> jax.Array:
    """The key of the greedy evaluation at ``state``'s generation."""
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


def save_checkpoint(run_dir: str | os.PathLike, state: DriverState, config: TrainConfig, run_id: str) -> Path:
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
        meta = {"generation": gen, "run_id": run_id, "config": dataclasses.asdict(config),
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
        diff = _config_diff(meta.get("config", {}), dataclasses.asdict(setup.config))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {meta['config'].get(k)!r} vs now {getattr(setup.config, k, None)!r}"
                               for k in diff)
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
_CSV_FIELDS = ["generation", "return_mean", "return_max", "return_min", "return_std", "grad_norm", "sigma",
               "eval_return_mean", "wall_time"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (``kind``: ``"train"`` per generation, ``"eval"``)."""
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
    """Drops records beyond ``generation`` (written after the checkpoint a resume starts from)."""
    records = [r for r in read_metrics(run_dir) if r["generation"] <= generation]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    _write_csv(run_dir, records)


def _write_csv(run_dir: Path, records: list[dict]) -> None:
    evals = {r["generation"]: r["eval_return_mean"] for r in records if r["kind"] == "eval"}
    with open(run_dir / "metrics.csv", "w") as f:
        f.write(",".join(_CSV_FIELDS) + "\n")
        for r in records:
            if r["kind"] != "train":
                continue
            row = dict(r, eval_return_mean=evals.get(r["generation"], ""))
            f.write(",".join(str(row.get(k, "")) for k in _CSV_FIELDS) + "\n")


def plot_learning_curve(run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                        title: str | None = None) -> Path:
    """Saves the learning curve (population mean/max return and greedy evaluations vs generation) as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if train:
        g = [r["generation"] for r in train]
        ax.plot(g, [r["return_mean"] for r in train], lw=1, label="population mean return")
        ax.plot(g, [r["return_max"] for r in train], lw=0.8, alpha=0.6, label="population best return")
    if evals:
        ax.plot([r["generation"] for r in evals], [r["eval_return_mean"] for r in evals], "o-", ms=3,
                label="greedy policy (mean over episodes)")
    ax.set_xlabel("generation")
    ax.set_ylabel("episode return")
    ax.set_title(title or str(run_dir.name))
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
      final_return: mean greedy return over ``final_eval_episodes`` (``nan`` if interrupted).
      final_returns: ``float[final_eval_episodes]`` returns of the final evaluation.
      reached_target: the greedy evaluation reached ``target_return``.
      time_to_target: seconds from the start of :func:`train` (compile included) to that evaluation, else ``None``.
      wall_time: seconds of the whole call.
      interrupted: stopped by Ctrl-C (a checkpoint was written).
      history: the records written to ``metrics.jsonl`` by this call.
    """

    state: DriverState
    run_dir: Path | None
    final_return: float
    final_returns: np.ndarray | None
    reached_target: bool
    time_to_target: float | None
    wall_time: float
    interrupted: bool
    history: list


def _chunk_length(config: TrainConfig) -> int:
    length = config.chunk
    for every in (config.eval_every, config.checkpoint_every):
        if every:
            length = math.gcd(length, every)
    return length


def train(config: TrainConfig, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = None) -> Result:
    """Trains ``config``; see the module docstring.

    Args:
      config: the run's :class:`~esx.configs.TrainConfig`.
      run_dir: where metrics, plots, checkpoints and ``config.json`` go (``None``: nothing is written).
      resume: continue from the newest checkpoint of ``run_dir`` (its config must match up to
        :data:`~esx.configs.RUN_CONTROL_FIELDS`).
      progress: show a tqdm progress bar.
      callback: called after every chunk with the last record (a ``dict``); may raise ``KeyboardInterrupt``.
      log: where to send one-line messages (default: ``print``).

    Returns:
      :class:`Result`. A ``KeyboardInterrupt`` checkpoints the last completed generation and returns with
      ``interrupted=True``.

    Raises:
      CheckpointError: see :func:`restore_run`; ConfigError: a bad config; FileExistsError: ``run_dir`` already
      holds a run and ``resume`` is false.
    """
    t_start = time.perf_counter()
    log = log or print
    config = validate(config)
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
        (run_path / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True))
    else:
        if resume:
            raise ValueError("resume=True needs a run_dir")
        state = init_state(setup)

    def emit(record: dict) -> None:
        records.append(record)
        if run_path is not None:
            with open(run_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(s: DriverState) -> None:
        if run_path is not None:
            save_checkpoint(run_path, s, config, run_id)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.generations, initial=min(state.generation, config.generations), unit="gen",
                   dynamic_ncols=True, desc=config.name)
    length = _chunk_length(config)
    best = -math.inf
    reached, time_to_target, interrupted = False, None, False
    last_eval = None
    last_ckpt = state.generation if resume else -1
    try:
        while state.generation < config.generations and not reached:
            n = min(length, config.generations - state.generation)
            new_state, metrics = setup.run_chunk(state, n)
            m = jax.device_get(metrics)
            state = new_state
            now = time.perf_counter() - t_start
            for i in range(n):
                rec = {"kind": "train", "generation": int(m.generation[i]) + 1,
                       "return_mean": float(m.fitness_mean[i]), "return_max": float(m.fitness_max[i]),
                       "return_min": float(m.fitness_min[i]), "return_std": float(m.fitness_std[i]),
                       "grad_norm": float(m.grad_norm[i]), "sigma": float(m.sigma[i]), "wall_time": now}
                best = max(best, rec["return_max"])
                emit(rec)
            gen = state.generation
            if gen % config.eval_every == 0 or gen >= config.generations:
                r = np.asarray(setup.evaluator(state.es.params, eval_key(state), state.obs_stats))
                last_eval = float(r.mean())
                emit({"kind": "eval", "generation": gen, "eval_return_mean": last_eval,
                      "eval_return_std": float(r.std()), "eval_return_min": float(r.min()),
                      "wall_time": time.perf_counter() - t_start})
                if config.target_return is not None and last_eval >= config.target_return:
                    reached, time_to_target = True, time.perf_counter() - t_start
            if config.checkpoint_every and gen % config.checkpoint_every == 0:
                checkpoint(state)
                last_ckpt = gen
            if bar is not None:
                post = {"best": f"{best:.1f}", "mean": f"{float(m.fitness_mean[-1]):.1f}"}
                if last_eval is not None:
                    post["greedy"] = f"{last_eval:.1f}"
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
        if bar is not None:
            bar.close()
    final_returns, final_return = None, math.nan
    if not interrupted:
        if last_ckpt != state.generation:
            checkpoint(state)
        final_returns = np.asarray(setup.final_evaluator(
            state.es.params, jax.random.fold_in(eval_key(state), 1), state.obs_stats))
        final_return = float(final_returns.mean())
    wall = time.perf_counter() - t_start
    if run_path is not None:
        summary = {"generation": state.generation, "final_greedy_return_mean": final_return,
                   "final_eval_episodes": config.final_eval_episodes, "reached_target": reached,
                   "time_to_target_s": time_to_target, "wall_time_s": wall, "interrupted": interrupted}
        (run_path / "summary.json").write_text(json.dumps(summary, indent=1))
        _write_csv(run_path, read_metrics(run_path))
        plot_learning_curve(run_path, title=f"{config.name}: {config.env} ({config.strategy}, "
                                            f"N={config.population_size})")
    return Result(state, run_path, final_return, final_returns, reached, time_to_target, wall, interrupted,
                  records)


def load_run(run_dir: str | os.PathLike) -> tuple[Setup, DriverState]:
    """The setup and the newest checkpointed state of a run directory (for evaluation)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    config = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    setup = make_setup(config)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"] if (run_dir / "run.json").exists() else None
    state, _ = restore_run(run_dir, setup, run_id)
    return setup, state


def evaluate_run(run_dir: str | os.PathLike, *, episodes: int = 100, seed: int = 12345) -> np.ndarray:
    """Greedy returns ``float[episodes]`` of the newest checkpoint of ``run_dir``."""
    setup, state = load_run(run_dir)
    evaluator = _evaluator(_core_config(setup.config), episodes)
    return np.asarray(evaluator(state.es.params, jax.random.key(seed), state.obs_stats))


__all__ = ["CheckpointError", "ConfigError", "DriverState", "Result", "Setup", "evaluate_run", "init_state",
           "list_checkpoints", "load_checkpoint", "load_run", "make_setup", "plot_learning_curve", "read_metrics",
           "restore_run", "save_checkpoint", "train"]
