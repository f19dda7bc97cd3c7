"""The `gma-np train`, `gma-np eval` and `gma-np sample` subcommands (thin over gma_np.train).

    gma-np train --preset tiny [--steps N] [--out DIR] [--seed S] [--data PATH] [--resume]
    gma-np eval DIR [--data PATH] [--tokens N]
    gma-np sample DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S]

Only argparse is imported at the top: the trainer loads when a command runs.
A user error (bad checkpoint, bad data path, mismatched config, divergence)
prints one line `gma-np <command>: error: ...` and exits with status 1.
"""

import sys

# Options of `gma-np train` that override fields of the preset: (flag, field, type, help).
_OVERRIDES = (
    ("--steps", "steps", int, "total optimizer steps"),
    ("--seed", "seed", int, "seed of the initialisation and the batch order"),
    ("--data", "data", str, "a UTF-8 text file, a WikiText directory or an enwik8 file "
                            "(default: the embedded pydoc corpus)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--batch-size", "batch_size", int, "sequences per step"),
    ("--eval-interval", "eval_interval", int, "validate every this many steps"),
    ("--checkpoint-interval", "checkpoint_interval", int, "checkpoint every this many steps"),
)


def _fail(command, err):
    print(f"gma-np {command}: error: {err}", file=sys.stderr)
    return 1


def _user_errors():
    from gma_np.train.checkpoint import CheckpointError
    from gma_np.train.data import DataError
    from gma_np.train.loop import TrainingDiverged
    return (CheckpointError, DataError, TrainingDiverged, ValueError, TypeError)


def cmd_train(args):
    from gma_np.train.config import TrainConfig, preset
    from gma_np.train.loop import train
    from gma_np.train.checkpoint import load_checkpoint
    try:
        overrides = {field: getattr(args, field) for _, field, _, _ in _OVERRIDES
                     if getattr(args, field) is not None}
        out = args.out or f"runs/{args.preset or 'tiny'}"
        if args.resume:
            if args.preset is None and not overrides:
                cfg = None                                         # the checkpoint's own config
            else:
                base = (preset(args.preset).to_dict() if args.preset
                        else load_checkpoint(out)[2]["config"])
                cfg = TrainConfig.from_dict({**base, **overrides})
        else:
            cfg = preset(args.preset or "tiny", **overrides)
        train(cfg, out, resume=args.resume)
    except _user_errors() as err:
        return _fail("train", err)
    return 0


def _load_model(run_dir):
    from gma_np.train.loop import restore
    cfg, model, _, _, step, _ = restore(run_dir)
    return cfg, model, step


def cmd_eval(args):
    from gma_np.train.data import load_corpus
    from gma_np.train.evaluate import evaluate_bpb
    from gma_np.ops._threads import blas_threads
    try:
        blas_threads(1)                             # for the rest of this command
        cfg, model, step = _load_model(args.run_dir)
        corpus = load_corpus(cfg.data if args.data is None else args.data, cfg.val_fraction)
        bpb = evaluate_bpb(model, corpus.val, cfg.context, args.tokens)
    except _user_errors() as err:
        return _fail("eval", err)
    n = len(corpus.val) - 1 if not args.tokens else min(args.tokens, len(corpus.val) - 1)
    print(f"validation bits per byte: {bpb:.4f}  (step {step}, {corpus.name}, "
          f"~{n:,} tokens in windows of {cfg.context})")
    return 0


def cmd_sample(args):
    import numpy as np

    from gma_np.train.evaluate import generate
    from gma_np.ops._threads import blas_threads
    try:
        blas_threads(1)                             # for the rest of this command
        _, model, _ = _load_model(args.run_dir)
        text = generate(model, args.prompt.encode("utf-8"), args.tokens,
                        temperature=args.temperature, top_k=args.top_k,
                        rng=np.random.default_rng(args.seed))
    except _user_errors() as err:
        return _fail("sample", err)
    print(text.decode("utf-8", errors="replace"))
    return 0


def add_subcommands(sub):
    """Add train, eval and sample to an argparse subparsers object."""
    p = sub.add_parser("train", help="train a small GMA language model on the CPU")
    p.add_argument("--preset", default=None, help="tiny (default), tiny-noconv, small or test")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    for flag, field, kind, text in _OVERRIDES:
        p.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} (default: the preset's)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="print the validation bits per byte of a run's checkpoint")
    p.add_argument("run_dir", help="a run directory written by `gma-np train`")
    p.add_argument("--data", default=None, help="evaluate on another corpus (default: the run's)")
    p.add_argument("--tokens", type=int, default=0, help="validation tokens (default 0: all)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run's checkpoint")
    p.add_argument("run_dir", help="a run directory written by `gma-np train`")
    p.add_argument("--prompt", default="", help="text to continue (default: a line break)")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(run=cmd_sample)
