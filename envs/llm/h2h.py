"""The Countdown head-to-head of EGGROLL and GRPO at an equal budget of model token-passes (issue #24, item 2).

``scripts/countdown_h2h.py`` is the command line; this module holds the pieces (importable, so the test runs them
in one process and reuses the compiled functions).

* **The two arms.** EGGROLL is the ES path of ``esx train llm-countdown``: the ``llm`` task's
  :class:`esx.run.Setup` (:func:`esx_envs.llm.task.llm_setup`) driven by :func:`esx.run.train`, one run directory
  and checkpoint per cell. GRPO is :class:`esx_envs.llm.grpo.GRPOTrainer`. Both start from the same model
  (:func:`~esx_envs.llm.task.load_model`), train on the same training part of the problem space
  (:class:`~esx_envs.llm.task.SplitTask` ``"train"`` when the config has ``disjoint``), are scored by the same task
  object (:func:`~esx_envs.llm.task.make_task`: lenient Countdown in ``llm-countdown``), with the same prompt
  template, system turn and ``max_new_tokens``, all taken from one :class:`~esx_envs.llm.config.LLMConfig`
  (``llm-countdown`` plus ``--set`` overrides).
* **The budget** is model token-passes as both trainers count them (``docs/llm.md``, "Token-passes"): ES
  ``group_size · Σ prompt tokens + Σ generated tokens`` per generation (the runner's running ``token_passes``);
  GRPO ``4 ×`` (prompt + completion tokens of every sampled sequence) per step with ``inner_steps=1`` (one sampling
  forward, then a forward and a backward counted as 2). A cell ends at the step count whose token-passes are
  nearest the budget (it stops when the remainder is under half the latest step). Validation is not counted.
* **Evaluation** is one function for both methods (:meth:`Context.evaluate`: :func:`esx_envs.llm.es.evaluate_model`,
  greedy, the unperturbed parameters) on the fixed held-out sets of ``--data-seed``
  (:func:`~esx_envs.llm.task.validation_problems` / :func:`~esx_envs.llm.task.tuning_problems`, hash-disjoint from
  training), at token-passes 0 and every time a cell's count crosses a multiple of ``eval_every`` and at the end.
  Tuning trials are scored on the tuning split only (their final ``tune_accuracy``; the validation set is never
  looked at while tuning).
* **Wall-clock** (``wall_s``) is the sum of the training steps' own seconds (evaluations and checkpoints excluded),
  carried across sittings, without the first step of each sitting of a cell: that step holds the jit compilation,
  which ES pays for every cell (each setting and seed builds its own jitted rollout) and GRPO mostly once per process
  (module-level jitted functions), so counting it would charge the two unequally; its seconds are kept apart as
  ``first_steps_s``.
* **Resume.** Every finished cell (tuning trial, or (method, seed) run) is kept in the JSON and skipped. A partly
  finished cell continues from its checkpoint, written at every evaluation point: for ES the runner's own
  checkpoint (also written on Ctrl-C / SIGTERM; exact: problems and noise derive from the seed and the generation),
  for GRPO an ``.npz`` of the parameters, the Adam state, the problem / sampling RNG state and the counters (also
  exact). Steps after the last checkpoint are redone; a resumed sitting pays jit compilation again (counted in
  ``wall_s``). A finished cell's checkpoints are deleted (``keep_checkpoints``), its records stay.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esx_envs.llm import es as es_lib
from esx_envs.llm import grpo as grpo_lib
from esx_envs.llm import model as model_lib
from esx_envs.llm import task as task_lib
from esx_envs.llm import tasks as tasks_lib
from esx_envs.llm.config import LLMConfig

METHODS = ("es", "grpo")

#: the hyperparameters each method's tuning searches (``--es-*`` / ``--grpo-*`` flags), with their default ranges:
#: ``"lo:hi"`` a range (log-uniform for step sizes and σ, else uniform), ``"a,b,c"`` a choice, one value fixed.
SEARCH_SPACE = {
    "es": {"learning_rate": "5e-5:1e-3", "sigma": "3e-4:3e-3", "population_size": "16,32,64",
           "prompts_per_member": "1,2,4"},
    "grpo": {"learning_rate": "1e-6:1e-4", "group_size": "4,8,16", "prompts_per_step": "2,4,8",
             "clip_eps": "0.1:0.3"},
}
#: searched on a log scale (the others: uniformly)
LOG_SCALE = {"learning_rate", "sigma"}
INT_KEYS = {"population_size", "prompts_per_member", "group_size", "prompts_per_step"}


# ----------------------------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------------------------
def parse_spec(key: str, text: str):
    """``("range", lo, hi, log)``, ``("choice", [values])`` of a search-space flag (see :data:`SEARCH_SPACE`)."""
    cast = int if key in INT_KEYS else float
    text = str(text).strip()
    try:
        if ":" in text:
            lo, hi = (float(x) for x in text.split(":"))
            if not 0 < lo <= hi and key in LOG_SCALE or lo > hi:
                raise ValueError
            return ("range", lo, hi, key in LOG_SCALE)
        return ("choice", [cast(float(x)) if cast is int else cast(x) for x in text.split(",")])
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected 'lo:hi' (a range), 'a,b,c' (a choice) or one value") from None


def sample_settings(space: dict, rng: random.Random) -> dict:
    """One random-search draw from ``{key: spec text}`` (keys in sorted order, so a draw depends on ``rng`` only)."""
    out = {}
    for key in sorted(space):
        spec = parse_spec(key, space[key])
        if spec[0] == "choice":
            out[key] = rng.choice(spec[1])
        else:
            _, lo, hi, log = spec
            u = rng.random()
            value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if log else lo + u * (hi - lo)
            out[key] = float(f"{value:.3g}")
    return out


def trial_settings(space: dict, method: str, trial: int, tune_seed: int) -> dict:
    """The settings of tuning trial ``trial`` of ``method`` (a pure function of the space and the seeds)."""
    return sample_settings(space, random.Random(f"{tune_seed}-{method}-{trial}"))


def parse_settings(text: str | None) -> dict:
    """``"learning_rate=2e-4,sigma=1e-3"`` → ``{"learning_rate": 2e-4, "sigma": 1e-3}`` (``None``/empty: ``{}``)."""
    out = {}
    for part in filter(None, (x.strip() for x in (text or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"settings {text!r}: expected 'key=value,...'")
        key = key.strip()
        out[key] = int(float(value)) if key in INT_KEYS else float(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The shared context: model, task, held-out sets, evaluation
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What both arms share: the base :class:`LLMConfig`, the model (for GRPO and for evaluation), the task and its
    training view, the fixed validation and tuning problems, and the greedy evaluation."""

    base: LLMConfig
    data_seed: int = 0
    eval_batch: int = 16

    def __post_init__(self):
        b = self.base
        self.dtype = jnp.bfloat16 if b.dtype == "bfloat16" else jnp.float32
        self.cfg, self.params, self.tokenizer = task_lib.load_model(b.model, self.dtype)
        self.task = task_lib.make_task(b)
        self.train_task = task_lib.SplitTask(self.task, "train") if b.disjoint else self.task
        self.problems = {
            "val": task_lib.validation_problems(self.task, self.data_seed, b.val_size, disjoint=b.disjoint),
            "tune": task_lib.tuning_problems(self.task, self.data_seed, max(b.tune_size, 1), disjoint=b.disjoint),
        }
        self.options = model_lib.GenerateOptions(
            max_new_tokens=b.max_new_tokens, stop_ids=tuple(self.tokenizer.stop_ids),
            stop_sequences=self.tokenizer.stop_sequences([tasks_lib.ANSWER_STOP]), pad_id=self.tokenizer.pad_id)
        texts = [tasks_lib.make_prompt(p.question, chat=b.chat, system=b.system)
                 for ps in self.problems.values() for p in ps]
        self.prompt_length = es_lib.round_up(max(len(self.tokenizer.encode(t)) for t in texts))

    def evaluate(self, params: Any, split: str) -> float:
        """Greedy accuracy of ``params`` on the ``"val"`` or ``"tune"`` problems (one padded length for both: one
        compilation)."""
        if self.base.master_weights and self.base.dtype == "bfloat16":
            params = model_lib.cast_params(params, jnp.bfloat16)
        return es_lib.evaluate_model(params, cfg=self.cfg, tokenizer=self.tokenizer, task=self.task,
                                     problems=self.problems[split], options=self.options, chat=self.base.chat,
                                     prompt_length=self.prompt_length, system=self.base.system,
                                     batch_size=self.eval_batch)["accuracy"]

    def es_config(self, settings: dict, seed: int) -> LLMConfig:
        """The ``esx train`` config of an ES cell: the base config with ``settings`` and ``seed``; the runner only
        trains (no evaluation, checkpoints at the cell's evaluation points)."""
        return self.base.replace(seed=int(seed), generations=10**9, eval_every=10**9, chunk=1, checkpoint_every=0,
                                 minutes=0.0, keep_best=False, target_accuracy=None, **settings)

    def grpo_config(self, settings: dict) -> grpo_lib.GRPOConfig:
        """The GRPO config of ``settings`` with the base config's decoding, prompt and reward fields."""
        b = self.base
        return grpo_lib.GRPOConfig(**{"max_new_tokens": b.max_new_tokens, "format_weight": b.format_weight,
                                      "chat": b.chat, "system": b.system, **settings})


