"""Full-state checkpoints of a run: atomic, verified, and readable across esx versions.

A checkpoint is the folder ``run_dir/checkpoints/gen_<generation>`` holding the :class:`~esx.run.RunState`'s
arrays (written by orbax, PRNG keys as their key data) and ``meta.json``: the format version, the generation, the
run id, the config and a sha256 of the arrays. It is written to a temporary folder and renamed into place; the
previous checkpoint is kept. :func:`restore_run` refuses a checkpoint of another run, of a different config (only
the config's ``RUN_CONTROL`` fields may change) or of a newer format, and names the intact previous checkpoint when
the newest one is corrupt.

Format versions: ``0`` (no ``format`` field; written before the engine/application split) and ``1`` (today) have
the same layout, so both are read.

Orbax runs its reads and writes as asyncio tasks in a fresh event loop that it closes as soon as its coroutine
returns, and a save commits in background threads. When one tensorstore read of a corrupt checkpoint failed, the
sibling reads were still in flight and later posted to the closed loop (``RuntimeError: Event loop is closed``
tracebacks after, or into, the one-line error of ``esx train --resume``); a Ctrl-C during a save left the commit
threads writing into the temporary folder being removed. Every orbax call here therefore runs inside
:func:`_orbax_io`, which leaves nothing of orbax running however the call ends (success, an exception,
``KeyboardInterrupt``): its event loops finish their pending tasks before they close, and the block waits for the
orbax threads started inside it; the checkpointer itself is closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from esx.run.config import to_dict
from esx.run.task import RunState, Setup

#: the version written into ``meta.json`` (``"format"``); readers accept this and every older one.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, from another run, another config or a newer format)."""


_CKPT_DIR = "checkpoints"
_PREFIX = "gen_"
_KEEP = 2


#: seconds a closing orbax event loop waits for its pending tasks before cancelling them.
_DRAIN_TIMEOUT = 30.0
_policy_lock = threading.Lock()
_policy_users = 0
_policy_saved = None


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """What ``asyncio.run`` does before closing its loop, for a loop that orbax closes itself: runs ``loop`` (stopped,
    not closed) until its pending tasks are done (cancelling what is left after ``_DRAIN_TIMEOUT`` seconds; their
    exceptions marked retrieved), then shuts down its async generators and its default executor's threads."""
    if loop.is_closed() or loop.is_running():
        return
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if tasks:
        _, rest = loop.run_until_complete(asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT))
        for t in rest:
            t.cancel()
        if rest:
            loop.run_until_complete(asyncio.wait(rest, timeout=_DRAIN_TIMEOUT))
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()
    loop.run_until_complete(loop.shutdown_asyncgens())
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), _DRAIN_TIMEOUT))
    except asyncio.TimeoutError:
        pass


def _orbax_threads() -> set[threading.Thread]:
    """Threads of orbax's own classes (the background commits of a save) that have not ended.

    ``threading.enumerate()`` lists a thread until its ``run`` has returned; ``is_alive()`` and ``join()`` are not
    used because a Ctrl-C that interrupts a ``join`` of a running thread can mark it stopped while it still runs.
    """
    return {t for t in threading.enumerate() if type(t).__module__.startswith("orbax.")}


