"""The run config base class: run-control fields, validation, ``field=value`` overrides, JSON round trip.

Every job's config is a frozen dataclass that subclasses :class:`RunConfig`. The base holds the fields the runner
itself reads (``name, seed, generations, eval_every, chunk, checkpoint_every, minutes``); a task adds its own
fields (a subclass may change a base field's default by declaring it again) and checks them in ``validate``,
which runs when the config is constructed, so a config that exists is valid::

    @dataclasses.dataclass(frozen=True)
    class MyConfig(esx.run.RunConfig):
        KIND: ClassVar[str] = "my-task"
        population_size: int = 64

        def validate(self):
            super().validate()
            if self.population_size % 2:
                raise esx.run.ConfigError("population_size must be even")

``to_dict`` / :meth:`RunConfig.from_dict` write and read ``{"kind": KIND, **fields}`` (what ``config.json`` and
every checkpoint store). Values given as text (``esx train cartpole sigma=0.1``) are parsed by the field's type:
``int``, ``float``, ``bool`` (``true/false/1/0/yes/no/on/off``), ``str``; optional fields also take ``none``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A bad config name, field or value (the message says what is valid)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every run has (the runner reads only these).

    Attributes:
      name: the named config this run started from (informational; shown by the progress bar).
      seed: the run's seed; every random draw of the run derives from ``jax.random.key(seed)``
        (see :func:`esx.noise.stream_key`).
      generations: generations to train (the run stops earlier when the task's target is reached).
      eval_every: evaluate the unperturbed parameters every this many generations.
      chunk: generations per call of the task's ``run_chunk`` (logging happens between chunks).
      checkpoint_every: generations between checkpoints (``0``: only at the end, on Ctrl-C and on a time limit).
      minutes: stop this invocation after this many minutes (``0``: no limit); ``resume`` continues exactly.
    """

    #: the job kind stored in ``config.json`` (a task's registered name; see :mod:`esx.run.task`).
    KIND: ClassVar[str] = "custom"
    #: fields that may differ when a run is resumed (they do not change the training trajectory).
    RUN_CONTROL: ClassVar[frozenset] = frozenset({"generations", "eval_every", "chunk", "checkpoint_every",
                                                  "minutes"})

    name: str = "custom"
    seed: int = 0
    generations: int = 200
    eval_every: int = 10
    chunk: int = 10
    checkpoint_every: int = 50
    minutes: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` for values that would otherwise fail deep inside a jitted function."""
        check_positive(self, ("generations", "eval_every", "chunk"))
        if self.checkpoint_every < 0 or self.minutes < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every}, minutes={self.minutes}; "
                              "both must be >= 0")

    def summary(self) -> str:
        """One line for the progress output (tasks override it)."""
        return f"{type(self).__name__} seed={self.seed}"

    def replace(self, **changes) -> "RunConfig":
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """``{"kind": KIND, **fields}`` (JSON-serialisable)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config of a dict written by :meth:`to_dict` (the ``"kind"`` key is ignored; unknown fields are an
        error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "kind"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config has unknown field(s) {unknown} for {cls.__name__}")
        return cls(**d)

    @classmethod
    def run_control_fields(cls) -> frozenset:
        """The fields that may change on resume (the class's :attr:`RUN_CONTROL`)."""
        return cls.RUN_CONTROL


def check_positive(config, names) -> None:
    """Raises :class:`ConfigError` unless every field in ``names`` is ``>= 1``."""
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)}; must be >= 1")


def to_dict(config) -> dict:
    """The config's fields plus ``"kind"`` (JSON-serialisable; what ``config.json`` and checkpoints store)."""
    return {"kind": config.KIND, **dataclasses.asdict(config)}


def field_names(cls: type) -> list[str]:
    """The field names of a config class, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def core_config(config):
    """``config`` with its run-control fields at their class defaults and no name (a memoisation key: two configs
    with the same core train the same trajectory)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return dataclasses.replace(config, name="", **{f: defaults[f] for f in config.RUN_CONTROL if f in defaults})


def parse_value(cls: type, field: dataclasses.Field, text: str) -> Any:
    """``text`` parsed by the type of ``field`` of config class ``cls``; raises :class:`ConfigError`."""
    tp = typing.get_type_hints(cls)[field.name]
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
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form field=value")
            k, v = item.split("=", 1)
            items.append((k.strip().replace("-", "_"), v.strip()))
    changes: dict[str, Any] = {}
    for k, v in items:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {k!r}{hint} (valid fields: {', '.join(fields)})")
        text = isinstance(v, str) and not isinstance(fields[k].default, str)
        changes[k] = parse_value(type(config), fields[k], v) if text else v
    try:
        return dataclasses.replace(config, **changes)
    except TypeError as e:  # a value of the wrong type that a comparison in validate() trips on
        raise ConfigError(f"bad override {changes}: {e}") from None


__all__ = ["ConfigError", "RunConfig", "apply_overrides", "check_positive", "core_config", "field_names",
           "parse_value", "to_dict"]
