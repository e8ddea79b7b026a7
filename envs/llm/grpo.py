"""GRPO (group-relative policy optimisation) baseline in JAX + optax, on the same model and tasks as the ES fitness.

One step (:meth:`GRPOTrainer.step`):

1. draw ``prompts_per_step`` problems and sample ``group_size`` completions of each with temperature
   ``temperature`` from the current policy (the same jitted KV-cache generator as ES);
2. rewards ``r[p, g]`` from the same verifiers; advantages ``A[p, g] = (r[p, g] - mean_g r[p]) / (std_g r[p] + ε)``
   (:func:`group_advantages`, population std);
3. ``inner_steps`` optax updates of the clipped surrogate (:func:`clipped_objective`)::

       ρ_t = exp(log π(y_t) - log π_old(y_t))
       L = -1/M Σ_seq 1/|y| Σ_t min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε) A)

   over the completion tokens only (per-sequence token mean, then mean over sequences, as in the GRPO paper; no KL
   term, ``π_old`` is the sampling policy). With ``inner_steps=1`` (on-policy) ``log π_old`` is the training
   forward's own log-probabilities behind a stop-gradient (``ρ = 1``, the same gradient without a separate scoring
   pass); with more inner steps it is one extra forward before the first update.

Token-passes (the compute budget of the head-to-head with ES, docs/llm.md): every token of every sampled
sequence, prompt (padding excluded) and completion, counts 1 forward when it is sampled, 1 when it is scored for
``log π_old`` (``inner_steps > 1`` only) and 3 per optimizer step (a forward, and a backward counted as 2);
:meth:`GRPOTrainer.step` returns the step's ``gen_token_passes`` and the running ``token_passes``.

Memory: backpropagation through ``M = prompts_per_step · group_size`` sequences of ``P + T`` tokens; the logits
alone are ``M (P + T) V`` floats (SmolLM2: 32 × 96 × 49152 × 4 bytes ≈ 0.6 GB), activations ``O(L M (P + T) F)``.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esx_envs.llm import es as es_lib
from esx_envs.llm import model as model_lib
from esx_envs.llm import tasks as tasks_lib


def group_advantages(rewards: jax.Array, *, eps: float = 1e-4) -> jax.Array:
    """``(r - mean) / (std + eps)`` within each group. ``float[P, G] -> float[P, G]`` (population std)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + eps)