def _wait_for(threads: set[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while threads & set(threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def _quiet_interrupts(loop, context):
    """The loop's exception handler: a Ctrl-C (or SIGTERM, or ``sys.exit``) inside orbax's coroutine already reaches
    the caller; its task is not reported again as "Task exception was never retrieved" when it is collected."""
    if isinstance(context.get("exception"), (KeyboardInterrupt, SystemExit)):
        return
    loop.default_exception_handler(context)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)               # the policy API is deprecated from Python 3.14
    _PolicyBase = getattr(asyncio, "AbstractEventLoopPolicy", object)


class _DrainingPolicy(_PolicyBase):
    """The installed event loop policy, except that its new loops :func:`_drain` themselves before closing."""

    def __init__(self, inner):
        self._inner = inner

    def get_event_loop(self):
        return self._inner.get_event_loop()

    def set_event_loop(self, loop):
        self._inner.set_event_loop(loop)

    def new_event_loop(self):
        loop = self._inner.new_event_loop()
        close = loop.close

        def drain_then_close():
            try:
                _drain(loop)
            except Exception:  # noqa: BLE001 -- cleanup only: never hide the error orbax is raising
                pass
            finally:
                close()

        try:
            loop.close = drain_then_close
        except AttributeError:  # a loop type without instance attributes (uvloop): left as it is
            pass
        loop.set_exception_handler(_quiet_interrupts)
        return loop

    def get_child_watcher(self):  # Unix, Python < 3.14 (the base class would raise NotImplementedError)
        return self._inner.get_child_watcher()

    def set_child_watcher(self, watcher):
        self._inner.set_child_watcher(watcher)

    def __getattr__(self, name):  # anything else a newer policy has
        return getattr(self._inner, name)


@contextlib.contextmanager
def _orbax_io():
    """Orbax calls inside leave nothing running when the block ends, however it ends.

    Event loops created meanwhile (orbax makes one per call, and one in each background commit thread) drain before
    they close (:func:`_drain`), and on the way out the block waits (up to ``_DRAIN_TIMEOUT`` seconds) for the
    orbax threads started inside it: a save interrupted by Ctrl-C or an error has stopped writing before its
    temporary folder is removed. The event loop policy is process-wide, so it is installed by the first thread to
    enter and put back by the last to leave.
    """
    global _policy_users, _policy_saved
    policy = hasattr(asyncio, "set_event_loop_policy")   # the policy API is deprecated from 3.14, due to go in 3.16
    if policy:
        with _policy_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if _policy_users == 0:
                _policy_saved = asyncio.get_event_loop_policy()
                asyncio.set_event_loop_policy(_DrainingPolicy(_policy_saved))
            _policy_users += 1
    before = _orbax_threads()
    try:
        yield
    finally:
        try:
            _wait_for(_orbax_threads() - before, _DRAIN_TIMEOUT)
        finally:
            if policy:
                with _policy_lock, warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    _policy_users -= 1
                    if _policy_users == 0:
                        asyncio.set_event_loop_policy(_policy_saved)
                        _policy_saved = None


def _to_host(state: RunState) -> list[np.ndarray]:
    leaves = jax.tree_util.tree_leaves(state)
    out = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _from_host(template: RunState, arrays: list[np.ndarray]) -> RunState:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves):
        raise CheckpointError(f"checkpoint has {len(arrays)} arrays, this config's state has {len(leaves)}")
    out = []
    for i, (t, a) in enumerate(zip(leaves, arrays)):
        is_key = jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
        want = jax.random.key_data(t) if is_key else t
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(f"checkpoint array {i} has shape {a.shape} {a.dtype}, expected "
                                  f"{want.shape} {want.dtype}")
        arr = jnp.asarray(a)
        out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(t)) if is_key else arr)
    return jax.tree_util.tree_unflatten(treedef, out)


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (a folder counts once its ``meta.json`` exists)."""
    root = Path(run_dir) / _CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def save_checkpoint(run_dir: str | os.PathLike, state: RunState, config, run_id: str, *, keep: int = _KEEP,
                    extra: dict | None = None) -> Path:
    """Writes ``state`` to ``run_dir/checkpoints/gen_<generation>`` atomically; keeps the previous one.

    The arrays go through orbax into a temporary folder together with ``meta.json`` (config, generation, run id,
    a sha256 of the arrays, and ``extra`` when given); the folder is then renamed into place and checkpoints older
    than the last ``keep`` (default 2) are removed. If anything fails, the temporary folder is removed and the
    existing checkpoints are untouched.
    """
    import orbax.checkpoint as ocp

    root = Path(run_dir).absolute() / _CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    gen = state.generation
    final = root / f"{_PREFIX}{gen:08d}"
    tmp = root / f".tmp-{_PREFIX}{gen:08d}-{uuid.uuid4().hex[:8]}"
    arrays = _to_host(state)
    try:
        with _orbax_io(), ocp.PyTreeCheckpointer() as checkpointer:  # nothing of orbax left running after
            checkpointer.save(tmp / "state", {f"a{i:04d}": a for i, a in enumerate(arrays)})
        meta = {"format": FORMAT_VERSION, "generation": gen, "run_id": run_id, "config": to_dict(config),
                "num_arrays": len(arrays), "sha256": _digest(arrays), "time": time.time(), **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, template: RunState) -> tuple[RunState, dict]:
    """Reads one checkpoint folder into a state shaped like ``template``; verifies the arrays' sha256.

    Raises:
      CheckpointError: missing, truncated or corrupt data.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({e})") from None
    version = meta.get("format", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this esx reads format versions "
                              f"0 to {FORMAT_VERSION} (upgrade esx to read it)")
    try:
        with _orbax_io(), ocp.PyTreeCheckpointer() as checkpointer:  # see the module docstring
            restored = checkpointer.restore(path / "state")
        arrays = [np.asarray(restored[f"a{i:04d}"]) for i in range(meta["num_arrays"])]
    except Exception as e:  # orbax raises many types for truncated / garbled files
        raise CheckpointError(f"checkpoint {path} is unreadable: {type(e).__name__}: {str(e)[:300]}") from None
    if _digest(arrays) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the sha256 in meta.json")
    return _from_host(template, arrays), meta


