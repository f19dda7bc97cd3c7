"""The training configuration: one typed dataclass, every default commented, and named presets.

    cfg = preset("tiny")                       # the classroom run: minutes on 2 CPU cores
    cfg = preset("tiny", steps=200, seed=1)    # any field can be overridden, model fields too
    cfg.model                                  # the gma_np.nn.ModelConfig it trains
    TrainConfig.from_dict(json.load(f))        # a run's config.json (nested or the older flat form)

TrainConfig holds the model's shape as one field, `model: ModelConfig`, and the
task as two: `task` (a name of gma_np.tasks.TASKS, "lm" by default) and
`task_params` (its parameters; after the config is built, every one of them with
the defaults filled in, checked by the task's `spec` with errors naming
"task_params.<name>"). The model's `vocab_size` and `max_len` come from the task:
the 256 bytes and the `context` for "lm" (checked equal, as always), the task's
vocabulary and longest row otherwise (max_len at least that). The language model's
corpus stays in the top-level `data`, `val_fraction` and `context` fields (they are
its parameters; another task reads no corpus, so `data` must stay "" there).
A run's config.json is `to_dict()`:

    {"preset": "tiny", "model": {"vocab_size": 256, "max_len": 128, "d_model": 128, ...},
     "context": 128, "data": "", "task": "lm", "task_params": {"dataset": null, ...}, ...}

Runs written before the model was nested have every model field at the top
level ("flat"), and runs written before tasks have no task fields (they are
language models); `from_dict` reads every form, so they resume and evaluate as before.

The defaults are the `tiny` preset (docs/training.md gives its measured time
and validation bits per byte). `test` is the few-second model of the test-suite;
`listops-cpu`, `recall-cpu` and `copying-cpu` are the tasks' CPU presets
(docs/tasks.md gives what they reach).
"""

import difflib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from gma_np.mixers import get_mixer
from gma_np.nn.model import ModelConfig
from gma_np.tasks import TASK_NAMES, task_spec

# Python types a field of each annotated type accepts (an int where a float is expected is fine).
_ACCEPTED = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}

# Bytes: the language model's vocabulary.
VOCAB_SIZE = 256

# The language-model task's parameters kept at the top level of the config (where they
# have always been); its other parameters (dataset, dataset_params) are in task_params.
LM_TOP_FIELDS = ("data", "context", "val_fraction")


class ConfigError(ValueError):
    """A training configuration that cannot be used: an unknown field, a value of the wrong
    type or out of range, a config file that cannot be read. The message names the field."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field holding a value of the wrong type (a TypeError as well as a ConfigError)."""


