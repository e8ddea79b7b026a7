"""esx.run: the task-agnostic runner (extra ``driver``: orbax, tqdm, matplotlib).

Any fitness gets the progress bar, ``metrics.jsonl`` / ``metrics.csv``, the learning-curve PNG, orbax
checkpoints, exact resume, time and target stops and the final evaluation::

    import esx, esx.run
    task = esx.run.fitness_task(esx.run.RunConfig(generations=200), strategy, params, fitness, data)
    result = esx.run.train(task, "runs/mine")                 # again with resume=True continues exactly

* :mod:`esx.run.config` -- :class:`RunConfig` (the run-control fields every job has), overrides, :class:`ConfigError`;
* :mod:`esx.run.task` -- :class:`Setup` (what a task provides), :class:`RunState`, :func:`fitness_task`, chunk
  helpers, and the task registry (entry-point group ``esx.tasks``);
* :mod:`esx.run.checkpoint` -- atomic, verified, versioned checkpoints; :mod:`esx.run.records` -- logs and plots;
* :mod:`esx.run.loop` -- :func:`train`, :func:`load_run`.

orbax, tqdm and matplotlib are imported inside the functions that use them: importing this package needs only the
engine's dependencies. The runner never imports a task; tasks (``esx_envs``) import it.
"""
from esx.run.checkpoint import FORMAT_VERSION, CheckpointError, list_checkpoints, load_checkpoint, restore_run, \
    save_checkpoint
from esx.run.config import ConfigError, RunConfig, apply_overrides, core_config, to_dict
from esx.run.loop import Result, evaluate_run_summary, load_best, load_run, train
from esx.run.records import plot_learning_curve, read_metrics
from esx.run.task import ENTRY_POINT_GROUP, MemoryPlan, RunState, Setup, choose_member_batch, chunk_capacity, \
    config_from_dict, data_key, device_chunk, eval_key, fitness_task, host_chunk, make_setup, task_class, task_classes

__all__ = ["ENTRY_POINT_GROUP", "FORMAT_VERSION", "CheckpointError", "ConfigError", "MemoryPlan", "Result",
           "RunConfig", "RunState", "Setup", "apply_overrides", "choose_member_batch", "chunk_capacity",
           "config_from_dict", "core_config", "data_key", "device_chunk", "eval_key", "evaluate_run_summary",
           "fitness_task", "host_chunk", "list_checkpoints", "load_best", "load_checkpoint", "load_run", "make_setup",
           "plot_learning_curve", "read_metrics", "restore_run", "save_checkpoint", "task_class", "task_classes",
           "to_dict", "train"]
