"""The EGG task of ``esx train``: :class:`EggRunConfig` (kind ``"egg"``) and its :class:`esx.run.Setup`.

One generation: the ``N / group_size`` groups read ``streams_per_member`` streams of ``length`` bytes each
(:class:`esx_envs.egg.text_data.Streams`, a pure function of the generation), every member continues from its
carried hidden state (``RunState.carry: int8[N, B, L, D]``, reset at document boundaries), fitness is its integer
``Σ log2 p · 4096``. Per-generation records add ``train_bpb`` (the population's mean bits/byte on its bytes),
``alpha`` and ``changed_fraction``; evaluations report ``valid_bpb`` on the validation subset (the final one on the
whole split) and the final one adds a 200-byte sample (key: stream ``eval``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from esx import int_eggroll as ie
from esx.noise import stream_key
from esx.run import ConfigError, MemoryPlan, RunConfig, RunState, Setup, choose_member_batch, core_config, eval_key, \
    host_chunk
from esx.run.config import check_member_batch, check_positive
from esx_envs.egg import text_data
from esx_envs.egg.model import LL_FRAC, EggConfig, bits_per_byte, init_params, initial_hidden, labels, \
    make_fitness, make_generation, sample

#: bits/byte of simple models of the shipped tinyshakespeare validation split (drawn in the learning curve).
SHAKESPEARE_REFERENCES = (("unigram 4.83", 4.83), ("bigram 3.59", 3.59))


@dataclasses.dataclass(frozen=True)
class EggRunConfig(RunConfig):
    """An integer-only EGG language model trained by integer EGGROLL on bytes (truncated ES).

    Attributes (grouped; the run-control fields are :class:`esx.run.RunConfig`'s, ``chunk``: generations
    between progress updates):
      data: a text file or folder (``""``: the shipped tinyshakespeare); first 90% train, last 10% validation.
      dim, layers: the model (:class:`esx_envs.egg.EggConfig`; ``dim`` a power of 4).
      population_size: ``N`` members (even: antithetic pairs).
      group_size: consecutive members reading the same data stream (a multiple of 2).
      streams_per_member, length: each member reads this many streams of ``length`` bytes per generation; the
        hidden state is carried to the next generation (reset at document boundaries).
      sigma_shift: σ = 2^-sigma_shift.
      alpha, alpha_decay: z-test level ``α_t = alpha / (alpha_decay · t + 1)`` of the ±1 update.
      eval_streams, eval_length: the validation subset used while training (bits/byte).
      final_eval_streams: the final validation uses the whole split cut into this many streams.
      target_bpb: stop once validation bits/byte is at or below this (``None``: never).
    """

    KIND: ClassVar[str] = "egg"
    RUN_CONTROL: ClassVar[frozenset] = RunConfig.RUN_CONTROL | {"target_bpb", "eval_streams", "eval_length",
                                                                "final_eval_streams"}

    generations: int = 8000
    eval_every: int = 100
    checkpoint_every: int = 500
    data: str = ""
    dim: int = 64
    layers: int = 1
    population_size: int = 256
    group_size: int = 2
    streams_per_member: int = 1
    length: int = 50
    sigma_shift: int = 4
    alpha: float = 0.1
    alpha_decay: float = 0.003
    eval_streams: int = 16
    eval_length: int = 1024
    final_eval_streams: int = 64
    target_bpb: float | None = None

    def validate(self) -> None:
        super().validate()
        check_positive(self, ("population_size", "group_size", "streams_per_member", "length", "eval_streams",
                              "eval_length", "final_eval_streams"))
        if self.population_size % self.group_size or self.group_size % 2:
            raise ConfigError(f"group_size={self.group_size}; must be even and divide "
                              f"population_size={self.population_size}")
        if self.streams_per_member * self.length > 20000:
            raise ConfigError(f"streams_per_member * length = {self.streams_per_member * self.length}; must be "
                              "<= 20000 (the int32 log-likelihood sum of a member)")
        if not 0 <= self.sigma_shift <= 15:
            raise ConfigError(f"sigma_shift={self.sigma_shift}; must be in [0, 15]")
        if not 0 < self.alpha < 1 or self.alpha_decay < 0:
            raise ConfigError(f"alpha={self.alpha}, alpha_decay={self.alpha_decay}; need 0 < alpha < 1 and "
                              "alpha_decay >= 0")
        dim = self.dim
        if dim < 4 or dim & (dim - 1) or (dim.bit_length() - 1) % 2 or self.layers < 1:
            raise ConfigError(f"dim={dim}, layers={self.layers}; dim must be a power of 4 (16, 64, 256, ...) and "
                              "layers >= 1")
        check_member_batch(self, self.population_size)

    def summary(self) -> str:
        return (f"EGG int8 D={self.dim} L={self.layers} on {self.data or 'tinyshakespeare'}, integer EGGROLL "
                f"N={self.population_size} σ=2^-{self.sigma_shift} α={self.alpha} (decay {self.alpha_decay}), "
                f"{self.streams_per_member}x{self.length} bytes per member")

    def setup(self) -> Setup:
        """The :class:`esx.run.Setup` of this config (data, strategy and jitted generation built once per
        process for each :func:`esx.run.core_config`)."""
        return egg_setup(self)


def egg_setup(config: EggRunConfig) -> Setup:
    """The :class:`esx.run.Setup` of an :class:`EggRunConfig`."""
    plan = _member_batch(config)
    strategy, ecfg, split, streams, step = _parts(core_config(config), plan.member_batch)
    groups, b = config.population_size // config.group_size, config.streams_per_member

    def initial_state():
        run_key = jax.random.key(config.seed)
        params = init_params(stream_key(run_key, "params"), ecfg)
        es_state = strategy.init(stream_key(run_key, "noise"), params)
        return RunState(es_state, initial_hidden(config.population_size, b, ecfg), run_key)

    def generation(state):
        tok, res = streams.batch(state.generation)
        es_state, hidden, metrics = step(state.es, state.carry, jnp.asarray(tok.reshape(groups, b, -1)),
                                         jnp.asarray(res.reshape(groups, b, -1)))
        return RunState(es_state, hidden, state.key), metrics

    def evaluate(state, final: bool):
        if final:
            bpb = bits_per_byte(state.es.params, split.valid, config=ecfg, streams=config.final_eval_streams)
            text = sample(state.es.params, "ROMEO:", 200, jax.random.fold_in(eval_key(state), 1),
                          config=ecfg, temperature=0.8)
            return {"valid_bpb": bpb, "sample": text}, None
        return {"valid_bpb": bits_per_byte(state.es.params, split.valid, config=ecfg, streams=config.eval_streams,
                                           length=config.eval_length)}, None

    def train_extra(m, i):
        return {"train_bpb": -float(m.fitness_mean[i]) / (1 << LL_FRAC) / (b * config.length),
                "alpha": float(m.alpha[i]), "changed_fraction": float(m.changed_fraction[i])}

    return Setup(config, strategy, host_chunk(generation), initial_state, evaluate, score="valid_bpb",
                 higher_is_better=False, target=config.target_bpb, fitness_name="fitness", train_extra=train_extra,
                 plot_keys=("train_bpb",), ylabel="bits per byte",
                 references=SHAKESPEARE_REFERENCES if not config.data else (), memory=plan)


def _member_batch(config: EggRunConfig) -> MemoryPlan:
    """The :class:`esx.run.MemoryPlan` of ``config.member_batch`` (``"auto"``: the generation of
    :func:`esx_envs.egg.model.make_generation` estimated from shapes: per-member streams and hidden states)."""
    if config.member_batch != "auto":
        return MemoryPlan(config.member_batch)
    ecfg = EggConfig(dim=config.dim, layers=config.layers)
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), ecfg))
    strategy = ie.int_eggroll(population_size=config.population_size, sigma_shift=config.sigma_shift,
                              alpha=config.alpha, alpha_decay=config.alpha_decay, group_size=config.group_size,
                              labels=labels(shapes))
    run_key = jax.random.key(config.seed)
    state = jax.eval_shape(strategy.init, stream_key(run_key, "noise"), shapes)
    n, b, t = config.population_size, config.streams_per_member, config.length
    data = {"tokens": jax.ShapeDtypeStruct((n, b, t + 1), jnp.int32),
            "resets": jax.ShapeDtypeStruct((n, b, t), jnp.bool_),
            "hidden": jax.ShapeDtypeStruct(initial_hidden(n, b, ecfg).shape, jnp.int8)}
    return choose_member_batch(config, strategy, state, make_fitness(ecfg), stream_key(run_key, "noise"), data,
                               data_per_member=True, has_aux=True)


@functools.lru_cache(maxsize=4)
def _parts(core: EggRunConfig, member_batch: int | None = None):
    ecfg = EggConfig(dim=core.dim, layers=core.layers)
    split = text_data.load_split(core.data or None)
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), ecfg))
    strategy = ie.int_eggroll(population_size=core.population_size, sigma_shift=core.sigma_shift, alpha=core.alpha,
                              alpha_decay=core.alpha_decay, group_size=core.group_size, labels=labels(shapes),
                              member_batch=member_batch)
    groups = core.population_size // core.group_size
    streams = text_data.Streams(split.train, split.train_starts, num_streams=groups * core.streams_per_member,
                                length=core.length, seed=core.seed)
    return strategy, ecfg, split, streams, make_generation(strategy, ecfg)


__all__ = ["SHAKESPEARE_REFERENCES", "EggRunConfig", "egg_setup"]
