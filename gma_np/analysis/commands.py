"""`gma-np analyze RUN`: the analyses of a trained GMA run, as a Markdown report with figures.

    gma-np analyze RUN [--out DIR] [--windows N] [--seed S] [--compare SOFTMAX_RUN]

Reads the run's checkpoint and builds its task (gma_np.train.build_task: the corpus of
a language model, the generated splits of the others), samples N rows of the validation
split (seed S): random windows of the corpus for a language model, distinct rows of the
task's fixed validation rows with their key mask for the others; runs the body as the
run trained it (gma_np.tasks.body_causal: causal, or bidirectional with the key mask),
then gma_np.analysis.report.analyze, and writes DIR/report.md (default RUN/analysis)
with PNG figures when matplotlib is installed. A classification run (a pooled
classifier head) gets the per-class analysis too. --compare adds the attention maps of
a run trained with `--mixer softmax` on the same task, on the same rows.

Exit status: 0 when the report is written; 2 for a usage error (the parser's); 1 with
one line `gma-np analyze: error: ...` on stderr when the run, its data, the compared
run or the output directory cannot be used.
"""

import os
import sys
import time

import numpy as np

from gma_np.cli import CommandError, fail, nonnegative_int, output_directory, positive_int

# Validation windows of a language model's sample by default: 16 x 128 = 2048 tokens
# for the tiny preset, enough for per-head usage and alignment tables to be stable to
# about a per cent, and the whole analysis stays well inside a minute on 2 cores.
DEFAULT_WINDOWS = 16
# Validation rows of another task's sample by default: a classification task needs
# rows of every class (about 13 per class for ListOps' 10), and the per-class
# baselines permute whole rows, so their spread shrinks only with the number of rows.
DEFAULT_ROWS = 128


def load_run(run_dir, cache_dir=None):
    """(model, task, facts) of a run directory: the one function that knows how a run is
    read. facts: step, cfg (its TrainConfig), causal (how its body runs)."""
    from gma_np.tasks import body_causal
    from gma_np.train import build_task, restore
    cfg, model, _, _, step, _ = restore(run_dir)
    task = build_task(cfg, cache_dir)
    return model, task, {"step": int(step), "cfg": cfg,
                         "causal": body_causal(task, cfg.model.mixer)}


def _user_errors():
    from gma_np.analysis.collect import AnalysisError
    from gma_np.train.checkpoint import CheckpointError
    from gma_np.train.config import ConfigError
    from gma_np.train.data import DataError
    return (AnalysisError, CheckpointError, ConfigError, DataError, CommandError)


def sample_rows(task, n_rows, rng):
    """(batch, categories, previous) of a sample of task's validation split: a Batch
    (tokens, targets, key_mask, loss_mask) and the TaskCategories of its tokens."""
    from gma_np.analysis.categories import byte_categories, task_categories
    from gma_np.analysis.collect import sample_task_rows, sample_windows
    from gma_np.tasks.base import Batch
    if task.name == "lm":
        idx, targets, previous = sample_windows(task.corpus.split("val"), task.context,
                                                n_rows, rng)
        return Batch(idx, targets, None, None), byte_categories(idx, previous)
    batch = sample_task_rows(task, "val", n_rows, rng)
    return batch, task_categories(task, batch.tokens, key_mask=batch.key_mask,
                                  loss_mask=batch.loss_mask)


def _data_of(cfg):
    """What a run was trained on, for the --compare warning (a language model's context
    aside: windows of another length are the same data)."""
    kwargs = {k: v for k, v in cfg.task_kwargs().items() if not (cfg.task == "lm" and k == "context")}
    return cfg.task, kwargs


def _compare(compare, batch, run_cfg):
    """(Sample of the compared run on the batch's rows, compare_info, warnings)."""
    from gma_np.analysis.collect import AnalysisError, collect
    from gma_np.tasks import body_causal
    from gma_np.train import restore
    other_cfg, other, _, _, step, _ = restore(compare)
    N = batch.tokens.shape[1]
    if other.cfg.vocab_size != run_cfg.model.vocab_size:
        raise AnalysisError(f"--compare: {compare!r} has a vocabulary of {other.cfg.vocab_size} "
                            f"tokens, the analysed run {run_cfg.model.vocab_size}: not the same task")
    if other.cfg.max_len < N:
        raise AnalysisError(f"--compare: {compare!r} has context {other.cfg.max_len}, shorter "
                            f"than the {N} tokens of the analysed run's rows")
    causal = body_causal(other_cfg.task_spec(), other.cfg.mixer)
    try:
        compared = collect(other, batch.tokens, causal=causal, key_mask=batch.key_mask)
    except AnalysisError as err:                 # a mixer without queries and keys
        raise AnalysisError(f"--compare: {compare!r}: {err}") from None
    warnings = []
    if other.cfg.mixer != "softmax":
        warnings.append(f"the compared run's mixer is {other.cfg.mixer!r}, not softmax; the map "
                        f"shown is softmax(q k^T / sqrt(d)) of its q and k all the same")
    if _data_of(other_cfg) != _data_of(run_cfg):
        what = (f"{other_cfg.data or 'the default corpus'!r}" if other_cfg.task == "lm" == run_cfg.task
                else f"task {other_cfg.task!r} with {other_cfg.task_kwargs()}")
        warnings.append(f"the compared run was trained on {what}, not on the analysed run's data")
    info = {"run": compare, "mixer": other.cfg.mixer, "step": int(step), "causal": causal,
            "warning": "; ".join(warnings)}
    return compared, info, warnings


