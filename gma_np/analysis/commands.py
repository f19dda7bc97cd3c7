"""`gma-np analyze RUN`: the analyses of a trained GMA run, as a Markdown report with figures.

    gma-np analyze RUN [--out DIR] [--windows N] [--seed S] [--compare SOFTMAX_RUN]

Reads the run's checkpoint and its validation split, samples N windows (seed S),
runs gma_np.analysis.report.analyze and writes DIR/report.md (default RUN/analysis)
with PNG figures when matplotlib is installed. --compare adds the attention maps of a
run trained with `--mixer softmax` on the same windows.

Exit status: 0 when the report is written; 2 for a usage error (the parser's); 1 with
one line `gma-np analyze: error: ...` on stderr when the run, its data, the compared
run or the output directory cannot be used.
"""

import os
import sys
import time

import numpy as np

from gma_np.cli import CommandError, fail, nonnegative_int, output_directory, positive_int

# Validation windows of the sample by default: 16 x 128 = 2048 tokens for the tiny
# preset, enough for per-head usage and alignment tables to be stable to about a per
# cent, and the whole analysis stays well inside a minute on 2 cores.
DEFAULT_WINDOWS = 16


def load_run(run_dir):
    """(model, facts) of a run directory: the one function that knows how a run is read.
    facts: step, context (tokens per window), data (the corpus spec), val_fraction."""
    from gma_np.train import restore
    cfg, model, _, _, step, _ = restore(run_dir)
    return model, {"step": int(step), "context": int(cfg.context), "data": cfg.data,
                   "val_fraction": float(cfg.val_fraction)}


def _validation_split(facts):
    from gma_np.train.data import load_corpus
    corpus = load_corpus(facts["data"], facts["val_fraction"])
    return corpus.val, corpus.name


def _user_errors():
    from gma_np.analysis.collect import AnalysisError
    from gma_np.train.checkpoint import CheckpointError
    from gma_np.train.config import ConfigError
    from gma_np.train.data import DataError
    return (AnalysisError, CheckpointError, ConfigError, DataError, CommandError)


def analyze_run(run_dir, out=None, windows=DEFAULT_WINDOWS, seed=0, compare=None, print_fn=print):
    """Write the report of run_dir into `out` (default run_dir/analysis); returns its path."""
    from gma_np.analysis.collect import AnalysisError, collect, is_gma, sample_windows, window_categories
    from gma_np.analysis.report import analyze, write_report
    start = time.perf_counter()
    model, facts = load_run(run_dir)
    if not is_gma(model):
        raise AnalysisError(f"{run_dir!r} is a {model.cfg.mixer!r} run; expected a GMA run "
                            f"(a softmax run goes in --compare)")
    out = os.path.join(run_dir, "analysis") if out is None else out
    output_directory(out, "--out")
    val, corpus_name = _validation_split(facts)
    rng = np.random.default_rng(seed)
    idx, targets, previous = sample_windows(val, facts["context"], windows, rng)
    sample = collect(model, idx, targets)
    attributes, classes = window_categories(idx, previous)
    cfg = model.cfg
    info = {"run": run_dir, "step": facts["step"], "mixer": cfg.mixer, "layers": cfg.n_layers,
            "heads": cfg.n_heads, "K": cfg.n_components, "covariance": cfg.covariance,
            "norm": cfg.norm, "context": facts["context"], "windows": int(idx.shape[0]),
            "data": corpus_name, "seed": seed, "loss_bpb": sample.loss / np.log(2.0)}
    compared, compare_info = None, None
    if compare is not None:
        other, other_facts = load_run(compare)
        if other.cfg.max_len < facts["context"]:
            raise AnalysisError(f"--compare: {compare!r} has context {other.cfg.max_len}, shorter "
                                f"than the {facts['context']} tokens of the analysed run's windows")
        try:
            compared = collect(other, idx)
        except AnalysisError as err:                 # a mixer without queries and keys
            raise AnalysisError(f"--compare: {compare!r}: {err}") from None
        warnings = []
        if other.cfg.mixer != "softmax":
            warnings.append(f"the compared run's mixer is {other.cfg.mixer!r}, not softmax; the map "
                            f"shown is softmax(q k^T / sqrt(d)) of its q and k all the same")
        if other_facts["data"] != facts["data"]:
            warnings.append(f"the compared run was trained on {other_facts['data'] or 'the default corpus'!r}, "
                            f"not on the analysed run's data")
        compare_info = {"run": compare, "mixer": other.cfg.mixer, "step": other_facts["step"],
                        "warning": "; ".join(warnings)}
        for w in warnings:
            print(f"gma-np analyze: warning: {w}", file=sys.stderr)
    results = analyze(sample, attributes, classes, rng=rng, info=info, compare=compared,
                      compare_info=compare_info)
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
    p.add_argument("--windows", type=positive_int, default=DEFAULT_WINDOWS, metavar="N",
                   help=f"validation windows to sample (default {DEFAULT_WINDOWS})")
    p.add_argument("--seed", type=nonnegative_int, default=0, metavar="S",
                   help="seed of the window sample and the perturbations (default 0)")
    p.add_argument("--compare", default=None, metavar="SOFTMAX_RUN",
                   help="a run trained with --mixer softmax on the same data: its attention "
                        "maps beside GMA's affinity")
    p.set_defaults(run=cmd_analyze)