@functools.lru_cache(maxsize=2)
def context(base: LLMConfig, data_seed: int = 0, eval_batch: int = 16) -> Context:
    """The :class:`Context` of a config, built once per process (the model is loaded once)."""
    return Context(base, data_seed, eval_batch)


def default_settings(method: str) -> dict:
    """The untuned settings (``llm-countdown``'s ES fields; :class:`GRPOConfig`'s defaults)."""
    if method == "es":
        from esx_envs.configs import get_config

        c = get_config("llm-countdown")
        return {k: getattr(c, k) for k in SEARCH_SPACE["es"]}
    d = grpo_lib.GRPOConfig()
    return {k: getattr(d, k) for k in SEARCH_SPACE["grpo"]}


# ----------------------------------------------------------------------------------------------------------------
# Cells: one method, one settings, one seed, trained to a budget with evaluations on the way
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    """Where a cell's training stands: ``generation`` (ES generations / GRPO steps), ``token_passes``, ``wall_s``
    (the steps' seconds, without the first step of each sitting), ``first_steps_s`` (the seconds of those first
    steps: jit compilation, which ES pays per cell and GRPO mostly once per process), ``last_step`` (the token-passes
    of the latest step) and ``first`` (the generations that were a sitting's first step)."""

    generation: int = 0
    token_passes: int = 0
    wall_s: float = 0.0
    first_steps_s: float = 0.0
    last_step: int = 0
    first: set = dataclasses.field(default_factory=set)

    def add(self, generation: int, token_passes: int, seconds: float) -> None:
        """Accounts one step that ended at ``generation`` with ``token_passes`` in total and took ``seconds``."""
        self.last_step = int(token_passes) - self.token_passes
        self.generation, self.token_passes = int(generation), int(token_passes)
        if self.generation in self.first:
            self.first_steps_s += float(seconds)
        else:
            self.wall_s += float(seconds)

    def reached(self, target: int, final: bool = False) -> bool:
        """No further step toward ``target``: reached it, or (``final``) the remainder is under half the latest
        step, so stopping here lands nearer the budget than one more step would."""
        if self.token_passes >= target:
            return True
        return final and self.last_step > 0 and target - self.token_passes < self.last_step / 2


