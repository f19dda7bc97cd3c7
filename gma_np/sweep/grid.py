"""The grid of a sweep: which runs `gma-np compare` trains, named from their settings.

A sweep is a dict (a preset below, or a TOML or JSON file of the same form,
docs/compare.md "The grid format"):

    {"name": "quick",
     "base":  {"model.d_model": 64, ...},          every job: TrainConfig fields, model fields as
                                                   "model.<name>" (or a nested "model" table),
                                                   task parameters as "task_params.<name>"
     "tasks": {"lm": {"preset": "tiny", "steps": 400, ...},  per task: the training preset the
               "listops": {...}},                  job starts from (default: the task's CPU
                                                   preset, tiny for lm) and its own fields
     "grid":  [{"mixer": [...], "task": [...], "seed": [0, 1, 2]},    each table a product of
               {"mixer": ["gma"], "model.n_components": [4, 64], ...}],  axes; tables are joined
     "scaling": {"mixers": [...], "lengths": [256, ..., 4096], ...}}   (gma_np.sweep.scaling)

An axis is any config field: `mixer` (short for model.mixer), `task`, `seed`, a top-level
field (steps, lr, context, ...), "model.<name>" or "task_params.<name>". A value is a list
(one job per value) or a single value. A grid table may carry "exclude": a list of
partial settings ({"mixer": "mamba", "task": "listops"}) whose jobs it leaves out.

A job's config is, later ones winning: the task's preset, "base", "tasks.<task>", the
job's axis values; it is built and checked (gma_np.train.TrainConfig) when the grid
is loaded, so a bad field stops the sweep before anything runs, naming the job.

Names are deterministic: task, mixer, then every other field swept anywhere in the
sweep (sorted, with the job's own value), then the seed, e.g.
`lm-gma-n_components=4-seed0`. Two tables that make the same job make it once.
A job's run directory is <out>/runs/<name>.
"""

import copy
import json
import os
import re
from dataclasses import dataclass, field, fields
from itertools import product

# The keys of a sweep; each is checked, an unknown one is an error naming it.
SWEEP_KEYS = ("name", "base", "tasks", "grid", "scaling")
# Short axis names and the config field each stands for.
AXIS_ALIASES = {"mixer": "model.mixer"}
# Axes that are always part of a job's name, in this order (seed last, after the others).
NAME_FIRST = ("task", "model.mixer")
NAME_LAST = ("seed",)
# Characters kept in a job name; any other becomes "_" (a name is a directory name).
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


class GridError(ValueError):
    """A sweep definition that cannot be used: an unknown key or field, a value of the
    wrong type, a job whose config the trainer refuses. The message names it."""


@dataclass(frozen=True)
class Job:
    """One training run of a sweep."""
    name: str                 # deterministic, from the settings: also the run directory's name
    settings: tuple           # ((field, value), ...): the swept fields' values, in name order
    config: dict              # TrainConfig.to_dict() of the run
    run_dir: str              # absolute: <out>/runs/<name>

    @property
    def group(self):
        """The settings without the seed: the jobs of one table row."""
        return tuple((k, v) for k, v in self.settings if k != "seed")

    @property
    def seed(self):
        return dict(self.settings)["seed"]


@dataclass
class Sweep:
    """A loaded sweep: its jobs in grid order and its scaling measurement (or None)."""
    name: str
    out: str                  # absolute sweep directory
    definition: dict          # the definition it was built from (JSON-able)
    jobs: list = field(default_factory=list)
    axes: tuple = ()          # every swept field, in name order (task, model.mixer, ..., seed)
    scaling: object = None    # gma_np.sweep.scaling.ScalingSpec or None


# ------------------------------------------------------------------ presets

# The model of the quick comparison: a 2-layer, d_model-64 model (about 125k parameters),
# each step of the language model a few hundredths of a second on one core.
_QUICK_MODEL = {"model.d_model": 64, "model.n_heads": 4, "model.head_dim": 16,
                "model.value_dim": 16}
_ALL_MIXERS = ["gma", "softmax", "linear", "performer", "mamba"]