def _config_diff(a: dict, b: dict, run_control: frozenset) -> list[str]:
    """The fields that differ between the saved config ``a`` and the current ``b`` (a saved config written before
    kinds existed has no ``"kind"``: it is compared on its fields only)."""
    a = {"kind": b.get("kind"), **a}
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in run_control and k != "name" and a.get(k) != b.get(k)]


def restore_run(run_dir: str | os.PathLike, setup: Setup, run_id: str | None) -> tuple[RunState, dict]:
    """The newest checkpoint of ``run_dir`` for ``setup.config``.

    Raises:
      CheckpointError: no checkpoint; a checkpoint written by another run (``run_id`` differs) or with a different
        config (the differing fields are named); a corrupt newest checkpoint (the message names the intact previous
        one, which is left in place).
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"nothing to resume: {Path(run_dir) / _CKPT_DIR} holds no checkpoint")
    newest = ckpts[-1]
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError) as e:
        meta = None
        err = CheckpointError(f"checkpoint {newest} has no readable meta.json ({e})")
    if meta is not None:
        if run_id is not None and meta.get("run_id") != run_id:
            raise CheckpointError(
                f"checkpoint {newest} belongs to another run (run id {meta.get('run_id')!r}, this run directory "
                f"is {run_id!r}); copy checkpoints only together with their run directory")
        now = to_dict(setup.config)
        run_control = setup.config.RUN_CONTROL
        diff = _config_diff(meta.get("config", {}), now, run_control)
        if diff:
            saved = {"kind": now.get("kind"), **meta["config"]}
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume {run_dir} with a different config ({detail}); only "
                                  f"{sorted(run_control)} may change on resume")
        try:
            return load_checkpoint(newest, setup.initial_state())
        except CheckpointError as e:
            err = e
    previous = [str(p) for p in ckpts[:-1]]
    hint = (f"; the previous checkpoint {previous[-1]} is intact: delete {newest} to resume from it"
            if previous else "; there is no earlier checkpoint")
    raise CheckpointError(f"{err}{hint}")



__all__ = ["FORMAT_VERSION", "CheckpointError", "list_checkpoints", "load_checkpoint", "restore_run",
           "save_checkpoint"]