def _expect_type(name, kind, value):
    ok = (isinstance(value, bool) if kind is bool else
          not isinstance(value, bool) and isinstance(value, _ACCEPTED[kind]))
    if not ok:
        raise ConfigTypeError(f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def _check_types(obj, prefix=""):
    for f in fields(obj):
        if f.type in _ACCEPTED:
            _expect_type(prefix + f.name, f.type, getattr(obj, f.name))
            if f.type is float:
                setattr(obj, f.name, float(getattr(obj, f.name)))


@dataclass
class TrainConfig:
    """Everything that decides a training run's numbers. Two runs with equal
    configs and seeds produce the same parameters bit for bit."""
    preset: str = "tiny"              # name of the preset this config started from (for the record)
    model: ModelConfig = None         # the model's shape; None = ModelConfig's defaults (the tiny model)
    # ---- the task
    task: str = "lm"                  # what is learned: a name of gma_np.tasks.TASKS
    task_params: dict = field(default_factory=dict)   # its parameters (all of them once built)
    # ---- the language model's corpus (task "lm")
    context: int = 128                # N: tokens per training window (= model.max_len)
    data: str = ""                    # "" = the embedded corpus (pydoc_data.topics); else a path
    val_fraction: float = 0.1         # share of a plain text file (or the default corpus) held out, at its end
    # ---- optimisation
    steps: int = 600                  # total optimizer steps (a resume may raise it: docs/training.md)
    batch_size: int = 32              # B: sequences per step (B * context tokens)
    lr: float = 3e-3                  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1         # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50            # linear warm-up steps
    decay_steps: int = 0              # the cosine reaches lr * min_lr_ratio here and stays (0 = steps)
    weight_decay: float = 0.1         # decoupled decay of weight matrices and embeddings only
    beta1: float = 0.9                # AdamW first-moment decay
    beta2: float = 0.99               # AdamW second-moment decay (0.99: small batches, short runs)
    adam_eps: float = 1e-8            # AdamW denominator floor
    grad_clip: float = 1.0            # global gradient-norm clip (0 = off)
    seed: int = 0                     # seeds initialisation and the batch order
    # ---- bookkeeping (may change on --resume: they do not change the numbers)
    eval_interval: int = 100          # validate every this many steps (and at the end)
    eval_tokens: int = 0              # validation tokens per evaluation, in rows of the task's
                                      # longest (context for lm); 0 = the whole split
    checkpoint_interval: int = 100    # write a checkpoint every this many steps (and at the end)
    log_interval: int = 10            # write a training-loss line to log.jsonl every this many steps

    def __post_init__(self):
        _check_types(self)
        for name in ("steps", "batch_size", "context", "eval_interval", "checkpoint_interval",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "decay_steps", "eval_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        spec = self.task_spec()
        self.task_params = {k: v for k, v in spec.params.items() if k not in LM_TOP_FIELDS}
        if self.model is None:
            self.model = ModelConfig(vocab_size=spec.vocab_size, max_len=spec.seq_len)
        if not isinstance(self.model, ModelConfig):
            raise ConfigTypeError(f"model: expected a gma_np.nn.ModelConfig, got "
                                  f"{type(self.model).__name__} {self.model!r}")
        _check_types(self.model, "model.")
        if self.model.vocab_size != spec.vocab_size:
            what = "the trainer reads bytes" if self.task == "lm" else f"task {self.task!r}"
            raise ConfigError(f"model.vocab_size: expected {spec.vocab_size} ({what}), "
                              f"got {self.model.vocab_size!r}")
        if self.task == "lm" and self.model.max_len != self.context:
            raise ConfigError(f"model.max_len: expected the context, {self.context}, got "
                              f"{self.model.max_len!r} (the positional table has one row per "
                              f"training position; set both, or leave max_len out)")
        if self.model.max_len < spec.seq_len:
            raise ConfigError(f"model.max_len: expected at least {spec.seq_len}, the longest row "
                              f"of task {self.task!r}, got {self.model.max_len!r} (leave it out "
                              f"to take the task's)")
        if not spec.causal and not spec.causal_ok and get_mixer(self.model.mixer).causal_only:
            raise ConfigError(f"model.mixer: {self.model.mixer!r} is causal only, and task "
                              f"{self.task!r} with pool={spec.params.get('pool')!r} needs a "
                              f"bidirectional body (its head reads the first token, which a "
                              f"causal body shows only itself); use task_params pool='mean', "
                              f"or another mixer")

    def task_kwargs(self):
        """The keyword arguments of the task's build and spec (gma_np.tasks.get_task):
        task_params, and for "lm" the corpus fields at the top level."""
        if self.task == "lm":
            return {**{name: getattr(self, name) for name in LM_TOP_FIELDS}, **self.task_params}
        return dict(self.task_params)

    def task_spec(self):
        """The task's TaskSpec (gma_np.tasks.base): its parameters checked, vocabulary,
        longest row, causal or not, head. ConfigError naming the field on a bad parameter."""
        if self.task not in TASK_NAMES:
            raise ConfigError(f"task: expected one of {', '.join(TASK_NAMES)}, got {self.task!r}")
        if not isinstance(self.task_params, dict):
            raise ConfigTypeError(f"task_params: expected an object of the task's parameters, "
                                  f"got {type(self.task_params).__name__} {self.task_params!r}")
        if self.task != "lm" and self.data != "":
            raise ConfigError(f"data: task {self.task!r} reads no corpus (its data is generated); "
                              f"expected '', got {self.data!r}")
        misplaced = sorted(set(self.task_params) & set(LM_TOP_FIELDS)) if self.task == "lm" else []
        if misplaced:
            raise ConfigError(f"task_params.{misplaced[0]}: the language model's {misplaced[0]} is "
                              f"a top-level field of the config; set it there")
        try:
            return task_spec(self.task, **self.task_kwargs())
        except (TypeError, ValueError) as err:  # the task's checks; each message starts with the parameter
            raise ConfigError(f"task_params.{err}") from None

    @property
    def schedule_steps(self):
        """The step at which the cosine reaches its floor: decay_steps, or steps when that is 0."""
        return self.decay_steps or self.steps

    def model_config(self):
        """The gma_np.nn.ModelConfig of the run (a copy of `model`)."""
        return replace(self.model)

    def to_dict(self):
        """The nested dict of config.json: {"preset", "model": {ModelConfig fields}, ...}."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """A TrainConfig from a config.json dict: nested ("model": {...}), or the flat form of
        earlier runs (model fields at the top level). Missing fields take the defaults;
        model.max_len defaults to the context. Unknown fields raise ConfigError naming them."""
        top, model = split_fields(d, "config")
        return _build(top, model)


TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "model")
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))


def _with_suggestion(name):
    known = [f"model.{n}" for n in MODEL_FIELDS] if name.startswith("model.") else TRAIN_FIELDS + MODEL_FIELDS
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


def split_fields(d, source):
    """(training fields, model fields) of a config dict, nested or flat; ConfigError on
    unknown fields (naming every one) and on a model field given in both places."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object of config fields, got "
                          f"{type(d).__name__}")
    model = d.get("model")
    if isinstance(model, ModelConfig):
        model = asdict(model)
    elif model is None:
        model = {}
    elif not isinstance(model, dict):
        raise ConfigError(f"{source}: model: expected an object of ModelConfig fields, got "
                          f"{type(model).__name__} {model!r}")
    unknown = sorted(k for k in d if k != "model" and k not in TRAIN_FIELDS and k not in MODEL_FIELDS)
    unknown += sorted(f"model.{k}" for k in model if k not in MODEL_FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown fields {', '.join(map(_with_suggestion, unknown))} "
                          f"(the fields are those of a run's config.json: docs/training.md)")
    flat = {k: v for k, v in d.items() if k in MODEL_FIELDS}
    twice = sorted(set(flat) & set(model))
    if twice:
        raise ConfigError(f"{source}: {', '.join(twice)} given twice, at the top level and "
                          f"in model; keep one")
    top = {k: v for k, v in d.items() if k in TRAIN_FIELDS}
    return top, {**flat, **model}


def _build(top, model):
    cfg = TrainConfig(**top)          # the training fields first, checked under their own names
    # the task's vocabulary and longest row unless the model says otherwise
    model = {"vocab_size": cfg.model.vocab_size, "max_len": cfg.model.max_len, **model}
    for f in fields(ModelConfig):      # before ModelConfig's checks, which take numpy integers too
        if f.name in model and f.type in _ACCEPTED:
            _expect_type(f"model.{f.name}", f.type, model[f.name])
    try:
        model_cfg = ModelConfig(**model)
    except ValueError as err:         # ModelConfig's own value checks; each message starts with the field
        raise ConfigError(f"model.{err}") from None
    return TrainConfig(**top, model=model_cfg)


def merge(*dicts):
    """One config dict from several (nested or flat, later ones win; model fields and
    task_params merged field by field, task_params started afresh where a later dict
    names another task). Raises ConfigError on unknown fields."""
    top, model, task_params = {}, {}, {}
    for d in dicts:
        t, m = split_fields(d, "config")
        if "task" in t and t["task"] != top.get("task", "lm"):
            task_params = {}                   # another task: the earlier ones' parameters do not apply
        given = t.pop("task_params", {})
        if not isinstance(given, dict):
            raise ConfigTypeError(f"task_params: expected an object of the task's parameters, "
                                  f"got {type(given).__name__} {given!r}")
        task_params.update(given)
        top.update(t)
        model.update(m)
    return {**top, "task_params": task_params, "model": model}


def load_config_file(path):
    """The dict of a JSON config file (a run's config.json, or any subset of its fields)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"--config: cannot read {path!r} ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path!r} is not UTF-8 text") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config: {path!r} is not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config: {path!r} holds a JSON {type(d).__name__}, expected an "
                          f"object of config fields")
    split_fields(d, f"--config {path}")           # names unknown fields with the file
    return d


# Fields that do not change the numbers of a run: they may differ on --resume.
BOOKKEEPING_FIELDS = ("eval_interval", "eval_tokens", "checkpoint_interval", "log_interval")
# Fields a resume may change although they change the numbers from the checkpoint on:
# the length of the run and of its schedule (docs/training.md, "Extending a run").
SCHEDULE_FIELDS = ("steps", "decay_steps")

PRESETS = {
    # The classroom run (the defaults): 2 layers, d_model 128, 4 heads, K = 16,
    # a width-4 convolution before each GMA layer, context 128, batch 32, 600 steps.
    # See docs/training.md for its time and bits per byte.
    "tiny": {},
    # The same without the convolution: the plain section-4 GMA block. It learns
    # more slowly per step (docs/training.md, "Why a short convolution").
    "tiny-noconv": dict(model=dict(conv_width=0), steps=1000),
    # The test-suite's model: one layer, d_model 16; a step takes milliseconds.
    "test": dict(model=dict(d_model=16, n_layers=1, n_heads=2, head_dim=8, value_dim=8,
                            n_components=5),
                 context=32, batch_size=4, steps=20, warmup_steps=5, eval_interval=10,
                 eval_tokens=512, checkpoint_interval=10, log_interval=1),
    # The tasks' CPU presets (docs/tasks.md: what each reaches against its baseline, and the
    # time): a 2-layer d_model-64 model, each learning something in under 10 minutes on 2 cores.
    # ListOps at lengths 50..200 (the LRA's generator, shorter rows), bidirectional.
    "listops-cpu": dict(task="listops",
                        task_params=dict(min_len=50, max_len=200, n_train=20_000, n_val=1_000,
                                         n_test=1_000),
                        model=dict(d_model=64, n_heads=4, head_dim=16, value_dim=16),
                        batch_size=32, steps=800, lr=2e-3, eval_interval=100,
                        checkpoint_interval=100),
    # Associative recall: 8 key-value pairs, then the 8 queries, in rows of 64 tokens.
    "recall-cpu": dict(task="recall",
                       task_params=dict(seq_len=64, n_pairs=8, vocab_size=64),
                       model=dict(d_model=64, n_heads=4, head_dim=16, value_dim=16),
                       batch_size=32, steps=2000, lr=2e-3, eval_interval=200,
                       checkpoint_interval=200),
    # Selective copying: 8 tokens of 14 hidden among 64 noise positions.
    "copying-cpu": dict(task="copying",
                        task_params=dict(region_len=64, n_tokens=8, vocab_size=16),
                        model=dict(d_model=64, n_heads=4, head_dim=16, value_dim=16),
                        batch_size=32, steps=3000, lr=2e-3, eval_interval=250,
                        checkpoint_interval=250),
    # A bigger model for a longer run (not timed: docs/training.md reports only the tiny presets).
    "small": dict(model=dict(d_model=192, n_layers=4, n_heads=6, n_components=32), context=256,
                  steps=6000, batch_size=32, lr=2e-3, warmup_steps=200, eval_interval=500,
                  checkpoint_interval=500),
}


def check_preset_name(name):
    if name not in PRESETS:
        raise ConfigError(f"preset: expected one of {', '.join(sorted(PRESETS))}, got {name!r}")
    return name


def preset(name, **overrides):
    """The TrainConfig of a named preset, with any fields overridden (model fields by name,
    e.g. d_model=64, or as model=ModelConfig(...) / model={...})."""
    check_preset_name(name)
    return TrainConfig.from_dict(merge({"preset": name}, PRESETS[name], overrides))


def flat_items(cfg):
    """{name: value} of every field, model fields as "model.<name>", the task's parameters
    as "task_params.<name>"."""
    out = {n: getattr(cfg, n) for n in TRAIN_FIELDS if n != "task_params"}
    out.update({f"task_params.{n}": v for n, v in cfg.task_params.items()})
    out.update({f"model.{n}": getattr(cfg.model, n) for n in MODEL_FIELDS})
    return out


# What a field that one config has and the other does not is shown as.
ABSENT = "(absent)"


def config_differences(a, b, ignore=BOOKKEEPING_FIELDS):
    """[(field, value in a, value in b)] of the fields that differ, the `ignore` ones excepted
    (model fields named "model.<name>", task parameters "task_params.<name>")."""
    fa, fb = flat_items(a), flat_items(b)
    names = list(fa) + [n for n in fb if n not in fa]
    return [(n, fa.get(n, ABSENT), fb.get(n, ABSENT)) for n in names
            if n not in ignore and fa.get(n, ABSENT) != fb.get(n, ABSENT)]


def schedule_warnings(cfg):
    """Lines that warn about a learning-rate schedule that cannot do what its fields suggest."""
    out = []
    if cfg.warmup_steps and cfg.steps <= cfg.warmup_steps:
        out.append(f"steps {cfg.steps} ends inside the warm-up of {cfg.warmup_steps} steps: the "
                   f"learning rate only ramps up, to {cfg.steps / cfg.warmup_steps:.0%} of its "
                   f"peak {cfg.lr:g}, and never decays (raise --steps or lower --warmup-steps)")
    elif cfg.decay_steps and cfg.decay_steps <= cfg.warmup_steps:
        out.append(f"decay_steps {cfg.decay_steps} is inside the warm-up of {cfg.warmup_steps} "
                   f"steps: the learning rate drops to its floor as soon as the warm-up ends")
    return out