def clipped_objective(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, completion_mask: jax.Array,
                      *, clip_eps: float = 0.2) -> jax.Array:
    """The GRPO loss (to minimise).

    Args:
      logp: ``float[M, S]`` log-probabilities of the taken tokens under the current parameters.
      old_logp: ``float[M, S]`` the same under the sampling parameters (no gradient flows through it).
      advantages: ``float[M]`` one per sequence.
      completion_mask: ``bool[M, S]`` which tokens are completion tokens.
      clip_eps: ``ε`` of the ratio clip.

    Returns:
      ``float[]``: ``-mean_seq( Σ_t m_t min(ρ_t A, clip(ρ_t) A) / max(Σ_t m_t, 1) )``.
    """
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    m = completion_mask.astype(jnp.float32)
    per_seq = jnp.sum(surrogate * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return -jnp.mean(per_seq)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of the GRPO baseline.

    Attributes:
      prompts_per_step: problems per step.
      group_size: sampled completions per problem.
      learning_rate: Adam step size.
      clip_eps: ratio clip ``ε``.
      inner_steps: optimizer steps per batch of samples.
      temperature: sampling temperature (must be > 0 for distinct group members).
      max_new_tokens: tokens per completion.
      format_weight: weight of the format reward added to the task score.
      max_grad_norm: global gradient clipping.
      chat: ChatML prompt template.
      system: the system turn of the prompt (``None``: none; see :func:`tasks.make_prompt`).
    """

    prompts_per_step: int = 4
    group_size: int = 8
    learning_rate: float = 1e-5
    clip_eps: float = 0.2
    inner_steps: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 64
    format_weight: float = 0.0
    max_grad_norm: float = 1.0
    chat: bool = True
    system: str | None = tasks_lib.SYSTEM_PROMPT

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("GRPO samples its groups: temperature must be > 0")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")


@functools.partial(jax.jit, static_argnames=("cfg", "clip_eps"))
def _loss_and_grad(params, tokens, mask, completion_mask, old_logp, advantages, *, cfg, clip_eps):
    def loss_fn(p):
        logp = model_lib.token_logprobs(p, tokens, cfg=cfg, mask=mask)
        return clipped_objective(logp, old_logp, advantages, completion_mask, clip_eps=clip_eps)
    return jax.value_and_grad(loss_fn)(params)


@functools.partial(jax.jit, static_argnames=("cfg", "clip_eps"))
def _loss_and_grad_on_policy(params, tokens, mask, completion_mask, advantages, *, cfg, clip_eps):
    def loss_fn(p):
        logp = model_lib.token_logprobs(p, tokens, cfg=cfg, mask=mask)
        return clipped_objective(logp, jax.lax.stop_gradient(logp), advantages, completion_mask, clip_eps=clip_eps)
    return jax.value_and_grad(loss_fn)(params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, tokens, mask, *, cfg):
    return model_lib.token_logprobs(params, tokens, cfg=cfg, mask=mask)


class GRPOTrainer:
    """GRPO on a verifiable task; same interface as :class:`es.ESTrainer` (``step``, ``validate``, ``params``)."""

    def __init__(self, *, cfg: model_lib.LlamaConfig, params: Any, tokenizer, task, config: GRPOConfig,
                 reward_fn: es_lib.RewardFn | None = None, seed: int = 0):
        self.cfg, self.tokenizer, self.task, self.config = cfg, tokenizer, task, config
        self.reward_fn = reward_fn or es_lib.default_reward(task, format_weight=config.format_weight)
        self.rng = random.Random(seed)
        self.options = model_lib.GenerateOptions(
            max_new_tokens=config.max_new_tokens, stop_ids=tuple(tokenizer.stop_ids),
            stop_sequences=tokenizer.stop_sequences([tasks_lib.ANSWER_STOP]), pad_id=tokenizer.pad_id)
        self.optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                                     optax.adam(config.learning_rate))
        self.params = params
        self.opt_state = self.optimizer.init(params)
        self._apply = jax.jit(self._apply_impl)
        self._prompt_length: int | None = None
        self.generation = 0
        #: model token-passes so far (see the module docstring)
        self.token_passes = 0

    def _apply_impl(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(self) -> dict:
        """One GRPO step. Returns ``reward``, ``score``, ``format``, ``loss``, ``seconds``, ``tokens`` (generated),
        ``gen_token_passes`` (this step's model token-passes) and ``token_passes`` (their running sum)."""
        c = self.config
        t0 = time.perf_counter()
        problems = self.task.sample(self.rng, c.prompts_per_step)
        texts = [tasks_lib.make_prompt(p.question, chat=c.chat, system=c.system) for p in problems]
        need = max(len(self.tokenizer.encode(t)) for t in texts)
        if self._prompt_length is None or need > self._prompt_length:
            self._prompt_length = es_lib.round_up(need)
        ids, mask = self.tokenizer.batch([t for t in texts for _ in range(c.group_size)],
                                         length=self._prompt_length)
        key = jax.random.key(self.rng.randrange(2**31))
        out, lengths = model_lib.generate_jit(self.params, jnp.asarray(ids), jnp.asarray(mask), key, cfg=self.cfg,
                                              options=self.options, temperature=c.temperature)
        out, lengths = np.asarray(out), np.asarray(lengths)
        completions = es_lib.decode_completions(self.tokenizer, out, lengths)
        rewards = np.zeros((c.prompts_per_step, c.group_size), np.float32)
        scores, fmts = np.zeros_like(rewards), np.zeros_like(rewards)
        for i, t in enumerate(completions):
            p = problems[i // c.group_size]
            rewards.flat[i] = self.reward_fn(p, t)
            scores.flat[i] = self.task.score(p, t)
            fmts.flat[i] = tasks_lib.format_reward(t)
        adv = group_advantages(rewards).reshape(-1)
        T = out.shape[1]
        gen_mask = np.arange(T)[None, :] < lengths[:, None]
        tokens = jnp.asarray(np.concatenate([ids, out], axis=1))
        full_mask = jnp.asarray(np.concatenate([mask, gen_mask], axis=1))
        # targets are tokens[:, 1:]; completion targets start at column P - 1
        comp_mask = jnp.asarray(np.concatenate([np.zeros_like(mask[:, 1:]), gen_mask], axis=1))
        loss = jnp.zeros(())
        if c.inner_steps == 1:
            loss, grads = _loss_and_grad_on_policy(self.params, tokens, full_mask, comp_mask, adv, cfg=self.cfg,
                                                   clip_eps=c.clip_eps)
            self.params, self.opt_state = self._apply(self.params, self.opt_state, grads)
        else:
            old_logp = _logprobs(self.params, tokens, full_mask, cfg=self.cfg)
            for _ in range(c.inner_steps):
                loss, grads = _loss_and_grad(self.params, tokens, full_mask, comp_mask, old_logp, adv,
                                             cfg=self.cfg, clip_eps=c.clip_eps)
                self.params, self.opt_state = self._apply(self.params, self.opt_state, grads)
        seq = int(mask.sum()) + int(lengths.sum())   # prompt (unpadded) + completion tokens of every sequence
        passes = seq * (1 + (1 if c.inner_steps > 1 else 0) + 3 * c.inner_steps)
        self.token_passes += passes
        self.generation += 1
        return {"generation": self.generation, "reward": float(rewards.mean()), "score": float(scores.mean()),
                "format": float(fmts.mean()), "loss": float(loss), "tokens": int(lengths.sum()),
                "gen_token_passes": passes, "token_passes": self.token_passes,
                "seconds": time.perf_counter() - t0, "sample": completions[0]}

    def validate(self, problems: Sequence[tasks_lib.Problem], *, batch_size: int = 16) -> dict:
        """Greedy accuracy of the current parameters (:func:`es.evaluate_model`)."""
        return es_lib.evaluate_model(self.params, cfg=self.cfg, tokenizer=self.tokenizer, task=self.task,
                                     problems=problems, options=self.options, batch_size=batch_size,
                                     chat=self.config.chat, system=self.config.system)