def thresholds(budget: int, eval_every: int) -> list[int]:
    """The token-pass counts after which a cell evaluates: multiples of ``eval_every`` below ``budget``, then
    ``budget``."""
    return [k * eval_every for k in range(1, -(-budget // eval_every)) if k * eval_every < budget] + [budget]


class _StopAt:
    """The runner callback that ends a :func:`esx.run.train` call once ``progress`` has :meth:`Progress.reached`
    ``target`` (raising ``KeyboardInterrupt``, which the runner answers with a checkpoint)."""

    def __init__(self, target: int, progress: Progress, final: bool):
        self.target, self.progress, self.final, self.hit, self.steps = target, progress, final, False, 0

    def __call__(self, rec: dict) -> None:
        if rec.get("kind") != "train":
            return
        self.steps += 1
        self.progress.add(rec["generation"], rec["token_passes"], rec["seconds"])
        if self.progress.reached(self.target, self.final):
            self.hit = True
            raise KeyboardInterrupt


class ESArm:
    """An ES cell: the ``llm`` task's setup through :func:`esx.run.train` in ``run_dir``."""

    def __init__(self, ctx: Context, settings: dict, seed: int, run_dir: Path):
        from esx import run as run_lib

        self.run_lib, self.ctx, self.run_dir = run_lib, ctx, Path(run_dir)
        config = ctx.es_config(settings, seed)
        setup = config.setup()

        def evaluate(state, final):   # used only if the runner ever evaluates (it does not: see es_config)
            return {"val_accuracy": ctx.evaluate(state.es.params, "val")}, None

        self.setup = dataclasses.replace(setup, eval_at_start=False, evaluate=evaluate)
        self.state = None

    def restore(self, first: set) -> Progress:
        """The progress of the newest checkpoint (fresh: 0; a run directory without one is removed), from the
        runner's records up to it."""
        run_lib = self.run_lib
        if not (self.run_dir / "run.json").exists() or not run_lib.list_checkpoints(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.state = None
            return Progress(first=first)
        _, self.state = run_lib.load_run(self.run_dir, self.setup)
        g = self.state.generation
        progress = Progress(first=first)
        for r in run_lib.read_metrics(self.run_dir):
            if r["kind"] == "train" and r["generation"] <= g:
                progress.add(r["generation"], r["token_passes"], r["seconds"])
        return progress

    def params(self):
        return (self.state.es.params if self.state is not None
                else self.setup.initial_state().es.params)

    def train_until(self, target: int, progress: Progress, final: bool = False) -> int:
        """Trains until ``progress`` has :meth:`~Progress.reached` ``target``; returns the number of steps taken."""
        stop = _StopAt(target, progress, final)
        resume = (self.run_dir / "run.json").exists()
        result = self.run_lib.train(self.setup, self.run_dir, resume=resume, progress=False, callback=stop,
                                    log=lambda s: None)
        self.state = result.state
        if result.interrupted and not stop.hit:
            raise KeyboardInterrupt   # the user's Ctrl-C: the runner has checkpointed; stop here
        return stop.steps

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)


class GRPOArm:
    """A GRPO cell: :class:`GRPOTrainer` with an ``.npz`` checkpoint in ``run_dir``."""

    def __init__(self, ctx: Context, settings: dict, seed: int, run_dir: Path):
        self.ctx, self.run_dir = ctx, Path(run_dir)
        self.trainer = grpo_lib.GRPOTrainer(cfg=ctx.cfg, params=ctx.params, tokenizer=ctx.tokenizer,
                                            task=ctx.train_task, config=ctx.grpo_config(settings), seed=seed)
        # pad prompts as the evaluation does (grows if a training prompt is longer): with an evaluation batch of
        # prompts_per_step * group_size, sampling and evaluation share one compiled generator
        self.trainer._prompt_length = ctx.prompt_length

    @property
    def path(self) -> Path:
        return self.run_dir / "grpo_state.npz"

    def checkpoint(self, progress: Progress) -> None:
        t = self.trainer
        leaves = jax.tree_util.tree_leaves((t.params, t.opt_state))
        version, internal, gauss = t.rng.getstate()
        meta = {"generation": t.generation, "token_passes": t.token_passes, "wall_s": progress.wall_s,
                "first_steps_s": progress.first_steps_s, "last_step": progress.last_step,
                "prompt_length": t._prompt_length, "rng": [version, list(internal), gauss]}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "grpo_state.tmp.npz"
        arrays = {f"a{i:05d}": np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
                  for i, x in enumerate(leaves)}
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        os.replace(tmp, self.path)

    def restore(self, first: set) -> Progress:
        if not self.path.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return Progress(first=first)
        t = self.trainer
        with np.load(self.path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            leaves, treedef = jax.tree_util.tree_flatten((t.params, t.opt_state))
            if len(z.files) - 1 != len(leaves):
                raise RuntimeError(f"{self.path}: {len(z.files) - 1} arrays, the trainer has {len(leaves)}")
            new = []
            for i, leaf in enumerate(leaves):
                leaf = np.asarray(leaf)
                new.append(jnp.asarray(np.frombuffer(z[f"a{i:05d}"].tobytes(), leaf.dtype).reshape(leaf.shape)))
        t.params, t.opt_state = jax.tree_util.tree_unflatten(treedef, new)
        version, internal, gauss = meta["rng"]
        t.rng.setstate((version, tuple(internal), gauss))
        t.generation, t.token_passes, t._prompt_length = meta["generation"], meta["token_passes"], meta["prompt_length"]
        return Progress(meta["generation"], meta["token_passes"], meta["wall_s"], meta["first_steps_s"],
                        meta["last_step"], first)

    def params(self):
        return self.trainer.params

    def train_until(self, target: int, progress: Progress, final: bool = False) -> int:
        steps = 0
        while not progress.reached(target, final):   # Ctrl-C: resume from the last checkpoint (a step is not atomic)
            m = self.trainer.step()
            steps += 1
            progress.add(m["generation"], m["token_passes"], m["seconds"])
        self.checkpoint(progress)
        return steps

    def cleanup(self) -> None:
        self.path.unlink(missing_ok=True)


ARMS = {"es": ESArm, "grpo": GRPOArm}


def run_cell(ctx: Context, cell: dict, run_dir: Path, *, splits: tuple[str, ...], base_eval: dict,
             save, log=print, keep_checkpoints: bool = False) -> int:
    """Trains one cell to ``cell["budget"]`` token-passes, appending an evaluation record
    ``{generation, token_passes, wall_s, first_steps_s, val_accuracy, tune_accuracy}`` (a split not in ``splits``
    is ``None``) to ``cell["records"]`` at 0 (``base_eval``: the untrained model's, identical for every cell), after
    the step that reaches each threshold (:func:`thresholds`), and at the end: the step count whose token-passes are
    nearest the budget (:meth:`Progress.reached`). ``save()`` is called after each. Resumes from the cell's
    checkpoint; each sitting's first step is listed in ``cell["first_steps"]`` (its seconds, jit compilation
    included, go to ``first_steps_s``, not ``wall_s``). A finished cell's checkpoints are deleted unless
    ``keep_checkpoints`` (SmolLM2: 1.6 GB each). Returns the training steps taken."""
    arm = ARMS[cell["method"]](ctx, cell["settings"], cell["seed"], run_dir)
    first = set(cell.get("first_steps", []))
    progress = arm.restore(first)
    records = [r for r in cell["records"] if r["generation"] <= progress.generation]
    if progress.generation == 0:
        records = [{"generation": 0, "token_passes": 0, "wall_s": 0.0, "first_steps_s": 0.0,
                    **{f"{s}_accuracy": base_eval[s] if s in splits else None for s in ("val", "tune")}}]
    cell["records"] = records
    cell["first_steps"] = sorted(first | {progress.generation + 1})   # this sitting's first step
    first.add(progress.generation + 1)
    save()
    steps = 0
    budget = cell["budget"]
    for target in thresholds(budget, cell["eval_every"]):
        final = target == budget
        if records[-1]["generation"] == progress.generation and progress.reached(target, final):
            continue   # evaluated here already
        if not progress.reached(target, final):
            steps += arm.train_until(target, progress, final)
        rec = {"generation": progress.generation, "token_passes": progress.token_passes,
               "wall_s": round(progress.wall_s, 3), "first_steps_s": round(progress.first_steps_s, 3)}
        params = arm.params()
        for s in ("val", "tune"):
            rec[f"{s}_accuracy"] = ctx.evaluate(params, s) if s in splits else None
        records.append(rec)
        save()
        log(f"  {cell['key']}: {rec}")
    cell["done"] = True
    save()
    if not keep_checkpoints:
        arm.cleanup()
    return steps


# ----------------------------------------------------------------------------------------------------------------
# Results: the JSON, the markdown table, the figure
# ----------------------------------------------------------------------------------------------------------------
class Store:
    """The JSON of raw records (``out/h2h.json``), written atomically after every change."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / "h2h.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def final_records(data: dict) -> dict[str, list[dict]]:
    """``{method: [the last record of every finished seed]}``."""
    out = {}
    for method in METHODS:
        cells = data.get("runs", {}).get(method, {})
        out[method] = [c["records"][-1] for c in cells.values() if c.get("done") and c["records"]]
    return out


def selected_records(data: dict) -> dict[str, list[dict]]:
    """``{method: [per finished seed, the record of its best tuning-split evaluation]}``: the checkpoint a user who
    keeps the best state would pick without looking at validation (the highest ``tune_accuracy`` among the cell's
    evaluations, the base model's included; ties: the earliest)."""
    out = {}
    for method in METHODS:
        cells = data.get("runs", {}).get(method, {})
        picked = []
        for c in cells.values():
            recs = [r for r in c.get("records", []) if r.get("tune_accuracy") is not None]
            if c.get("done") and recs:
                picked.append(max(recs, key=lambda r: (r["tune_accuracy"], -r["token_passes"])))
        out[method] = picked
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (``std(ddof=1) / √n``; ``nan`` for one value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def markdown_table(data: dict) -> str:
    """The head-to-head table (method, seeds, final validation accuracy mean ± s.e., the validation accuracy of each
    seed's best tuning-split evaluation (:func:`selected_records`), token-passes, wall-clock), then the tuning
    trials."""
    lines = ["| method | settings | seeds | final validation accuracy (mean ± s.e.) | validation at the best "
             "tuning-split evaluation (mean ± s.e.) | token-passes (mean) | training wall-clock (mean) |",
             "|---|---|---|---|---|---|---|"]
    finals, selected = final_records(data), selected_records(data)

    def acc(recs):
        m, se = mean_se([r["val_accuracy"] for r in recs])
        return f"{100 * m:.1f}% ± {'–' if math.isnan(se) else f'{100 * se:.1f}'}"

    for method in METHODS:
        recs = finals[method]
        cells = [c for c in data.get("runs", {}).get(method, {}).values() if c.get("done")]
        if not recs:
            lines.append(f"| {method.upper()} | | 0 | – | – | – | – |")
            continue
        settings = ", ".join(f"{k}={v:g}" for k, v in sorted(cells[0]["settings"].items()))
        seeds = ", ".join(str(c["seed"]) for c in cells)
        lines.append(f"| {method.upper()} | {settings} | {len(recs)} ({seeds}) | {acc(recs)} | "
                     f"{acc(selected[method])} | {np.mean([r['token_passes'] for r in recs]):.4g} | "
                     f"{np.mean([r['wall_s'] for r in recs]):.0f} s |")
    budget = data.get("run_budget")
    if budget:
        lines.append(f"\nBudget {budget['budget']:.4g} token-passes per run, validation every "
                     f"{budget['eval_every']:.4g}; {len(data.get('problems', {}).get('val', []))} validation problems.")
    tune = data.get("tune", {})
    if tune:
        lines += ["", "| method | trial | settings | tuning accuracy | token-passes |", "|---|---|---|---|---|"]
        for method in METHODS:
            for i, c in sorted(tune.get(method, {}).items(), key=lambda kv: int(kv[0])):
                if not c.get("done"):
                    continue
                r = c["records"][-1]
                chosen = " (chosen)" if data.get("chosen", {}).get(method) == c["settings"] else ""
                settings = ", ".join(f"{k}={v:g}" for k, v in sorted(c["settings"].items()))
                lines.append(f"| {method.upper()} | {i}{chosen} | {settings} | {100 * r['tune_accuracy']:.1f}% | "
                             f"{r['token_passes']:.4g} |")
    return "\n".join(lines) + "\n"


def curves(cells: list[dict], x: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean curve of several seeds against ``x`` (``"token_passes"`` or ``"wall_s"``): point ``k`` is the mean
    validation accuracy of the seeds' ``k``-th evaluations (the base model's, then one at each threshold of the
    budget, where every seed evaluates) at the mean of their ``x``; up to the fewest evaluations among the seeds.

    Seeds cross a threshold a step apart (the final evaluations of three GRPO seeds fell at 547 684, 550 328 and
    550 692 token-passes for a budget of 545 012), so points are matched by their index, not by ``x``."""
    n = min(len(c["records"]) for c in cells)
    xs = np.array([[r[x] for r in c["records"][:n]] for c in cells], float)
    ys = np.array([[r["val_accuracy"] for r in c["records"][:n]] for c in cells], float)
    return xs.mean(axis=0), ys.mean(axis=0)


def plot(data: dict, path: Path) -> None:
    """Two panels: validation accuracy against token-passes and against training wall-clock; per-seed thin lines,
    the mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"es": "tab:blue", "grpo": "tab:orange"}
    for method in METHODS:
        cells = [c for c in data.get("runs", {}).get(method, {}).values() if c["records"]]
        if not cells:
            continue
        for ax, x in zip(axes, ("token_passes", "wall_s")):
            for c in cells:
                ax.plot([r[x] for r in c["records"]], [r["val_accuracy"] for r in c["records"]],
                        color=colors[method], alpha=0.35, lw=1)
            mx, my = curves(cells, x)
            ax.plot(mx, my, color=colors[method], lw=2.5, label=f"{method.upper()} (mean of {len(cells)})")
    axes[0].set_xlabel("model token-passes")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Countdown: EGGROLL vs GRPO at an equal token-pass budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def es_signal(cells_dir: Path) -> list[dict]:
    """How often the ES cells' generations carried a signal, from each cell's ``metrics.jsonl`` (the runner's train
    records under ``cells_dir/<cell>/``; cells whose folder is gone are left out): per cell ``{"cell", "settings",
    "generations", "no_signal"`` (generations in which every antithetic pair tied: a zero gradient),
    ``"flat_group_fraction"`` (mean over generations of the fraction of pairs that tied), ``"ess"`` (median effective
    sample size after shaping)``}``, tuning trials first, then runs, each in name order."""
    rows = []
    for path in sorted(Path(cells_dir).glob("*-es-*/metrics.jsonl"), key=lambda p: (not p.parent.name.startswith(
            "tune"), p.parent.name)):
        train = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
        if not train:
            continue
        cfg = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").exists() else {}
        rows.append({"cell": path.parent.name,
                     "settings": {k: cfg[k] for k in ("population_size", "prompts_per_member", "sigma",
                                                      "learning_rate") if k in cfg},
                     "generations": len(train), "no_signal": int(sum(bool(r["no_signal"]) for r in train)),
                     "flat_group_fraction": float(np.mean([r["flat_group_fraction"] for r in train])),
                     "ess": float(np.median([r["ess"] for r in train]))})
    return rows


def signal_table(rows: list[dict], finished: set[str] | frozenset = frozenset()) -> str:
    """The markdown of :func:`es_signal` (empty when there are no rows); cells not in ``finished`` are marked
    "(running)": their generations so far."""
    if not rows:
        return ""
    lines = ["| ES cell | settings | generations | no-signal generations | tied pairs (mean) | ESS (median) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={v:g}" for k, v in sorted(r["settings"].items()))
        name = r["cell"] if r["cell"] in finished else f"{r['cell']} (running)"
        lines.append(f"| {name} | {settings} | {r['generations']} | {r['no_signal']} "
                     f"({100 * r['no_signal'] / r['generations']:.0f}%) | {100 * r['flat_group_fraction']:.0f}% | "
                     f"{r['ess']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(store: Store) -> tuple[Path, Path]:
    """``h2h.md`` (the table; then, where the ES cells' run folders are present, :func:`signal_table`) and
    ``h2h.png`` (the figure) next to the JSON."""
    md, png = store.out / "h2h.md", store.out / "h2h.png"
    finished = {c["key"] for section in ("tune", "runs") for cells in store.data.get(section, {}).values()
                for c in cells.values() if c.get("done")}
    signal = signal_table(es_signal(store.out / "cells"), finished)
    md.write_text(markdown_table(store.data) + (f"\n{signal}" if signal else ""))
    plot(store.data, png)
    return md, png


__all__ = ["Context", "context", "ESArm", "GRPOArm", "METHODS", "Progress", "SEARCH_SPACE", "Store", "default_settings",
           "es_signal", "markdown_table", "mean_se", "parse_settings", "parse_spec", "plot", "run_cell",
           "sample_settings", "signal_table", "thresholds", "trial_settings", "write_report"]
