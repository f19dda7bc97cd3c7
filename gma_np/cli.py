"""The `gma-np` command: thin subcommands over the library.

    gma-np check     gradient-check every GMA configuration, print a table, exit 1 on failure
"""

import argparse
import sys


def _cmd_check(args):
    from gma_np.selfcheck import check_matrix, format_rows
    rows = check_matrix(seed=args.seed)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="gma-np", description="Gaussian Mixture Attention on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="gradient-check every GMA configuration against finite differences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random problems (default 0)")
    p.set_defaults(run=_cmd_check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