PRESETS = {
    # The test-suite's: 2 mixers x 1 task x 2 seeds, a dozen steps of the `test` training
    # preset each (a second or two per job), and a scaling measurement at toy lengths.
    "test": {
        "name": "test",
        "tasks": {"lm": {"preset": "test", "steps": 12, "eval_interval": 6, "eval_tokens": 256,
                         "checkpoint_interval": 4, "log_interval": 1}},
        "grid": [{"mixer": ["gma", "linear"], "task": ["lm"], "seed": [0, 1]}],
        "scaling": {"mixers": ["gma", "linear"], "lengths": [16, 32, 64], "steps": 2,
                    "model": {"d_model": 16, "n_heads": 2, "head_dim": 8, "value_dim": 8,
                              "n_components": 5}},
    },
    # Under 30 minutes on 2 cores (docs/compare.md gives the measured time): every mixer on
    # the language model (3 seeds, 400 steps of 16 x 128 bytes) and on ListOps (2 seeds,
    # 250 steps of the listops-cpu preset; mamba reads its rows left to right), GMA's K at 4 and 64 beside
    # the default 16, and the scaling measurement from 256 to 8192 tokens (the slopes fitted
    # from 1024 on, where the per-call costs no longer dominate).
    "quick": {
        "name": "quick",
        "base": dict(_QUICK_MODEL),
        "tasks": {"lm": {"preset": "tiny", "batch_size": 16, "steps": 400, "warmup_steps": 40,
                         "eval_interval": 100, "checkpoint_interval": 100, "log_interval": 5},
                  "listops": {"preset": "listops-cpu", "steps": 250, "warmup_steps": 30,
                              "eval_interval": 100, "checkpoint_interval": 100,
                              "log_interval": 5}},
        "grid": [{"mixer": _ALL_MIXERS, "task": ["lm"], "seed": [0, 1, 2]},
                 {"mixer": ["gma"], "task": ["lm"], "model.n_components": [4, 16, 64],
                  "seed": [0, 1, 2]},
                 {"mixer": _ALL_MIXERS, "task": ["listops"], "seed": [0, 1]}],
        "scaling": {"mixers": _ALL_MIXERS, "lengths": [256, 512, 1024, 2048, 4096, 8192],
                    "steps": 5, "fit_from": 1024,
                    "model": {"d_model": 64, "n_heads": 4, "head_dim": 16, "value_dim": 16,
                              "n_components": 16}},
    },
    # The tasks' figures (docs/tasks.md): every mixer on the listops-cpu preset over three
    # seeds (mamba runs its body causally there, the mean pool reading every real token),
    # and associative recall against the number of pairs at fixed K = 16, one seed each,
    # at the recall-cpu preset's full budget. Each is about half an hour of 2 cores.
    "listops": {
        "name": "listops",
        "tasks": {"listops": {"preset": "listops-cpu"}},
        "grid": [{"mixer": _ALL_MIXERS, "task": ["listops"], "seed": [0, 1, 2]}],
    },
    "recall": {
        "name": "recall",
        "tasks": {"recall": {"preset": "recall-cpu"}},
        "grid": [{"mixer": _ALL_MIXERS, "task": ["recall"], "task_params.n_pairs": [2, 4, 8, 16],
                  "seed": [0]}],
    },
    # The paper's comparison, for a larger machine or a cluster (hours of CPU time on
    # 2 cores): every task at its preset's full budget, the tiny model for the language
    # model, 3 seeds, GMA's K from 4 to 64, and the scaling measurement to 8192 tokens.
    "paper": {
        "name": "paper",
        "tasks": {"lm": {"preset": "tiny", "steps": 2000, "eval_interval": 250,
                         "checkpoint_interval": 250},
                  "listops": {"preset": "listops-cpu"},
                  "recall": {"preset": "recall-cpu"},
                  "copying": {"preset": "copying-cpu"}},
        "grid": [{"mixer": _ALL_MIXERS, "task": ["lm", "listops", "recall", "copying"],
                  "seed": [0, 1, 2]},
                 {"mixer": ["gma"], "task": ["lm", "listops", "recall", "copying"],
                  "model.n_components": [4, 8, 16, 32, 64], "seed": [0, 1, 2]}],
        "scaling": {"mixers": _ALL_MIXERS,
                    "lengths": [256, 512, 1024, 2048, 4096, 8192, 16384], "steps": 5,
                    "fit_from": 1024, "model": {"d_model": 128, "n_heads": 4, "head_dim": 32,
                                                "value_dim": 32, "n_components": 16}},
    },
}


