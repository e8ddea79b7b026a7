"""The run config base class: run-control fields, validation, ``field=value`` overrides, JSON round trip.

Every job's config is a frozen dataclass that subclasses :class:`RunConfig`. The base holds the fields the runner
itself reads (``name, seed, generations, eval_every, chunk, checkpoint_every, minutes``) and the member batching
every task passes to its strategy (``member_batch``, ``memory_budget``: docs/hyperscale.md); a task adds its own
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
``int``, ``float``, ``bool`` (``true/false/1/0/yes/no/on/off``), ``str``; optional fields also take ``none``; a
field of several types (``member_batch: int | str | None``) takes the first that parses (``8`` an int, ``auto`` a
string).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
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
      member_batch: evaluate and contract the population this many members at a time (docs/hyperscale.md):
        ``None`` (default: all at once), a positive integer dividing ``population_size`` (even with antithetic
        sampling), or ``"auto"``: the largest such value whose predicted peak (:func:`esx.memory_estimate`) fits
        ``memory_budget`` (``None`` when everything fits); the runner prints the estimate at the start and writes
        it to ``summary.json``.
      memory_budget: the bytes ``member_batch="auto"`` may plan for: an integer, or text such as ``"2GiB"``,
        ``"512MB"``, ``"1.5G"``; ``None`` (default): :func:`default_memory_budget` (half of the memory available).
      keep_best: also keep the state of the best evaluation so far (by the task's score and direction; ties keep
        the earlier one) in ``run_dir/best/`` (:func:`esx.run.load_best`); needs a run directory.
    """

    #: the job kind stored in ``config.json`` (a task's registered name; see :mod:`esx.run.task`).
    KIND: ClassVar[str] = "custom"
    #: fields that may differ when a run is resumed (they do not change the training trajectory, or, for
    #: ``member_batch``, change the update only by float summation order: docs/hyperscale.md).
    RUN_CONTROL: ClassVar[frozenset] = frozenset({"generations", "eval_every", "chunk", "checkpoint_every",
                                                  "minutes", "member_batch", "memory_budget", "keep_best"})

    name: str = "custom"
    seed: int = 0
    generations: int = 200
    eval_every: int = 10
    chunk: int = 10
    checkpoint_every: int = 50
    minutes: float = 0.0
    member_batch: int | str | None = None
    memory_budget: int | str | None = None
    keep_best: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises :class:`ConfigError` for values that would otherwise fail deep inside a jitted function."""
        check_positive(self, ("generations", "eval_every", "chunk"))
        if self.checkpoint_every < 0 or self.minutes < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every}, minutes={self.minutes}; "
                              "both must be >= 0")
        mb = self.member_batch
        if not (mb is None or mb == "auto" or (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1)):
            raise ConfigError(f"member_batch={mb!r}; valid values: none (every member at once), 'auto' (the largest "
                              "that fits memory_budget) or a positive integer that divides population_size")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")

    @property
    def memory_budget_bytes(self) -> int:
        """``memory_budget`` in bytes (:func:`default_memory_budget` when it is ``None``)."""
        if self.memory_budget is None:
            return default_memory_budget()
        return parse_bytes(self.memory_budget, "memory_budget")

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


def check_member_batch(config, population_size: int, antithetic: bool = True) -> None:
    """Raises :class:`ConfigError` unless ``config.member_batch`` is ``None``, ``"auto"`` or a valid batch of
    ``population_size`` (a divisor, even with antithetic sampling; the message lists the valid values)."""
    from esx import _members

    if config.member_batch in (None, "auto"):
        return
    try:
        _members.check_member_batch(config.member_batch, population_size, antithetic)
    except ValueError as e:
        raise ConfigError(f"{e} (or 'auto': the largest that fits memory_budget)") from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value: int | str, name: str = "bytes") -> int:
    """A number of bytes from an integer or text: ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"``, ``"800M"``, ``"4096"``
    (``K/M/G/T`` and ``KB/MB/GB/TB`` are powers of 1000, ``KiB/MiB/GiB/TiB`` of 1024). Raises :class:`ConfigError`
    unless the result is a positive number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{name}={value!r}; expected a number of bytes such as 2GiB, 512MB or 1000000 "
                              f"(units: {', '.join(u for u in ('KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))})")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ConfigError(f"{name}={value!r}; must be a positive number of bytes")
    return n


def available_memory() -> int | None:
    """Bytes of memory available now: an accelerator's allocator limit (``memory_stats()["bytes_limit"]`` of the
    first device) when the backend reports one, else the host's ``MemAvailable`` (``/proc/meminfo``), else
    ``os.sysconf`` free pages; ``None`` when nothing says."""
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:   # a backend without memory_stats
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int:
    """The default ``memory_budget``: half of :func:`available_memory` (the rest for the Python process, the data
    outside the step, other programs and XLA's own overhead); 1 GiB when nothing reports it."""
    avail = available_memory()
    return max(avail // 2, 1) if avail else 1 << 30


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
    types_ = [tp]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        types_ = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(types_) < len(typing.get_args(tp))
    if optional and text.lower() in ("none", "null"):
        return None
    for tp in types_:
        try:
            return _parse_one(tp, text)
        except ValueError:
            continue
    extra = " or none" if optional else ""
    names = " or ".join(t.__name__ for t in types_)
    raise ConfigError(f"bad value {text!r} for field {field.name!r}: expected {names}{extra}") from None


def _parse_one(tp: type, text: str) -> Any:
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


__all__ = ["ConfigError", "RunConfig", "apply_overrides", "available_memory", "check_member_batch", "check_positive",
           "core_config", "default_memory_budget", "field_names", "parse_bytes", "parse_value", "to_dict"]
