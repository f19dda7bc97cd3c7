"""Tasks behind one contract (gma_np.tasks.base.Task), one module per task, and their registry.

    base.py      Batch, the Task contract, the heads as objects, metrics, shared helpers
    lm.py        next-byte language modelling on a byte corpus (gma_np.data): bits per byte
    listops.py   ListOps as the Long Range Arena defines it: 10-class classification
    recall.py    multi-query associative recall (Zoology): accuracy at the answers
    copying.py   selective copying: accuracy at the outputs

Every module defines `NAME`, `spec(seed=0, **params) -> TaskSpec` (what the task is,
checked, before any data exists), `build(seed=0, cache_dir=None, **params) -> Task`, and
its Task class. The training loop knows only the Task contract (docs/tasks.md).
"""

from gma_np._registry import registered_module

from gma_np.tasks.base import Batch, Task, TaskSpec, add_head_grads, body_causal, default_cache_dir

# name -> the module whose `build` makes the task. Imported on first use.
TASKS = {
    "lm": "gma_np.tasks.lm",
    "listops": "gma_np.tasks.listops",
    "recall": "gma_np.tasks.recall",
    "copying": "gma_np.tasks.copying",
}

TASK_NAMES = tuple(TASKS)


def task_module(name):
    """The module of the registered task `name`; ValueError naming the known ones otherwise."""
    return registered_module(TASKS, "task", name)


def task_spec(name, *, seed=0, **params):
    """The TaskSpec of task `name` with these parameters (checked; nothing generated)."""
    return task_module(name).spec(seed=seed, **params)


def get_task(name, *, seed=0, cache_dir=None, **params):
    """The task `name` built from `seed` and its parameters (cache_dir: where generated
    splits are kept; None = generate in memory every time)."""
    return task_module(name).build(seed=seed, cache_dir=cache_dir, **params)


__all__ = ["TASKS", "TASK_NAMES", "task_module", "task_spec", "get_task", "body_causal", "Batch", "Task",
           "TaskSpec", "add_head_grads", "default_cache_dir"]
