"""The `gma-np` command: thin subcommands over the library.

    gma-np check     gradient-check every GMA configuration, print a table, exit 1 on failure
    gma-np vectors export DIR              write the golden-vector bundle (docs/vectors.md)
    gma-np vectors check DIR --impl m:fn   check a port against it, exit 1 on failure
    gma-np train --preset tiny             train a small GMA language model (docs/training.md)
    gma-np eval DIR                        validation bits per byte of a run's checkpoint
    gma-np sample DIR --prompt TEXT        generate text with the recurrent state
    gma-np analyze DIR                     responsibilities, affinity, stability, gradients: a report
    gma-np --version                       the package version (also `python -m gma_np`)

Exit status, in every subcommand: 0 success; 2 a usage error, an argument the
parser refuses (a missing one, a negative count, a bad preset name), before
anything runs; 1 a failure while the command runs (a check failed, a path that
cannot be written, a file, bundle or run that cannot be used, divergence);
130 interrupted by Ctrl-C. Every error is one line on stderr,
`gma-np <command>: error: ...`. Only validated user input and the library's
user-facing error classes (CheckpointError, DataError, ConfigError,
TrainingDiverged, BundleError, CommandError) are reported that way: any other
exception is a bug and keeps its traceback.
"""

import argparse
import math
import os
import sys

from gma_np import __version__


class CommandError(Exception):
    """A command that cannot do what was asked (a path it cannot write, a selection that
    matches nothing): one line on stderr, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `gma-np <command>: error: <what>` and exit status 2.
    (argparse's own prints the whole usage first, which buries the line that matters.)"""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types: each refuses a bad value with a message naming what was expected

def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text):
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text):
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text):
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonnegative_float(text):
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fail(command, message, status=1):
    """Print `gma-np <command>: error: <message>` on stderr; return the exit status."""
    print(f"gma-np {command}: error: {message}", file=sys.stderr)
    return status


def output_directory(path, option):
    """Create `path` (and its parents) for writing; CommandError naming `option` if it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{option}: {path!r} is an existing file, not a directory; "
                           f"give a new directory, or remove the file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise CommandError(f"{option}: cannot create directory {path!r} "
                           f"({err.strerror or type(err).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CommandError(f"{option}: directory {path!r} is not writable")
    return path


def port_function(text):
    """The shape of --impl and its siblings: module:function or file.py:function."""
    module, sep, name = text.partition(":")
    if not (module and sep and name) or ":" in name:
        raise argparse.ArgumentTypeError(f"expected module:function or file.py:function, got {text!r}")
    return text


# ---- check and vectors

def _cmd_check(args):
    from gma_np.selfcheck import check_matrix, format_rows
    rows = check_matrix(seed=args.seed)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_vectors_export(args):
    from gma_np.vectors.commands import export_command
    return export_command(args.directory, quick=args.quick, seed=args.seed)


def _cmd_vectors_check(args):
    from gma_np.vectors.commands import check_command
    return check_command(args.directory, args.impl, args.backward, args.responsibilities,
                         args.dtype, args.case, args.failures_only)


def _add_vectors(sub):
    p = sub.add_parser("vectors", help="golden vectors for ports: export a bundle, check a port")
    vsub = p.add_subparsers(dest="vectors_command", required=True)
    e = vsub.add_parser("export", help="write the bundle: one .npz per case and manifest.json")
    e.add_argument("directory", help="where to write the bundle (created if missing; the files "
                                     "of an earlier bundle there are overwritten)")
    e.add_argument("--quick", action="store_true", help="the reduced 9-case matrix")
    e.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the random cases, an integer >= 0 (default 0)")
    e.set_defaults(run=_cmd_vectors_export)
    c = vsub.add_parser("check", help="check a Python port against a bundle (checksums first)")
    c.add_argument("directory", help="a bundle written by `gma-np vectors export`")
    c.add_argument("--impl", required=True, type=port_function,
                   help="the port's forward, module:function or file.py:function")
    c.add_argument("--backward", type=port_function,
                   help="its backward in the port form (docs/vectors.md)")
    c.add_argument("--responsibilities", type=port_function,
                   help="its routing, fn(x, means, log_var, logits, temperature)")
    c.add_argument("--dtype", choices=("float64", "float32", "both"), default="float64",
                   help="dtype to run the port in (default float64)")
    c.add_argument("--case", help="check only the cases whose name contains this")
    c.add_argument("--failures-only", action="store_true", help="print only the failed rows")
    c.set_defaults(run=_cmd_vectors_check)


def build_parser():
    parser = Parser(prog="gma-np", description="Gaussian Mixture Attention on the CPU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="gradient-check every GMA configuration against finite differences")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the random problems, an integer >= 0 (default 0)")
    p.set_defaults(run=_cmd_check)
    _add_vectors(sub)
    from gma_np.train.commands import add_subcommands   # argparse only; the trainer loads lazily
    add_subcommands(sub)
    from gma_np.analysis.commands import add_subcommand as add_analyze
    add_analyze(sub)
    from gma_np.sweep.commands import add_subcommand as add_compare
    add_compare(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    command = args.command + (f" {args.vectors_command}" if args.command == "vectors" else "")
    try:
        return args.run(args)
    except CommandError as err:
        return fail(command, err)
    except KeyboardInterrupt:
        return fail(command, "interrupted", status=130)


if __name__ == "__main__":
    sys.exit(main())
