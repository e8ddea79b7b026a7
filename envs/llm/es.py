"""The ES fitness for LLM reasoning: EGGROLL members answer prompts, a verifier scores each (member, prompt).

One generation (:meth:`ESTrainer.step`), as in the paper:

1. draw ``n_groups · prompts_per_member`` problems, ``n_groups = population_size / group_size``; group ``g``'s
   ``group_size`` consecutive members all answer the same ``prompts_per_member`` prompts (``evaluate`` with
   ``data_per_group=True``), so antithetic partners and the whole group see identical inputs;
2. every member generates with its low-rank perturbed weights (greedy by default, one jitted call for the whole
   population × prompts, KV cache, stop at ``</answer>`` / end of turn);
3. the host decodes and scores: ``reward[member, prompt] = task.score + format_weight · format_reward``;
   the member's fitness is the mean over its prompts;
4. shaping is the group z-score (subtract the group mean, divide by the global std) and ``tell`` updates the
   weights. ``generations_per_prompt`` reuses the same problems for several generations.

Validation (:func:`evaluate_model`) runs the unperturbed model greedily on a fixed problem set.

Memory: the parameters are stored once; per member the KV cache is ``2 · L · (P + T) · K · d`` floats per prompt
(``P`` prompt length, ``T`` new tokens), e.g. SmolLM2-135M (``L=30, K=3, d=64``) with ``P + T = 128`` in float32:
5.9 MB per (member, prompt), so 64 members × 4 prompts ≈ 1.5 GB; rank-1 noise adds ``(m + n)`` floats per matrix and
member (0.39 M floats per member for SmolLM2 at rank 1, see :func:`noise_floats_per_member`).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import esx
from esx.noise import stream_key
from esx_envs.llm import model as model_lib
from esx_envs.llm.config import LLMConfig
from esx_envs.llm import tasks as tasks_lib

RewardFn = Callable[[tasks_lib.Problem, str], float]


def round_up(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def encode_prompts(tokenizer, problems: Sequence[tasks_lib.Problem], *, chat: bool = True,
                   length: int | None = None, prefill: str = "<think>",
                   system: str | None = tasks_lib.SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids ``int32[B, P]`` (left-padded) and mask ``bool[B, P]`` for the problems (template of
    :func:`tasks.make_prompt`); ``P`` is ``length`` or the longest prompt rounded up to a multiple of 16."""
    texts = [tasks_lib.make_prompt(p.question, chat=chat, prefill=prefill, system=system) for p in problems]
    if length is None:
        length = round_up(max(len(tokenizer.encode(t)) for t in texts))
    return tokenizer.batch(texts, length=length)


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray, *,
                       stop_strings: Sequence[str] = (tasks_lib.ANSWER_STOP,)) -> list[str]:
    """Texts of generated ids ``int[M, T]`` (first ``lengths[m]`` of each), cut after the first stop string."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    out = []
    for row, n in zip(tokens.reshape(-1, tokens.shape[-1]), lengths.reshape(-1)):
        text = tokenizer.decode(row[: int(n)])
        for s in stop_strings:
            i = text.find(s)
            if i >= 0:
                text = text[: i + len(s)]
        out.append(text)
    return out


def default_reward(task, *, format_weight: float = 0.0) -> RewardFn:
    """``task.score(problem, text) + format_weight · format_reward(text)``."""
    def reward(problem, text):
        r = task.score(problem, text)
        return r + format_weight * tasks_lib.format_reward(text) if format_weight else r
    return reward


def evaluate_model(params: Any, *, cfg: model_lib.LlamaConfig, tokenizer, task,
                   problems: Sequence[tasks_lib.Problem], options: model_lib.GenerateOptions,
                   batch_size: int = 16, chat: bool = True, prompt_length: int | None = None,
                   system: str | None = tasks_lib.SYSTEM_PROMPT) -> dict:
    """Greedy accuracy of the (unperturbed) model on ``problems``.

    Returns:
      ``{"accuracy": mean task score, "format": mean format reward, "samples": first three completions}``.
    """
    scores, fmts, samples = [], [], []
    length = prompt_length or encode_prompts(tokenizer, problems, chat=chat, system=system)[0].shape[1]
    for start in range(0, len(problems), batch_size):
        chunk = list(problems[start:start + batch_size])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real)  # fixed shapes: one compilation
        ids, mask = encode_prompts(tokenizer, chunk, chat=chat, length=length, system=system)
        out, lens = model_lib.generate_jit(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                                           cfg=cfg, options=options)
        texts = decode_completions(tokenizer, np.asarray(out)[:n_real], np.asarray(lens)[:n_real])
        for p, t in zip(chunk[:n_real], texts):
            scores.append(task.score(p, t))
            fmts.append(tasks_lib.format_reward(t))
            if len(samples) < 3:
                samples.append(t)
    return {"accuracy": float(np.mean(scores)), "format": float(np.mean(fmts)), "samples": samples}


def pass_at_k(n, c, k: int) -> np.ndarray:
    """The unbiased pass@k estimate ``1 - C(n - c, k) / C(n, k)`` from ``n`` samples of which ``c`` are correct.

    Args:
      n, c: integers or integer arrays of one shape (``0 <= c <= n``, ``n >= k``).
      k: the number of attempts (``1 <= k``).

    Returns:
      ``float64`` of the shape of ``n`` and ``c``: the probability that at least one of ``k`` samples drawn without
      replacement from the ``n`` is correct (1 when ``n - c < k``), computed as the product
      ``1 - Π_{i = n-c+1}^{n} (1 - k / i)`` (no large binomials).
    """
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    if k < 1 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n (k={k})")
    out = np.empty(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        out[idx] = 1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out


def make_rollout_fitness(cfg: model_lib.LlamaConfig, options: model_lib.GenerateOptions, *,
                         temperature: float = 0.0, compute_dtype=None):
    """An esx fitness function ``(view, key, (ids, mask)) -> (0.0, (tokens int32[B, T], lengths int32[B]))``.

    Rewards come from host-side verifiers, so the returned scalar is a placeholder and the generated tokens are
    the ``aux`` output of ``strategy.evaluate(..., has_aux=True)``. ``compute_dtype`` (e.g. ``bfloat16`` over
    float32 master weights): the member view is cast to it first (:func:`model.cast_params`)."""
    def fitness(view, key, data):
        ids, mask = data
        if compute_dtype is not None:
            view = model_lib.cast_params(view, compute_dtype)
        out, lengths = model_lib.generate(view, ids, mask, key, cfg=cfg, options=options, temperature=temperature)
        return jnp.zeros((), jnp.float32), (out, lengths)
    return fitness


def make_optimizer(config: LLMConfig) -> optax.GradientTransformation:
    """The optimizer of an :class:`~esx_envs.llm.config.LLMConfig`: SGD or Adam at ``config.step_size``, then
    :func:`esx.scale_by_path` (``lr_multipliers``) and :func:`esx.anchored_weight_decay` (``anchor_decay``) when
    set (without them it is the bare SGD / Adam transformation)."""
    lr = config.step_size
    opt = optax.sgd(lr) if config.optimizer == "sgd" else optax.adam(lr)
    extra = []
    if config.multipliers:
        extra.append(esx.scale_by_path(config.multipliers))
    if config.anchor_decay:
        extra.append(esx.anchored_weight_decay(config.anchor_decay))
    return optax.chain(opt, *extra) if extra else opt


class ESTrainer:
    """EGGROLL on a verifiable task: :meth:`step` runs one generation, :meth:`validate` scores the unperturbed model.

    Args:
      cfg: model architecture; ``params``: its parameters; ``tokenizer``: a :class:`tokenizer.Tokenizer`;
      task: a :class:`tasks.Task`; ``config``: an :class:`~esx_envs.llm.config.LLMConfig` (its ES and decoding
      fields); ``reward_fn``: ``(problem, text) -> float``
      (default: task score plus ``format_weight`` times the format reward); ``seed``: problems and noise (the
      noise base key is stream ``noise`` of ``jax.random.key(seed)``, generation ``g``'s sampling key stream
      ``data`` at ``g``: see :func:`esx.noise.stream_key`);
      ``prompt_length``: pad prompts to this many tokens (default: the first batch's longest, rounded up to 16;
      it grows, with a recompile, if a later prompt is longer); ``init_state=False``: do not build :attr:`state`
      (the caller keeps its own, e.g. the runner task of :mod:`esx_envs.llm.task`); ``member_batch``: the
      strategy's (docs/hyperscale.md; default: ``config.member_batch`` when it is an integer, else ``None``).
    """

    def __init__(self, *, cfg: model_lib.LlamaConfig, params: Any, tokenizer, task, config: LLMConfig,
                 reward_fn: RewardFn | None = None, seed: int = 0, prompt_length: int | None = None,
                 init_state: bool = True, member_batch: int | None = None):
        self.cfg, self.tokenizer, self.task, self.config = cfg, tokenizer, task, config
        self.reward_fn = reward_fn or default_reward(task, format_weight=config.format_weight)
        self.seed = int(seed)
        self.options = model_lib.GenerateOptions(
            max_new_tokens=config.max_new_tokens, stop_ids=tuple(tokenizer.stop_ids),
            stop_sequences=tokenizer.stop_sequences([tasks_lib.ANSWER_STOP]), pad_id=tokenizer.pad_id)
        opt = make_optimizer(config)
        #: the dtype of the forward passes over float32 master weights (``None``: the parameters' own)
        self.compute_dtype = jnp.bfloat16 if config.master_weights and config.dtype == "bfloat16" else None
        if member_batch is None and isinstance(config.member_batch, int):
            member_batch = config.member_batch
        self.strategy = esx.eggroll(
            population_size=config.population_size, sigma=config.sigma, optimizer=opt, rank=config.rank,
            group_size=config.group_size, shaping="group_z_score",
            labels=model_lib.labels(cfg, freeze_embeddings=config.freeze_embeddings), member_batch=member_batch)
        self.state = (self.strategy.init(stream_key(jax.random.key(seed), "noise"), self.master(params))
                      if init_state else None)
        self.n_groups = config.population_size // config.group_size
        fitness = self.fitness = make_rollout_fitness(cfg, self.options, temperature=config.temperature,
                                                      compute_dtype=self.compute_dtype)
        strategy = self.strategy

        def rollout(state, ids, mask, key):
            _, (out, lengths) = strategy.evaluate(state, fitness, key, (ids, mask), data_per_group=True,
                                                  has_aux=True)
            return out, lengths

        self._rollout = jax.jit(rollout)
        self._tell = jax.jit(strategy.tell)
        self._prompt_length: int | None = prompt_length
        self.generation = 0

    def _encode(self, problems):
        texts = [tasks_lib.make_prompt(p.question, chat=self.config.chat, system=self.config.system)
                 for p in problems]
        need = max(len(self.tokenizer.encode(t)) for t in texts)
        if self._prompt_length is None or need > self._prompt_length:
            self._prompt_length = round_up(need)  # grows rarely (each growth recompiles)
        return self.tokenizer.batch(texts, length=self._prompt_length)

    @property
    def params(self):
        return self.state.params

    def master(self, params: Any) -> Any:
        """The parameters the ES state keeps: float32 copies with ``master_weights`` over a bfloat16 model (exact:
        every bfloat16 value is a float32 value), else ``params`` as they are."""
        return params if self.compute_dtype is None else model_lib.cast_params(params, jnp.float32)

    def problems_for(self, generation: int) -> list:
        """The ``n_groups · prompts_per_member`` problems of ``generation`` (a pure function of the seed and
        ``generation // generations_per_prompt``)."""
        block = int(generation) // self.config.generations_per_prompt
        rng = random.Random(self.seed * 1_000_003 + block)
        return self.task.sample(rng, self.n_groups * self.config.prompts_per_member)

    def run_generation(self, state: esx.State, generation: int) -> tuple[esx.State, dict]:
        """One generation from ``state`` (pure in ``state`` and ``generation``: problems and noise keys derive from
        the seed and ``generation``). Returns the new state and metrics: ``rewards`` ``float32[N]`` (each member's
        fitness), ``reward`` (mean), ``score`` (mean task score), ``format``, ``fitness_std``, ``grad_norm``, the
        population diagnostics of :class:`esx.Metrics` (``tie_fraction``, ``flat_group_fraction``, ...),
        ``sigma``, ``seconds``, ``tokens`` (generated this generation), ``token_passes`` (model token-passes:
        every member's prompt tokens, padding excluded, plus its generated tokens), ``pass_at_1`` and
        ``pass_at_k`` (:func:`pass_at_k` over each member's ``samples_per_prompt`` answers to each prompt, averaged;
        a sample is correct when its task score is 1), ``sample`` (member 0's first text) and ``texts``
        (``[N][prompts_per_member · samples_per_prompt]``, each prompt's samples consecutive)."""
        c = self.config
        t0 = time.perf_counter()
        problems = self.problems_for(generation)
        ids, mask = self._encode(problems)
        k = c.samples_per_prompt
        shape = (self.n_groups, c.prompts_per_member, ids.shape[1])
        ids_g, mask_g = ids.reshape(shape), mask.reshape(shape)
        if k > 1:   # each prompt k times in a row: the k samples of one (member, prompt)
            ids_g, mask_g = np.repeat(ids_g, k, axis=1), np.repeat(mask_g, k, axis=1)
        key = stream_key(jax.random.key(self.seed), "data", generation)
        out, lengths = self._rollout(state, jnp.asarray(ids_g), jnp.asarray(mask_g), key)
        out, lengths = np.asarray(out), np.asarray(lengths)  # [N, B k, T], [N, B k]
        texts = decode_completions(self.tokenizer, out, lengths)
        N, B = c.population_size, c.prompts_per_member
        rewards = np.zeros((N, B, k), np.float32)
        scores = np.zeros((N, B, k), np.float32)
        fmts = np.zeros((N, B, k), np.float32)
        for m in range(N):
            for b in range(B):
                p = problems[(m // c.group_size) * B + b]
                for j in range(k):
                    t = texts[(m * B + b) * k + j]
                    rewards[m, b, j] = self.reward_fn(p, t)
                    scores[m, b, j] = self.task.score(p, t)
                    fmts[m, b, j] = tasks_lib.format_reward(t)
        fitness = rewards.reshape(N, B * k).mean(axis=1)
        correct = (scores >= 1.0).sum(axis=2)
        state, metrics = self._tell(state, jnp.asarray(fitness))
        token_passes = c.group_size * k * int(mask.sum()) + int(lengths.sum())
        return state, {"rewards": fitness, "reward": float(fitness.mean()), "score": float(scores.mean()),
                       "format": float(fmts.mean()), "fitness_std": float(metrics.fitness_std),
                       "grad_norm": float(metrics.grad_norm), "sigma": float(metrics.sigma),
                       **{name: np.asarray(getattr(metrics, name)).item() for name in esx.base.DIAGNOSTICS},
                       "pass_at_1": float(pass_at_k(k, correct, 1).mean()),
                       "pass_at_k": float(pass_at_k(k, correct, k).mean()),
                       "tokens": int(lengths.sum()), "token_passes": token_passes,
                       "seconds": time.perf_counter() - t0, "sample": texts[0],
                       "texts": [texts[m * B * k:(m + 1) * B * k] for m in range(N)]}

    def step(self) -> dict:
        """One generation on :attr:`state`. Returns :meth:`run_generation`'s metrics (without ``rewards``) and the
        new ``generation`` count."""
        self.state, m = self.run_generation(self.state, self.generation)
        self.generation += 1
        m.pop("rewards")
        m.pop("texts")
        return {"generation": self.generation, **m}

    def validate(self, problems: Sequence[tasks_lib.Problem], *, batch_size: int = 16, params: Any = None) -> dict:
        """Greedy accuracy of ``params`` (default: the current unperturbed parameters) (:func:`evaluate_model`)."""
        options = dataclasses.replace(self.options)
        params = self.state.params if params is None else params
        if self.compute_dtype is not None:
            params = model_lib.cast_params(params, self.compute_dtype)
        return evaluate_model(params, cfg=self.cfg, tokenizer=self.tokenizer, task=self.task,
                              problems=problems, options=options, batch_size=batch_size, chat=self.config.chat,
                              system=self.config.system)


def noise_floats_per_member(cfg: model_lib.LlamaConfig, *, rank: int = 1) -> int:
    """Floats of EGGROLL noise one member needs (``r (m + n)`` per matrix, the size of every other leaf)."""
    p = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), cfg))
    labs = esx.make_labels(p, model_lib.labels(cfg))
    total = 0
    for leaf, lab in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(labs)):
        if lab == esx.LOWRANK:
            total += math.prod(leaf.shape[:-2]) * rank * (leaf.shape[-2] + leaf.shape[-1])
        elif lab == esx.FULL:
            total += math.prod(leaf.shape)
    return total
