"""Scale-out: one generation with the population sharded over devices (and hosts).

The member axis is split into contiguous blocks of antithetic pairs, one block per device of a mesh axis
(``"pop"`` by default). With ``D`` devices and ``P = N / 2`` pairs (``P = N`` without antithetic sampling) device
``d`` evaluates pairs ``[d·P/D, (d+1)·P/D)``, i.e. members ``[d·N/D, (d+1)·N/D)``. The noise of a member is a pure
function of ``(state.key, leaf, generation, pair)`` (see :mod:`esx.noise`), never of the device that draws it,
so the result does not depend on ``D``.

After evaluation the ``N`` fitness scalars are all-gathered (``4 N`` bytes of payload). The update then has one
of two placements:

* ``"gather"`` (default): every device runs ``strategy.tell`` on the full gathered fitness vector, i.e.
  regenerates all ``P`` noise draws and contracts the whole update redundantly. No parameter-sized traffic;
  from the same fitness vector the new state is bit-identical to :func:`esx.step`'s for any ``D``, every shaping
  and strategy (when the fitness vector itself is the same: docs/distributed.md, "What is bit-identical").
* ``"reduce"``: device ``d`` contracts only its own pairs (``strategy.gradient(..., pairs=local)``), the partial
  estimates are summed with a ``psum`` (one parameter-sized all-reduce), then ``strategy.apply``. ``D`` times
  less contraction work per device, but the summation order differs from one device, so results match
  :func:`esx.step` to float rounding (relative ~1e-7), not bitwise (the integer strategy's tallies: exactly).

The state, the evaluation key and ``data`` are replicated on every device. Multi-host runs use the same
code path: call :func:`initialize_from_env` first thing in every process, build the mesh over
``jax.devices()`` (all processes' devices) and call :func:`sharded_step` identically in every process.

Example (one host, 8 devices)::

    mesh = esx.distributed.make_mesh()                       # all devices on axis "pop"
    for g in range(generations):
        key, k_eval = jax.random.split(key)
        state, metrics = esx.distributed.sharded_step(strategy, state, fitness_fn, k_eval, data, mesh=mesh)
    params = esx.distributed.to_host(state.params)           # numpy, on every process
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from esx.strategy import FitnessFn, Metrics, State, Strategy

PLACEMENTS = ("gather", "reduce")
DEFAULT_AXIS = "pop"


# --------------------------------------------------------------------------------------------------------------
# shard_map across jax versions


def _shard_map(fn, *, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` where it exists, else ``jax.experimental.shard_map.shard_map``; replication unchecked.

    The outputs are replicated by construction (every device computes them from the same all-gathered or
    psummed values), so the static replication check is switched off: its name (``check_vma`` /
    ``check_rep``) and its rules for ``all_gather`` differ between JAX versions.
    """
    new = getattr(jax, "shard_map", None)
    if new is not None:
        return new(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as old  # JAX < 0.6

    return old(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# --------------------------------------------------------------------------------------------------------------
# meshes and placement


def make_mesh(devices: Sequence[jax.Device] | None = None, *, axis: str = DEFAULT_AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: ``jax.devices()``, all processes) named ``axis``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    return Mesh(np.asarray(devices, dtype=object), (axis,))


def pairs_per_device(strategy: Strategy, num_devices: int) -> int:
    """``P / D``: the antithetic pairs (members without antithetic sampling) each device evaluates.

    Raises:
      ValueError: when ``P`` is not a multiple of ``D`` (the population is never silently truncated or padded).
    """
    cfg = strategy.config
    n_pairs = cfg.num_pairs
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices}; must be >= 1")
    if n_pairs % num_devices:
        unit = "antithetic pairs" if cfg.antithetic else "members"
        step = (2 if cfg.antithetic else 1) * num_devices
        lo = max(step, cfg.population_size // step * step)
        raise ValueError(
            f"population_size={cfg.population_size} has {n_pairs} {unit}, which is not divisible by "
            f"{num_devices} devices; use a population_size that is a multiple of {step} "
            f"(e.g. {lo} or {lo + step}) or a device count that divides {n_pairs}"
        )
    return n_pairs // num_devices


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` fully replicated on ``mesh`` (works across processes).

    Leaves that already carry that sharding are returned as they are. In a multi-process run every process
    must pass the same values (as with any replicated input); no check is made.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    multi = jax.process_count() > 1

    def put(x):
        # Exact equality, not `is_equivalent_to`: on one device an uncommitted single-device array is
        # "equivalent" but jit keys its cache on the sharding, so the next call (fed our NamedSharding
        # outputs) would compile a second time.
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if not multi:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = replicate(jax.random.key_data(x), mesh)
            return jax.random.wrap_key_data(data, impl=impl)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array on another mesh
            if not x.is_fully_replicated:
                raise ValueError("replicate: a multi-process array that is not fully replicated")
            x = x.addressable_data(0)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
    """NumPy copies of fully replicated (or single-process) arrays, readable on every process."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("to_host: a multi-process array that is not fully replicated")
            x = x.addressable_data(0)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


# --------------------------------------------------------------------------------------------------------------
# the sharded generation


def _axis_size(axis: str) -> int:
    size = getattr(jax.lax, "axis_size", None)
    return int(size(axis)) if size is not None else int(jax.lax.psum(1, axis))


def _local_pairs(strategy: Strategy, axis: str) -> jax.Array:
    """``int32[P/D]``: the pairs of this device, ``[d·P/D, (d+1)·P/D)`` (inside a map over ``axis``)."""
    per = pairs_per_device(strategy, _axis_size(axis))
    first = jax.lax.axis_index(axis).astype(jnp.int32) * per
    return first + jnp.arange(per, dtype=jnp.int32)


@functools.lru_cache(maxsize=64)
def shard_strategy(strategy: Strategy, *, axis: str = DEFAULT_AXIS, placement: str = "gather") -> Strategy:
    """``strategy`` with ``evaluate``, ``gradient`` and ``tell`` made collective over the mesh axis ``axis``.

    The returned strategy is meant to be called *inside* a map over ``axis`` with replicated state
    (:func:`replicated_map`, or your own ``shard_map``), so that code written against the plain strategy -- e.g. a
    ``lax.scan`` over generations -- runs sharded unchanged:

    * ``evaluate(state, fitness_fn, key, data=None, *, data_per_group=False, data_per_member=False,
      has_aux=False) -> float[N]`` evaluates only this device's ``N/D`` members, then all-gathers: every device
      returns the full fitness vector (and the full ``aux``, leading axis ``N``), in member order. Per-group and
      per-member data stay replicated: each device indexes them by global group / member.
    * ``gradient(state, fitness) -> grads``: ``"gather"`` contracts all pairs on every device; ``"reduce"``
      contracts the local pairs and ``psum``-s the partial estimates over ``axis``.
    * ``tell(state, fitness) = apply(state, gradient(state, fitness), fitness)``.

    ``init``, ``ask``, ``view`` and ``apply`` are unchanged. The result is cached, so calling this again with the
    same arguments returns the same object (no recompilation of jitted code that takes it as a static argument).

    Raises:
      ValueError: unknown ``placement``; at trace time, pairs not divisible by the size of ``axis``.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; valid placements are {PLACEMENTS}")

    def evaluate(state, fitness_fn, key, data=None, *, data_per_group=False, data_per_member=False, has_aux=False,
                 pairs=None):
        if pairs is not None:
            raise ValueError("a sharded strategy chooses each device's pairs itself; do not pass pairs=")
        out = strategy.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group,
                                data_per_member=data_per_member, has_aux=has_aux, pairs=_local_pairs(strategy, axis))
        return jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axis, tiled=True), out)

    def gradient(state, fitness, pairs=None):
        if pairs is not None:
            raise ValueError("a sharded strategy chooses each device's pairs itself; do not pass pairs=")
        if placement == "gather":
            return strategy.gradient(state, fitness)
        partial = strategy.gradient(state, fitness, pairs=_local_pairs(strategy, axis))
        return jax.lax.psum(partial, axis)

    def tell(state, fitness):
        return strategy.apply(state, gradient(state, fitness), fitness)

    return strategy._replace(evaluate=evaluate, gradient=gradient, tell=tell)


def replicated_map(fn, *, mesh: Mesh):
    """``fn`` mapped over ``mesh`` with every argument and result replicated (a ``shard_map``; not jitted).

    Inside ``fn`` the mesh axes are bound, so a :func:`shard_strategy` works there. ``fn``'s results must be
    the same on every device (true when they are computed from all-gathered or psum-med values).
    """
    replicated = PartitionSpec()

    def mapped(*args):
        inner = _shard_map(fn, mesh=mesh, in_specs=(replicated,) * len(args), out_specs=replicated)
        return inner(*args)

    return mapped


def sharded_step(
    strategy: Strategy,
    state: State,
    fitness_fn: FitnessFn,
    key: jax.Array,
    data: Any = None,
    *,
    mesh: Mesh,
    axis: str = DEFAULT_AXIS,
    placement: str = "gather",
    data_per_group: bool = False,
) -> tuple[State, Metrics]:
    """One generation (evaluate + update) with the antithetic pairs sharded over ``mesh`` axis ``axis``.

    The same contract as :func:`esx.step`: ``fitness_fn(view, key, data) -> float[]``, higher is better; ``key``
    is this generation's evaluation key; ``data`` is shared (or, with ``data_per_group=True``, has a leading
    axis of ``population_size / group_size`` groups, indexed by global group). State, key and data are
    replicated on every device of the mesh; the returned state and metrics are replicated too.

    Args:
      strategy: a :class:`esx.Strategy` (static, hashed by identity).
      state: the current :class:`esx.State`.
      fitness_fn: static, hashed by identity: pass the same function object every call.
      key: the evaluation key of this generation.
      data: anything ``fitness_fn`` needs.
      mesh: a :class:`jax.sharding.Mesh` containing ``axis`` (see :func:`make_mesh`); other axes of the mesh
        see the computation replicated.
      axis: the mesh axis the pairs are sharded over.
      placement: ``"gather"`` (every device contracts the full update from the gathered fitness; no
        parameter-sized communication) or ``"reduce"`` (each device contracts its own pairs, partial
        estimates are ``psum``-med: one parameter-sized all-reduce).
      data_per_group: as in :meth:`esx.Strategy.evaluate`.

    Returns:
      ``(new_state, metrics)``, as :func:`esx.step`.

    Raises:
      ValueError: unknown ``placement``, ``axis`` not in the mesh, or pairs not divisible by the axis size.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; valid placements are {PLACEMENTS}")
    if axis not in mesh.shape:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh (axes: {tuple(mesh.shape)})")
    pairs_per_device(strategy, mesh.shape[axis])
    state, key, data = replicate((state, key, data), mesh)
    return _sharded_step(strategy, state, fitness_fn, key, data, mesh=mesh, axis=axis, placement=placement,
                         data_per_group=data_per_group)


@functools.partial(jax.jit, static_argnames=("strategy", "fitness_fn", "mesh", "axis", "placement",
                                             "data_per_group"))
def _sharded_step(strategy, state, fitness_fn, key, data, *, mesh, axis, placement, data_per_group):
    sharded = shard_strategy(strategy, axis=axis, placement=placement)

    def generation(state, key, data):
        fitness = sharded.evaluate(state, fitness_fn, key, data, data_per_group=data_per_group)
        return sharded.tell(state, fitness)

    return replicated_map(generation, mesh=mesh)(state, key, data)


# --------------------------------------------------------------------------------------------------------------
# communication accounting


def communication_bytes(strategy: Strategy, params: Any, num_devices: int, placement: str) -> dict[str, Any]:
    """Bytes communicated per generation by :func:`sharded_step` (analytic; matches the compiled collectives).

    Two sizes per collective: its *payload* (the array it produces on each device, the size the compiled HLO
    shows) and the bytes *each device sends* with the bandwidth-optimal ring algorithm -- all-gather of ``S``
    bytes: ``(D-1)/D · S``; all-reduce of ``S`` bytes: ``2 (D-1)/D · S``.

    Args:
      strategy: the strategy (population size, labels).
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); frozen leaves are not reduced
        (their partial gradient is zero, but the psum still carries it: they are counted).
      num_devices: ``D``.
      placement: ``"gather"`` or ``"reduce"``.

    Returns:
      a dict with ``placement``, ``num_devices``, ``population_size``, ``num_params``,
      ``fitness_allgather_bytes`` (payload, ``4 N``), ``gradient_allreduce_bytes`` (payload, parameter bytes
      for ``"reduce"``, else 0), ``payload_bytes`` (their sum), ``sent_bytes_per_device`` (ring) and
      ``sent_bytes_total`` (``D ×`` that).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; valid placements are {PLACEMENTS}")
    pairs_per_device(strategy, num_devices)
    n_pop = strategy.config.population_size
    leaves = jax.tree_util.tree_leaves(params)
    num_params = sum(math.prod(np.shape(x)) for x in leaves)
    param_bytes = sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves)
    d = num_devices
    fitness_bytes = 4 * n_pop
    grad_bytes = param_bytes if placement == "reduce" else 0
    sent = (d - 1) / d * fitness_bytes + 2 * (d - 1) / d * grad_bytes
    return {
        "placement": placement,
        "num_devices": d,
        "population_size": n_pop,
        "num_params": int(num_params),
        "fitness_allgather_bytes": int(fitness_bytes),
        "gradient_allreduce_bytes": int(grad_bytes),
        "payload_bytes": int(fitness_bytes + grad_bytes),
        "sent_bytes_per_device": int(round(sent)),
        "sent_bytes_total": int(round(sent * d)),
    }


_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Payload bytes of each collective kind in compiled HLO text (``jitted.lower(...).compile().as_text()``).

    The payload of a collective is the size of its result on one device (an all-gather's gathered array, an
    all-reduce's reduced array; XLA may combine several all-reduces into one with a tuple result). Used to
    check :func:`communication_bytes` against what XLA actually emits. Meant for synchronous collectives
    (CPU); the asynchronous ``*-start`` / ``*-done`` pairs of GPU/TPU HLO are not counted.
    """
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        eq = line.find(" = ")
        if not m or not 0 <= eq < m.start():
            continue
        size = 0
        for dtype, dims in _ARRAY.findall(line[eq + 3:m.start()]):  # the result shape (a tuple if combined)
            if dtype not in _ITEMSIZE:
                continue
            size += _ITEMSIZE[dtype] * math.prod(int(v) for v in dims.split(",") if v)
        out[m.group(1)] = out.get(m.group(1), 0) + size
    return out


# --------------------------------------------------------------------------------------------------------------
# multi-host


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where a process sits in a multi-process run.

    Attributes:
      coordinator_address: ``"host:port"`` of process 0's coordinator service (``""`` when JAX chose it).
      num_processes: number of processes.
      process_id: this process, in ``[0, num_processes)``.
      local_device_ids: devices this process drives (``None``: all visible / JAX's default).
      source: which environment the values came from (``"arguments"``, ``"jax"``, ``"slurm"``, ``"torch"``, or
        ``"jax-auto"`` for JAX's own cluster detection).
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "arguments"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9],cpu1" -> "gpu003"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("first_host: empty node list")
    depth = 0
    for i, ch in enumerate(nodelist):  # cut at the first top-level comma
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", nodelist)
    if not m:
        return nodelist
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return first_host(prefix + first + suffix) if "[" in suffix else prefix + first + suffix


def _slurm_port(environ: Mapping[str, str]) -> int:
    job = environ.get("SLURM_JOB_ID", "0")
    return 20000 + int(job) % 20000 if job.isdigit() else 29500


def config_from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """Reads a multi-process configuration from the environment; ``None`` when there is none (one process).

    Sources, first match wins:

    1. JAX's variables: ``JAX_COORDINATOR_ADDRESS`` (``host:port``, or ``host`` plus ``JAX_COORDINATOR_PORT``),
       ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_IDS`` (comma-separated); set by
       ``scripts/launch_local.sh``.
    2. SLURM (``srun``): ``SLURM_NTASKS``, ``SLURM_PROCID``; coordinator = first host of
       ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``), port ``JAX_COORDINATOR_PORT``
       or ``MASTER_PORT`` or ``20000 + SLURM_JOB_ID mod 20000``.
    3. torchrun style: ``MASTER_ADDR``, ``MASTER_PORT`` (default 29500), ``WORLD_SIZE``, ``RANK``.

    A configuration with one process is returned as ``None`` too.
    """
    env = os.environ if environ is None else environ
    cfg = None
    ids = env.get("JAX_LOCAL_DEVICE_IDS")
    local = tuple(int(v) for v in ids.split(",") if v.strip()) if ids else None
    if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env:
        address = env.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            raise ValueError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is not")
        if ":" not in address.rsplit("]", 1)[-1]:
            address = f"{address}:{env.get('JAX_COORDINATOR_PORT', '29500')}"
        cfg = DistributedConfig(address, int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]), local, "jax")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ValueError("SLURM_NTASKS is set but no SLURM_STEP_NODELIST / SLURM_NODELIST")
        port = env.get("JAX_COORDINATOR_PORT") or env.get("MASTER_PORT") or str(_slurm_port(env))
        address = env.get("JAX_COORDINATOR_ADDRESS") or f"{first_host(nodes)}:{port}"
        cfg = DistributedConfig(address, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), local, "slurm")
    elif "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env:
        address = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
        cfg = DistributedConfig(address, int(env["WORLD_SIZE"]), int(env["RANK"]), local, "torch")
    if cfg is None or cfg.num_processes <= 1:
        return None
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id={cfg.process_id} is outside [0, num_processes={cfg.num_processes}) "
                         f"(from the {cfg.source} environment)")
    return cfg


def initialize_from_env(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    auto_detect: bool = False,
    environ: Mapping[str, str] | None = None,
) -> DistributedConfig | None:
    """Calls ``jax.distributed.initialize`` from explicit arguments or the environment (:func:`config_from_env`).

    Call it first thing in every process, before any other JAX call. With one process (no multi-process
    environment and no arguments) it does nothing and returns ``None``; otherwise it returns the
    :class:`DistributedConfig` used. ``cpu_collectives`` sets ``jax_cpu_collectives_implementation``
    (``"gloo"`` makes CPU-only runs work across processes; it does not affect GPU/TPU; ``None`` leaves it).

    ``auto_detect=True``: when neither arguments nor environment describe a multi-process run, call
    ``jax.distributed.initialize()`` without arguments, so JAX's own cluster detection applies (Cloud TPU pods,
    GKE, Open MPI); the returned config then has ``source="jax-auto"``. Do not use it for a plain single-process
    run on a machine without such a cluster: JAX raises there.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("initialize_from_env: pass all of coordinator_address, num_processes, process_id "
                             "(or none, to read the environment)")
        cfg = DistributedConfig(coordinator_address, int(num_processes), int(process_id),
                                None if local_device_ids is None else tuple(local_device_ids), "arguments")
        if cfg.num_processes <= 1:
            return None
    else:
        cfg = config_from_env(environ)
        if cfg is None and auto_detect:
            if cpu_collectives is not None:
                jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
            jax.distributed.initialize()
            return DistributedConfig("", jax.process_count(), jax.process_index(), None, "jax-auto")
        if cfg is None:
            return None
        if local_device_ids is not None:
            cfg = dataclasses.replace(cfg, local_device_ids=tuple(local_device_ids))
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=None if cfg.local_device_ids is None else list(cfg.local_device_ids),
    )
    return cfg


__all__ = [
    "DistributedConfig", "PLACEMENTS", "collective_bytes", "communication_bytes", "config_from_env",
    "first_host", "initialize_from_env", "make_mesh", "pairs_per_device", "replicate", "replicated_map",
    "shard_strategy", "sharded_step", "to_host",
]