def analyze_run(run_dir, out=None, windows=None, seed=0, compare=None, print_fn=print,
                cache_dir=None):
    """Write the report of run_dir into `out` (default run_dir/analysis); returns its path.
    windows: rows of the sample (None: DEFAULT_WINDOWS for a language model, DEFAULT_ROWS
    for another task); cache_dir: where the task's generated splits are kept (None: the
    trainer's default)."""
    from gma_np.analysis.collect import AnalysisError, collect, is_gma
    from gma_np.analysis.report import analyze, write_report
    start = time.perf_counter()
    model, task, facts = load_run(run_dir, cache_dir)
    if not is_gma(model):
        raise AnalysisError(f"{run_dir!r} is a {model.cfg.mixer!r} run; expected a GMA run "
                            f"(a softmax run goes in --compare)")
    out = os.path.join(run_dir, "analysis") if out is None else out
    output_directory(out, "--out")
    if windows is None:
        windows = DEFAULT_WINDOWS if task.name == "lm" else DEFAULT_ROWS
    rng = np.random.default_rng(seed)
    batch, categories = sample_rows(task, windows, rng)
    causal = facts["causal"]
    sample = collect(model, batch.tokens, batch.targets, causal=causal, key_mask=batch.key_mask,
                     loss_mask=batch.loss_mask)
    cfg = model.cfg
    lengths = sample.real.sum(axis=1)
    info = {"run": run_dir, "step": facts["step"], "mixer": cfg.mixer, "layers": cfg.n_layers,
            "heads": cfg.n_heads, "K": cfg.n_components, "covariance": cfg.covariance,
            "norm": cfg.norm, "context": int(batch.tokens.shape[1]),
            "windows": int(batch.tokens.shape[0]), "seed": seed, "task": task.name,
            "causal": causal, "lengths": (int(lengths.min()), int(lengths.max())),
            "tokens": int(lengths.sum()), "loss_nats": sample.loss,
            "loss_bpb": sample.loss / np.log(2.0), "metric_name": task.metric_name,
            "metric": float(task.metric(sample.outputs)),
            "data": task.corpus.name if task.name == "lm" else task.summary()}
    compared, compare_info = None, None
    if compare is not None:
        compared, compare_info, warnings = _compare(compare, batch, facts["cfg"])
        for w in warnings:
            print(f"gma-np analyze: warning: {w}", file=sys.stderr)
    class_names = None
    if getattr(model.head, "kind", None) == "classifier":
        class_names = tuple(str(c) for c in range(model.head.n_classes))
    results = analyze(sample, categories, rng=rng, info=info, compare=compared,
                      compare_info=compare_info, class_names=class_names)
    path = write_report(results, out)
    figures = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    print_fn(f"wrote {path} ({len(figures)} figures) in {time.perf_counter() - start:.1f} s"
             + ("" if figures else '; pip install "gma_np[plot]" for the figures'))
    return path


def cmd_analyze(args):
    from gma_np._threads import blas_threads
    try:
        blas_threads(1)                             # for the rest of this command
        analyze_run(args.run_dir, args.out, args.windows, args.seed, args.compare)
    except _user_errors() as err:
        return fail("analyze", err)
    return 0


def add_subcommand(sub):
    """Add `analyze` to an argparse subparsers object."""
    p = sub.add_parser("analyze", help="analyse a trained GMA run: usage, alignment, affinity, "
                                       "stability, gradients (a Markdown report with figures)",
                       description="Analyse the responsibilities, affinity, routing stability "
                                   "and gradient structure of a trained GMA run on its validation "
                                   "data, per layer and head (docs/analysis.md).")
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by `gma-np train`")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write report.md and its figures (default RUN/analysis)")
    p.add_argument("--windows", type=positive_int, default=None, metavar="N",
                   help=f"validation windows (rows) to sample (default {DEFAULT_WINDOWS} for a "
                        f"language model, {DEFAULT_ROWS} rows for another task)")
    p.add_argument("--seed", type=nonnegative_int, default=0, metavar="S",
                   help="seed of the window sample and the perturbations (default 0)")
    p.add_argument("--compare", default=None, metavar="SOFTMAX_RUN",
                   help="a run trained with --mixer softmax on the same task and data: its "
                        "attention maps beside GMA's affinity")
    p.set_defaults(run=cmd_analyze)
