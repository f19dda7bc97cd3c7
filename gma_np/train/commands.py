"""The `gma-np train`, `gma-np eval` and `gma-np sample` subcommands (thin over gma_np.train).

    gma-np train --preset tiny [--config FILE] [--steps N] [--out DIR] [--seed S] [--data PATH]
                 [--task NAME] [--task-param NAME=VALUE ...] [--resume] [--stop-after N] ...
    gma-np eval DIR [--data PATH] [--tokens N] [--split val|test]
    gma-np sample DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S]

The config of `train` is layered: the preset (--preset, else the file's
"preset", else the task's CPU preset "<task>-cpu" when --task names one, else tiny),
then the --config file (a run's config.json, or any part of it), then the flags;
on --resume without --preset the checkpoint's config takes the preset's place.
`gma-np eval` prints the run's task metric (bits per byte, accuracy); `gma-np
sample` writes text, so only from a language model (task lm).

Arguments are checked by the parser (exit status 2, one line). A run, file or
corpus that cannot be used (CheckpointError, DataError, ConfigError,
TrainingDiverged, an --out that cannot be created) prints one line
`gma-np <command>: error: ...` on stderr and exits with status 1.
"""

import argparse
import sys
import time

from gma_np.cli import (fail, nonnegative_float, nonnegative_int, output_directory, positive_float,
                        positive_int)

def mixer_name(text):
    from gma_np.mixers import MIXER_NAMES
    if text not in MIXER_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MIXER_NAMES)}, got {text!r}")
    return text


def task_name(text):
    from gma_np.tasks import TASK_NAMES
    if text not in TASK_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TASK_NAMES)}, got {text!r}")
    return text


def task_param(text):
    """NAME=VALUE -> (name, value); the value read as JSON (42, 0.5, "mean", null), else as a string."""
    import json
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


# Options of `gma-np train` that override fields of the config: (flag, field, type, help).
# Their default is the preset's (or the --config file's), so the help gives none.
_OVERRIDES = (
    ("--task", "task", task_name, "what is learned: lm, listops, recall or copying; a command "
                                  "line without --preset starts from the task's CPU preset "
                                  "<task>-cpu (tiny for lm)"),
    ("--mixer", "mixer", mixer_name, "the sequence mixer"),
    ("--steps", "steps", positive_int, "total optimizer steps; on --resume a larger value "
                                       "extends the run: the cosine keeps its end and the added "
                                       "steps run at its floor, lr * min_lr_ratio"),
    ("--seed", "seed", nonnegative_int, "seed of the initialisation and the batch order"),
    ("--data", "data", str, "a UTF-8 text file, a WikiText directory or an enwik8 file"),
    ("--lr", "lr", positive_float, "peak learning rate"),
    ("--batch-size", "batch_size", positive_int, "sequences per step"),
    ("--warmup-steps", "warmup_steps", nonnegative_int, "steps of linear warm-up"),
    ("--decay-steps", "decay_steps", nonnegative_int, "the step at which the cosine reaches "
                                                      "lr * min_lr_ratio, 0 = --steps"),
    ("--eval-interval", "eval_interval", positive_int, "validate every this many steps"),
    ("--checkpoint-interval", "checkpoint_interval", positive_int,
     "checkpoint every this many steps"),
)


def _user_errors():
    from gma_np.train.checkpoint import CheckpointError
    from gma_np.train.config import ConfigError
    from gma_np.train.data import DataError
    from gma_np.train.loop import TrainingDiverged
    return (CheckpointError, ConfigError, DataError, TrainingDiverged)


def _preset_name(text):
    from gma_np.train.config import PRESETS
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(sorted(PRESETS))}, got {text!r}")
    return text


def requested_config(args):
    """(TrainConfig or None, run directory) of a `gma-np train` command line.
    None: a plain --resume, which continues with the checkpoint's own config."""
    from gma_np.train.checkpoint import load_checkpoint
    from gma_np.train.config import PRESETS, TrainConfig, check_preset_name, load_config_file, merge
    overrides = {field: getattr(args, field) for _, field, _, _ in _OVERRIDES
                 if getattr(args, field) is not None}
    if args.task_params:
        overrides["task_params"] = dict(args.task_params)
    from_file = load_config_file(args.config) if args.config else {}
    name = args.preset or from_file.get("preset") or default_preset(args.task or from_file.get("task"))
    out = args.out or f"runs/{name}"
    if args.resume and args.preset is None and not from_file and not overrides:
        return None, out
    if args.resume and args.preset is None:
        base = [load_checkpoint(out)[2]["config"]]
    else:
        base = [{"preset": check_preset_name(name)}, PRESETS[name]]
    return TrainConfig.from_dict(merge(*base, from_file, overrides)), out


def default_preset(task):
    """The preset a command line without one starts from: the task's CPU preset, else tiny."""
    from gma_np.train.config import PRESETS
    return f"{task}-cpu" if task and f"{task}-cpu" in PRESETS else "tiny"


def cmd_train(args):
    from gma_np.train.config import schedule_warnings
    from gma_np.train.loop import train
    try:
        cfg, out = requested_config(args)
        if not args.resume:
            output_directory(out, "--out")
        if cfg is not None:
            for line in schedule_warnings(cfg):
                print(f"gma-np train: warning: {line}", file=sys.stderr)
        train(cfg, out, resume=args.resume, stop_after=args.stop_after)
    except _user_errors() as err:
        return fail("train", err)
    return 0


