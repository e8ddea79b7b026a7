"""Named training configs (frozen dataclasses) and ``field=value`` overrides.

``esx train cartpole population_size=512 sigma=0.1`` starts from :data:`CONFIGS` ``["cartpole"]`` and replaces the
named fields; values are parsed by the field's type (``int``, ``float``, ``bool``: ``true/false/1/0/yes/no``,
``str``; optional fields also take ``none``). Unknown fields are an error that names the nearest valid field.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any


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
    """

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config has unknown field(s) {unknown}")
        return cls(**d)


#: Fields that may differ when a run is resumed (they do not change the training trajectory).
RUN_CONTROL_FIELDS = frozenset({"generations", "target_return", "eval_every", "eval_episodes",
                                "final_eval_episodes", "chunk", "checkpoint_every", "devices", "placement"})

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
}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def get_config(name: str) -> TrainConfig:
    """The named config; an unknown name raises :class:`ConfigError` listing the valid names."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config {name!r}{hint}; valid configs are {sorted(CONFIGS)}")
    return CONFIGS[name]


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    hints = typing.get_type_hints(TrainConfig)
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


def apply_overrides(config: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Returns ``config`` with ``["field=value", ...]`` (strings, parsed) or ``{field: value}`` applied.

    Raises:
      ConfigError: a malformed override, an unknown field (naming the nearest valid one) or a bad value.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
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
        changes[k] = _parse_value(fields[k], v) if isinstance(v, str) and not isinstance(
            fields[k].default, str) else v
    return validate(dataclasses.replace(config, **changes))


def validate(config: TrainConfig) -> TrainConfig:
    """Checks values that would otherwise fail deep inside a jitted function."""
    def bad(msg):
        raise ConfigError(msg)

    if config.strategy not in ("eggroll", "open_es"):
        bad(f"strategy={config.strategy!r}; valid strategies are ['eggroll', 'open_es']")
    if config.optimizer not in ("sgd", "adam"):
        bad(f"optimizer={config.optimizer!r}; valid optimizers are ['adam', 'sgd']")
    if config.action_mode not in ("greedy", "stochastic"):
        bad(f"action_mode={config.action_mode!r}; valid modes are ['greedy', 'stochastic']")
    for name in ("generations", "population_size", "rank", "episodes", "eval_every", "eval_episodes",
                 "final_eval_episodes", "chunk"):
        if getattr(config, name) < 1:
            bad(f"{name}={getattr(config, name)}; must be >= 1")
    if config.population_size % 2:
        bad(f"population_size={config.population_size}; must be even (antithetic pairs)")
    if config.depth < 0 or config.width < 1:
        bad(f"depth={config.depth}, width={config.width}; need depth >= 0 and width >= 1")
    if config.max_steps < 0 or config.checkpoint_every < 0:
        bad("max_steps and checkpoint_every must be >= 0")
    if config.devices < 0:
        bad(f"devices={config.devices}; must be >= 1, or 0 for all devices")
    if config.placement not in ("gather", "reduce"):
        bad(f"placement={config.placement!r}; valid placements are ['gather', 'reduce']")
    if not config.sigma > 0 or not config.learning_rate > 0:
        bad(f"sigma={config.sigma}, learning_rate={config.learning_rate}; both must be > 0")
    return config


def describe() -> str:
    """A help text listing the configs and the fields with their defaults."""
    lines = ["configs:"]
    for name, cfg in CONFIGS.items():
        lines.append(f"  {name:<18}{cfg.env}, N={cfg.population_size}, r={cfg.rank}, σ={cfg.sigma}, "
                     f"{cfg.optimizer} lr={cfg.learning_rate}, MLP {cfg.depth}x{cfg.width}")
    lines.append("\nfields (override with field=value; defaults of the 'custom' base shown):")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        tname = getattr(tp, "__name__", str(tp))
        lines.append(f"  {f.name:<22}{tname:<14}{f.default!r}")
    return "\n".join(lines)
