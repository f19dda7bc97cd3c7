"""The `gma-np` command: thin subcommands over the library.

    gma-np check     gradient-check every GMA configuration, print a table, exit 1 on failure
    gma-np vectors export DIR              write the golden-vector bundle (docs/vectors.md)
    gma-np vectors check DIR --impl m:fn   check a port against it, exit 1 on failure
    gma-np train --preset tiny             train a small GMA language model (docs/training.md)
    gma-np eval DIR                        validation bits per byte of a run's checkpoint
    gma-np sample DIR --prompt TEXT        generate text with the recurrent state
"""

import argparse
import sys


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
    e.add_argument("directory", help="where to write the bundle (created if missing)")
    e.add_argument("--quick", action="store_true", help="the reduced 9-case matrix")
    e.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    e.set_defaults(run=_cmd_vectors_export)
    c = vsub.add_parser("check", help="check a Python port against a bundle (checksums first)")
    c.add_argument("directory", help="a bundle written by `gma-np vectors export`")
    c.add_argument("--impl", required=True, help="the port's forward, module:function or file.py:function")
    c.add_argument("--backward", help="its backward in the port form (docs/vectors.md)")
    c.add_argument("--responsibilities", help="its routing, fn(x, means, log_var, logits, temperature)")
    c.add_argument("--dtype", choices=("float64", "float32", "both"), default="float64",
                   help="dtype to run the port in (default float64)")
    c.add_argument("--case", help="check only the cases whose name contains this")
    c.add_argument("--failures-only", action="store_true", help="print only the failed rows")
    c.set_defaults(run=_cmd_vectors_check)


def build_parser():
    parser = argparse.ArgumentParser(prog="gma-np", description="Gaussian Mixture Attention on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="gradient-check every GMA configuration against finite differences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random problems (default 0)")
    p.set_defaults(run=_cmd_check)
    _add_vectors(sub)
    from gma_np.train.commands import add_subcommands   # argparse only; the trainer loads lazily
    add_subcommands(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