def _load_model(run_dir):
    from gma_np.train.loop import restore
    cfg, model, _, _, step, _ = restore(run_dir)
    return cfg, model, step


def cmd_eval(args):
    from gma_np.cli import CommandError
    from gma_np._threads import blas_threads
    from gma_np.train.config import ConfigError, TrainConfig
    from gma_np.train.evaluate import evaluate_task
    from gma_np.train.loop import build_task
    try:
        blas_threads(1)                             # for the rest of this command
        cfg, model, step = _load_model(args.run_dir)
        if args.data is not None:
            if cfg.task != "lm":
                raise ConfigError(f"--data: the run in {args.run_dir!r} is a {cfg.task!r} run, "
                                  f"which reads no corpus")
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": args.data})
        task = build_task(cfg)
        if args.split not in task.splits:
            raise CommandError(f"--split: task {task.name!r} here has the splits "
                               f"{', '.join(task.splits)}, got {args.split!r}")
        max_examples = max(1, args.tokens // task.seq_len) if args.tokens else 0
        result = evaluate_task(model, task, args.split, max_examples)
    except _user_errors() + (CommandError,) as err:
        return fail("eval", err)
    split = {"val": "validation", "test": "test", "train": "training"}[args.split]
    value = result[task.metric_name]
    if task.name == "lm":
        print(f"{split} bits per byte: {value:.4f}  (step {step}, {task.corpus.name}, "
              f"~{result['count']:,} tokens in windows of {task.seq_len})")
    else:
        base = task.baseline(args.split)
        against = "" if base is None else f"; {base[0]}: {base[1]:.4f}"
        print(f"{split} {task.metric_name.replace('_', ' ')}: {value:.4f}  (step {step}, "
              f"loss {result['loss']:.4f} nats over {result['count']:,} scored targets{against})")
    return 0


def cmd_sample(args):
    import numpy as np

    from gma_np.cli import CommandError
    from gma_np.nn.decode import generate           # the fused decode: evaluate.generate's text
    from gma_np._threads import blas_threads
    try:
        blas_threads(1)                             # for the rest of this command
        cfg, model, _ = _load_model(args.run_dir)
        if cfg.task != "lm":
            what = ("a classifier: it has no token head" if model.head.kind != "token" else
                    "its tokens are the task's symbols, not bytes of text")
            raise CommandError(f"{args.run_dir!r} is a {cfg.task!r} run, {what}; sampling writes "
                               f"text from a language model (task lm)")
        generate(model, args.prompt.encode("utf-8"), 1, temperature=0)   # start-up: Numba loads its kernels
        start = time.perf_counter()
        text = generate(model, args.prompt.encode("utf-8"), args.tokens,
                        temperature=args.temperature, top_k=args.top_k,
                        rng=np.random.default_rng(args.seed))
        seconds = time.perf_counter() - start
    except _user_errors() + (CommandError,) as err:
        return fail("sample", err)
    print(text.decode("utf-8", errors="replace"))
    print(f"{args.tokens} tokens in {seconds:.2f} s after start-up: {args.tokens / seconds:,.0f} tokens/s",
          file=sys.stderr)
    return 0


def add_subcommands(sub):
    """Add train, eval and sample to an argparse subparsers object."""
    from gma_np.train.config import PRESETS
    p = sub.add_parser("train", help="train a small model on the CPU (language modelling or a task)",
                       description="Train (or resume) a small model: a GMA language model by "
                                   "default, any mixer (--mixer) on any task (--task). The config "
                                   "is the preset, then the --config file, then the flags.")
    p.add_argument("--preset", type=_preset_name, default=None,
                   help=f"one of {', '.join(PRESETS)} (default: tiny, or <task>-cpu with --task)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON file in the format of a run's config.json (any subset of its "
                        "fields; nested \"model\" or flat): every field can be set there, "
                        "and the flags below override it")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="pause after N more steps of this command, with a checkpoint; "
                        "--resume continues")
    for flag, field, kind, text in _OVERRIDES:
        default = ("the preset's, the embedded pydoc corpus in every preset" if field == "data"
                   else "the preset's")
        if field == "task":
            p.add_argument(flag, dest=field, type=kind, default=None, metavar="NAME",
                           help=f"{text} (default: the preset's, lm in tiny)")
            continue
        p.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} (default: {default})")
    p.add_argument("--task-param", dest="task_params", type=task_param, action="append",
                   default=None, metavar="NAME=VALUE",
                   help="a parameter of the task, e.g. max_len=100 or n_pairs=16 (repeat for "
                        "more; docs/tasks.md lists them); it overrides the preset's and the file's")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="print the validation metric of a run's checkpoint "
                                    "(bits per byte, accuracy)")
    p.add_argument("run_dir", help="a run directory written by `gma-np train`")
    p.add_argument("--data", default=None, help="evaluate a language model on another corpus "
                                                "(default: the run's)")
    p.add_argument("--tokens", type=nonnegative_int, default=0,
                   help="validation tokens, an integer >= 0, as rows of the task's longest "
                        "(default 0: all)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the split to evaluate (default val; test where the task has one)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run's checkpoint")
    p.add_argument("run_dir", help="a run directory written by `gma-np train`")
    p.add_argument("--prompt", default="", help="text to continue (default: a line break)")
    p.add_argument("--tokens", type=nonnegative_int, default=200,
                   help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8,
                   help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=nonnegative_int, default=0,
                   help="sample among the k likeliest (default 0: all)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(run=cmd_sample)