# ------------------------------------------------------------------ reading a definition

def read_definition(path):
    """The sweep dict of a .toml or .json file; GridError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise GridError(f"--grid: cannot read {path!r} ({err.strerror or err})") from None
    if path.endswith(".toml"):
        import tomllib
        try:
            d = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise GridError(f"--grid: {path!r} is not valid TOML ({err})") from None
    elif path.endswith(".json"):
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GridError(f"--grid: {path!r} is not valid JSON ({err})") from None
    else:
        raise GridError(f"--grid: expected a .toml or .json file, got {path!r}")
    if not isinstance(d, dict):
        raise GridError(f"--grid: {path!r} holds a {type(d).__name__}, expected a table of "
                        f"{', '.join(SWEEP_KEYS)}")
    d.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return d


def _canonical_field(name, where):
    """The config field an axis or a setting names: "mixer" -> "model.mixer"; checked."""
    from gma_np.train import TrainConfig
    name = AXIS_ALIASES.get(name, name)
    top = [f.name for f in fields(TrainConfig)]
    model = [f.name for f in fields(TrainConfig().model)]
    head, _, rest = name.partition(".")
    ok = ((head in top and head not in ("model", "task_params") and not rest)
          or (head == "model" and rest in model) or (head == "task_params" and rest))
    if not ok:
        import difflib
        known = ([n for n in top if n not in ("model", "task_params")]
                 + [f"model.{n}" for n in model])
        close = difflib.get_close_matches(name, known + ["mixer"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GridError(f"{where}: unknown field {name!r}{hint}; a field is a TrainConfig field, "
                        f"model.<name> or task_params.<name>")
    return name


def _flatten(d, where):
    """{"model": {"d_model": 64}, "steps": 10} -> {"model.d_model": 64, "steps": 10}, checked."""
    if not isinstance(d, dict):
        raise GridError(f"{where}: expected a table of config fields, got {type(d).__name__} {d!r}")
    out = {}
    for key, value in d.items():
        if key in ("model", "task_params") and isinstance(value, dict):
            for k, v in value.items():
                out[_canonical_field(f"{key}.{k}", where)] = v
        else:
            out[_canonical_field(key, where)] = value
    return out


def _nest(flat):
    """{"model.d_model": 64, "task_params.x": 1, "steps": 10} -> preset()'s nested overrides."""
    out = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def _value_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return _UNSAFE.sub("_", str(value))


def _get(config, name):
    """The value of a (dotted) field in a TrainConfig.to_dict()."""
    head, _, rest = name.partition(".")
    return config[head][rest] if rest else config[head]


def _axes_of(table, where):
    """(axes {field: [values]}, excludes [{field: value}]) of one grid table."""
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a table of axes, got {type(table).__name__}")
    axes, excludes = {}, []
    for key, values in table.items():
        if key == "exclude":
            if not isinstance(values, list) or not all(isinstance(e, dict) for e in values):
                raise GridError(f"{where}.exclude: expected a list of tables of settings")
            excludes = [_flatten(e, f"{where}.exclude") for e in values]
            continue
        name = _canonical_field(key, where)
        values = values if isinstance(values, list) else [values]
        if not values:
            raise GridError(f"{where}.{key}: an empty list of values makes no jobs")
        for v in values:
            if isinstance(v, (dict, list)):
                raise GridError(f"{where}.{key}: expected plain values, got {v!r}")
        axes[name] = values
    return axes, excludes


