"""The task-agnostic training loop: :func:`train` runs any task end to end.

* ``chunk`` generations per call of the task's ``run_chunk`` (one jitted ``lax.fori_loop`` for device tasks; a
  host loop for tasks whose data or verifiers live on the host); logging, evaluation and checkpoints happen between
  chunks. Every random draw of generation ``g`` is a function of the run seed and ``g`` only, so the chunk size,
  interruptions and resumes never change the trajectory;
* an evaluation of the unperturbed parameters every ``eval_every`` generations, a tqdm progress bar (generation,
  best / mean fitness, the latest evaluation, generations per second, ETA), records appended to ``metrics.jsonl``
  and ``metrics.csv`` (and, with ``tensorboard=True``, TensorBoard event files), the learning curve
  ``learning_curve.png`` (:mod:`esx.run.records`);
* full-state checkpoints (orbax; :mod:`esx.run.checkpoint`) every ``checkpoint_every`` generations, at the end, on
  Ctrl-C / SIGTERM and when the ``minutes`` budget runs out;
* ``train(task, run_dir, resume=True)`` continues from the newest checkpoint and ends bit-identical to an
  uninterrupted run;
* with the config's ``keep_best``, the state of the best evaluation so far (the task's ``score``, strictly better
  than every earlier one) is kept in ``run_dir/best/`` (:func:`load_best`), next to ``best.json`` (its generation
  and score);
* running sums of per-generation fields (``Setup.cumulative``, e.g. the LLM task's model token-passes) in every
  record, carried across resumes.

The runner never names a task: it is handed a :class:`~esx.run.Setup` (or a config whose ``setup()`` builds one),
and :func:`load_run` finds a run directory's task through the ``esx.tasks`` entry points.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from esx.base import DIAGNOSTICS
from esx.run import records as records_lib
from esx.run.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, restore_run, save_checkpoint
from esx.run.config import to_dict
from esx.run.records import jsonable
from esx.run.task import RunState, Setup, chunk_capacity, config_from_dict, make_setup


@dataclasses.dataclass(frozen=True)
class Result:
    """What :func:`train` returns.

    Attributes:
      state: the final :class:`DriverState`.
      run_dir: the run directory (``None`` when run without one).
      final: the final evaluation's numbers (``setup.evaluate(state, final=True)``; empty if interrupted).
      final_score: ``final[setup.score]`` (``nan`` if interrupted).
      final_values: the final evaluation's per-episode values (RL returns ``float[final_eval_episodes]``), else
        ``None``.
      reached_target: an evaluation reached the config's target.
      time_to_target: seconds from the start of :func:`train` (compile included) to that evaluation, else ``None``.
      wall_time: seconds of the whole call.
      interrupted: stopped by Ctrl-C (a checkpoint was written).
      out_of_time: stopped by the config's ``minutes`` budget (a checkpoint was written; resume continues).
      history: the records written to ``metrics.jsonl`` by this call.
    """

    state: RunState
    run_dir: Path | None
    final: dict
    final_score: float
    final_values: np.ndarray | None
    reached_target: bool
    time_to_target: float | None
    wall_time: float
    interrupted: bool
    out_of_time: bool
    history: list



def _train_records(setup: Setup, m, n: int, now: float, totals: dict) -> list[dict]:
    """The train records of a chunk of ``n`` generations; ``totals`` (the running sums of ``setup.cumulative``)
    is advanced and written into each."""
    name = setup.fitness_name
    diagnostics = [k for k in DIAGNOSTICS if hasattr(m, k)]
    out = []
    for i in range(n):
        rec = {"kind": "train", "generation": int(m.generation[i]) + 1,
               f"{name}_mean": float(m.fitness_mean[i]), f"{name}_max": float(m.fitness_max[i]),
               f"{name}_min": float(m.fitness_min[i]), f"{name}_std": float(m.fitness_std[i]),
               "grad_norm": float(m.grad_norm[i]), "sigma": float(m.sigma[i])}
        for k in diagnostics:   # the population diagnostics of esx.Metrics (docs/hyperscale.md)
            v = np.asarray(getattr(m, k)[i])
            rec[k] = bool(v) if v.dtype == bool else float(v)
        if setup.train_extra is not None:
            rec.update(setup.train_extra(m, i))
        for total, field in setup.cumulative.items():
            totals[total] += rec[field]
            rec[total] = totals[total]
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


def train(task, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = None, tensorboard: bool = False, plot_x: str = "generation") -> Result:
    """Trains a task; see the module docstring.

    Args:
      task: a :class:`~esx.run.Setup` (e.g. from :func:`~esx.run.fitness_task`) or a task config (a
        :class:`~esx.run.RunConfig` with a ``setup()`` method, e.g. ``esx_envs.configs.get_config("cartpole")``).
      run_dir: where metrics, plots, checkpoints and ``config.json`` go (``None``: nothing is written).
      resume: continue from the newest checkpoint of ``run_dir`` (its config must match up to the config's
        ``RUN_CONTROL`` fields).
      progress: show a tqdm progress bar.
      callback: called after every chunk with the last record (a ``dict``); may raise ``KeyboardInterrupt``.
      log: where to send one-line messages (default: ``print``).
      tensorboard: also write every metrics record to ``run_dir/tensorboard/`` (scalars ``train/...``,
        ``eval/...``, ``final/...`` by generation; needs the ``tensorboard`` extra and a ``run_dir``).
      plot_x: the horizontal axis of ``learning_curve.png``: ``"generation"`` or ``"wall_time"``.

    Returns:
      :class:`Result`. A ``KeyboardInterrupt`` checkpoints the last completed generation (the last whose records,
      evaluation and checkpoint were all written: one that lands while a chunk's are being written saves the state
      before the chunk, and the resume drops its partial records and runs it again) and returns with
      ``interrupted=True`` (SIGTERM, e.g. a scheduler's preemption, does the same); so does running out of
      ``config.minutes`` (``out_of_time=True``, after the final
      evaluation).

    Raises:
      CheckpointError: see :func:`restore_run`; ConfigError: a bad config; FileExistsError: ``run_dir`` already
      holds a run and ``resume`` is false.
    """
    t_start = time.perf_counter()
    log = log or print
    if plot_x not in ("generation", "wall_time"):
        raise ValueError(f"plot_x={plot_x!r}; valid axes are ['generation', 'wall_time']")
    if tensorboard:
        if run_dir is None:
            raise ValueError("tensorboard=True needs a run_dir")
        records_lib.TensorBoard.writer_class()
    setup = task if isinstance(task, Setup) else make_setup(task)
    config = setup.config
    run_path = Path(run_dir) if run_dir is not None else None
    records: list[dict] = []
    state, run_id = _open_run(setup, run_path, resume, log)
    board = records_lib.TensorBoard(run_path, state.generation + 1) if tensorboard else None
    memory = setup.memory.summary() if setup.memory is not None else {"member_batch": setup.member_batch}
    if setup.memory is not None and setup.memory.describe():
        log(setup.memory.describe())

    def emit(record: dict) -> None:
        records.append(record)
        if run_path is not None:
            with open(run_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if board is not None:
            board.write(record)

    def checkpoint(s: RunState) -> None:
        if run_path is not None:
            save_checkpoint(run_path, s, config, run_id)

    totals, keeper = _resumed_totals(setup, run_path, resume), _BestKeeper(setup, run_path, run_id, resume)

    def evaluation(s: RunState) -> float:
        summary, _ = setup.evaluate(s, False)
        emit({"kind": "eval", "generation": s.generation, **jsonable(summary), **totals,
              "wall_time": time.perf_counter() - t_start})
        keeper.offer(s, float(summary[setup.score]), totals)
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
            for rec in _train_records(setup, m, n, time.perf_counter() - t_start, totals):
                best = max(best, rec[f"{setup.fitness_name}_max"])
                emit(rec)
            gen = new_state.generation
            if gen % config.eval_every == 0 or gen >= config.generations:
                last_eval = evaluation(new_state)
                if setup.target is not None and setup.better(last_eval, setup.target):
                    reached, time_to_target = True, time.perf_counter() - t_start
            if config.checkpoint_every and gen % config.checkpoint_every == 0:
                checkpoint(new_state)
                last_ckpt = gen
            state = new_state   # its records, evaluation and checkpoint are written: what a Ctrl-C saves
            if bar is not None:
                post = {"best": f"{best:.4g}", "mean": f"{float(m.fitness_mean[-1]):.4g}"}
                if last_eval is not None:
                    post[setup.score] = f"{last_eval:.4g}"
                flag = _no_signal_flag(m, n)
                if flag:
                    post["flag"] = flag
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
            log(f"interrupted: checkpoint of generation {state.generation} saved in {run_path / 'checkpoints'}; "
                "continue with resume=True (esx train ... --resume)")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.close()
    final, final_values, final_score = {}, None, math.nan
    if not interrupted:
        if last_ckpt != state.generation:
            checkpoint(state)
        final, final_values = setup.evaluate(state, True)
        final_score = float(final[setup.score])
        emit({"kind": "final", "generation": state.generation, **jsonable(final), **totals,
              "wall_time": time.perf_counter() - t_start})
        if out_of_time:
            log(f"minutes={config.minutes:g} used up at generation {state.generation}; checkpoint saved, "
                "continue with resume=True (esx train ... --resume)")
    if board is not None:
        board.close()
    wall = time.perf_counter() - t_start
    if run_path is not None:
        _write_summary(run_path, setup, state, final, final_score, reached, time_to_target, wall, interrupted,
                       out_of_time, plot_x, memory)
    return Result(state, run_path, final, final_score, final_values, reached, time_to_target, wall, interrupted,
                  out_of_time, records)


#: the folder of a run directory that holds the best evaluation's state (``keep_best``).
BEST_DIR = "best"


def _resumed_totals(setup: Setup, run_path: Path | None, resume: bool) -> dict:
    """The running sums of ``setup.cumulative`` at the starting generation: with ``resume``, those of the last train
    record left after the resume truncated the logs (0 when there is none)."""
    totals = dict.fromkeys(setup.cumulative, 0)
    if not resume or run_path is None or not setup.cumulative:
        return totals
    train = [r for r in records_lib.read_metrics(run_path) if r["kind"] == "train"]
    if train:
        totals.update({k: train[-1][k] for k in totals if k in train[-1]})
    return totals


class _BestKeeper:
    """``keep_best``: saves the state of each evaluation strictly better than every earlier one (the kept score
    is read back on resume) to ``run_dir/best/`` with ``best.json``; does nothing without the flag or a run dir."""

    def __init__(self, setup: Setup, run_path: Path | None, run_id: str, resume: bool):
        self.setup, self.run_path, self.run_id = setup, run_path, run_id
        self.on = bool(getattr(setup.config, "keep_best", False)) and run_path is not None
        self.value = None
        kept = _kept_best(run_path / BEST_DIR, setup.higher_is_better) if self.on and resume else None
        if kept is not None:   # the kept checkpoint's own meta.json is authoritative (best.json is a copy of it)
            _, meta = kept
            self.value = float(meta["value"])
            if "best" in meta:   # a crash between the two writes left the copy stale or missing: write it again
                self._write_record(meta["best"])

    def _write_record(self, record: dict) -> None:
        folder = self.run_path / BEST_DIR
        tmp = folder / f".best.json.{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, folder / "best.json")

    def offer(self, state: RunState, value: float, totals: dict) -> None:
        better = self.value is None or (value > self.value if self.setup.higher_is_better else value < self.value)
        if not self.on or not better:
            return
        self.value = value
        folder = self.run_path / BEST_DIR
        record = {"generation": state.generation, "score": self.setup.score, "value": value, **totals}
        # every checkpoint but this one is removed after it is written, whatever the generations (a resume from an
        # older checkpoint can find a better state at a lower generation than the one kept)
        final = save_checkpoint(folder, state, self.setup.config, self.run_id, keep=1 << 30,
                                extra={"score": self.setup.score, "value": value, "best": record})
        self._write_record(record)
        for old in list_checkpoints(folder):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def _kept_best(folder: Path, higher_is_better: bool) -> tuple[Path, dict] | None:
    """The checkpoint in ``folder`` (``run_dir/best``) with the best ``value`` in its meta.json and that meta, or
    ``None`` when there is none. Normally one is kept; after a crash between writing a new best and removing the
    old one, two are, and the better value wins (ties: the later generation)."""
    found = []
    for path in list_checkpoints(folder):
        meta = json.loads((path / "meta.json").read_text())
        found.append((float(meta["value"]) if higher_is_better else -float(meta["value"]), path, meta))
    if not found:
        return None
    _, path, meta = max(reversed(found), key=lambda f: f[0])   # max keeps the first of equals: the later one
    return path, meta


def load_best(run_dir: str | os.PathLike, setup: Setup | None = None, *,
              default_kind: str | None = None) -> tuple[Setup, RunState, dict]:
    """The setup, the state of the best evaluation (kept by ``keep_best``) and ``best.json`` (``generation``,
    ``score``, ``value``) of a run directory (arguments as :func:`load_run`).

    Raises:
      CheckpointError: the run kept no best state (``keep_best`` was off, or no evaluation ran).
    """
    run_dir = Path(run_dir)
    if not list_checkpoints(run_dir / BEST_DIR):
        raise CheckpointError(f"{run_dir} has no best state (train with keep_best=True)")
    setup, _ = load_run(run_dir, setup, default_kind=default_kind)
    path, _ = _kept_best(run_dir / BEST_DIR, setup.higher_is_better)
    state, meta = load_checkpoint(path, setup.initial_state())
    if "best" in meta:   # the record saved with the state (best.json is a copy of it)
        return setup, state, meta["best"]
    return setup, state, json.loads((run_dir / BEST_DIR / "best.json").read_text())


def _open_run(setup: Setup, run_path: Path | None, resume: bool, log: Callable[[str], None]):
    """The starting state and run id: a new run directory (``run.json``, ``config.json``), the newest checkpoint
    of an existing one (``resume``; records after it are dropped), or no directory at all."""
    run_id = uuid.uuid4().hex
    if run_path is None:
        if resume:
            raise ValueError("resume=True needs a run_dir")
        return setup.initial_state(), run_id
    info_path = run_path / "run.json"
    if resume:
        if not info_path.exists():
            raise CheckpointError(f"nothing to resume: {run_path} is not a run directory (no run.json)")
        run_id = json.loads(info_path.read_text())["run_id"]
        state, _ = restore_run(run_path, setup, run_id)
        records_lib.truncate_logs(run_path, state.generation)
        log(f"resumed {run_path} at generation {state.generation}")
    else:
        if info_path.exists():
            raise FileExistsError(f"{run_path} already holds a run; pass resume=True (--resume) to continue "
                                  "it or choose another run directory")
        run_path.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps({"run_id": run_id, "created": time.time()}))
        state = setup.initial_state()
    (run_path / "config.json").write_text(json.dumps(to_dict(setup.config), indent=1, sort_keys=True))
    return state, run_id


def _no_signal_flag(m, n: int) -> str:
    """The progress bar's flag for a chunk of ``n`` generations: ``"no signal"`` when the last generation carried
    none (``metrics.no_signal``), with the count when others of the chunk did too (``"no signal (3/10)"``)."""
    if not hasattr(m, "no_signal"):
        return ""
    flags = np.asarray(m.no_signal[:n]).astype(bool)
    if not flags.any():
        return ""
    return "no signal" if n == 1 or flags.sum() == 1 and flags[-1] else f"no signal ({int(flags.sum())}/{n})"


def _write_summary(run_path: Path, setup: Setup, state: RunState, final: dict, final_score: float, reached: bool,
                   time_to_target: float | None, wall: float, interrupted: bool, out_of_time: bool,
                   plot_x: str, memory: dict) -> None:
    """``summary.json``, ``metrics.csv`` and ``learning_curve.png`` of a finished (or stopped) call."""
    summary = {"generation": state.generation, "score": setup.score, f"final_{setup.score}": final_score,
               "final": jsonable(final), "reached_target": reached, "time_to_target_s": time_to_target,
               "wall_time_s": wall, "interrupted": interrupted, "out_of_time": out_of_time,
               "member_batch": setup.member_batch, "memory": memory, **setup.summary_extra}
    (run_path / "summary.json").write_text(json.dumps(summary, indent=1))
    records_lib.write_csv(run_path, records_lib.read_metrics(run_path))
    records_lib.plot_learning_curve(run_path, title=f"{setup.config.name}: {setup.config.summary()}", setup=setup,
                                    x=plot_x)


def load_run(run_dir: str | os.PathLike, setup: Setup | None = None, *,
             default_kind: str | None = None) -> tuple[Setup, RunState]:
    """The setup and the newest checkpointed state of a run directory.

    Args:
      run_dir: a directory written by :func:`train`.
      setup: the run's :class:`Setup` (needed for a task that is not registered, e.g. a
        :func:`~esx.run.fitness_task`); default: rebuilt from ``config.json`` through the task registry.
      default_kind: the kind of a ``config.json`` without ``"kind"`` (see :func:`~esx.run.config_from_dict`).

    Raises:
      CheckpointError: not a run directory, no usable checkpoint; ConfigError: the run's kind is not installed.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json)")
    if setup is None:
        config = config_from_dict(json.loads(cfg_path.read_text()), default_kind=default_kind)
        if getattr(config, "member_batch", None) == "auto":   # evaluating needs no batch: skip the estimate
            config = config.replace(member_batch=None)
        setup = make_setup(config)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"] if (run_dir / "run.json").exists() else None
    state, _ = restore_run(run_dir, setup, run_id)
    return setup, state


def evaluate_run_summary(run_dir: str | os.PathLike, setup: Setup | None = None, *,
                         default_kind: str | None = None) -> tuple[Setup, RunState, dict]:
    """The final evaluation (``setup.evaluate(state, final=True)``, the same keys as the run's own final
    evaluation) of the newest checkpoint of a run directory (arguments as :func:`load_run`)."""
    setup, state = load_run(run_dir, setup, default_kind=default_kind)
    summary, _ = setup.evaluate(state, True)
    return setup, state, summary


__all__ = ["BEST_DIR", "Result", "evaluate_run_summary", "load_best", "load_run", "train"]