def build_sweep(definition, out):
    """The Sweep of a definition (a preset's dict or a file's), its run directories under
    `out`. Every job's TrainConfig is built here; GridError names what is wrong."""
    from gma_np.train import PRESETS as TRAIN_PRESETS
    from gma_np.train import ConfigError, preset
    from gma_np.sweep.scaling import ScalingSpec
    definition = copy.deepcopy(definition)
    unknown = sorted(set(definition) - set(SWEEP_KEYS))
    if unknown:
        raise GridError(f"sweep: unknown key {unknown[0]!r}; the keys are {', '.join(SWEEP_KEYS)}")
    name = str(definition.get("name", "sweep"))
    base = _flatten(definition.get("base", {}), "base")
    tasks = definition.get("tasks", {})
    if not isinstance(tasks, dict):
        raise GridError(f"tasks: expected a table of tasks, got {type(tasks).__name__}")
    grid = definition.get("grid", [])
    grid = [grid] if isinstance(grid, dict) else grid
    if not isinstance(grid, list) or not grid:
        raise GridError("grid: expected one or more tables of axes ([[grid]] in TOML)")
    tables = [_axes_of(t, f"grid[{i}]") for i, t in enumerate(grid)]
    swept = sorted({a for axes, _ in tables for a in axes} - set(NAME_FIRST) - set(NAME_LAST))
    order = NAME_FIRST + tuple(swept) + NAME_LAST
    short = {}
    for a in swept:                        # the last part of a dotted name, unless two share it
        tail = a.rpartition(".")[2]
        short[a] = tail if sum(b.rpartition(".")[2] == tail for b in swept) == 1 else a
    out = os.path.abspath(out)
    jobs, by_name = [], {}
    for i, (axes, excludes) in enumerate(tables):
        names = list(axes)
        for values in product(*(axes[n] for n in names)):
            setting = dict(zip(names, values))
            if any(all(setting.get(k) == v for k, v in e.items()) for e in excludes):
                continue
            task = setting.get("task", base.get("task", "lm"))
            task_section = tasks.get(task, {})
            if not isinstance(task_section, dict):
                raise GridError(f"tasks.{task}: expected a table of fields")
            task_section = dict(task_section)
            start = task_section.pop("preset", None) or (
                f"{task}-cpu" if f"{task}-cpu" in TRAIN_PRESETS else "tiny")
            if start not in TRAIN_PRESETS:
                raise GridError(f"tasks.{task}.preset: expected one of "
                                f"{', '.join(sorted(TRAIN_PRESETS))}, got {start!r}")
            flat = {**base, **_flatten(task_section, f"tasks.{task}"), **setting, "task": task}
            try:
                cfg = preset(start, **_nest(flat)).to_dict()
            except (ConfigError, TypeError, ValueError) as err:
                where = ", ".join(f"{k}={v!r}" for k, v in setting.items())
                raise GridError(f"grid[{i}] job ({where}): {err}") from None
            settings = tuple((a, _get(cfg, a)) for a in order)
            parts = [_value_text(_get(cfg, "task")), _value_text(_get(cfg, "model.mixer"))]
            parts += [f"{short[a]}={_value_text(_get(cfg, a))}" for a in swept]
            parts.append(f"seed{_get(cfg, 'seed')}")
            job_name = "-".join(parts)
            if job_name in by_name:
                if by_name[job_name].config != cfg:
                    raise GridError(f"grid[{i}]: job {job_name!r} is made twice with different "
                                    f"configs (give the field that differs as an axis)")
                continue
            job = Job(job_name, settings, cfg, os.path.join(out, "runs", job_name))
            by_name[job_name] = job
            jobs.append(job)
    scaling = definition.get("scaling")
    scaling = None if scaling is None else ScalingSpec.from_dict(scaling, "scaling")
    return Sweep(name=name, out=out, definition=definition, jobs=jobs, axes=order,
                 scaling=scaling)


def load_sweep(preset_name=None, grid_file=None, out=None):
    """The Sweep of a named preset or a grid file (one of them), under `out`
    (default runs/compare-<name>)."""
    if grid_file is not None:
        definition = read_definition(grid_file)
    else:
        preset_name = preset_name or "quick"
        if preset_name not in PRESETS:
            raise GridError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset_name!r}")
        definition = PRESETS[preset_name]
    out = out or os.path.join("runs", f"compare-{definition.get('name', 'sweep')}")
    return build_sweep(definition, out)
