"""`gma-np compare`: every mixer on every task over seeds, on Dask, with a results page.

    gma-np compare [--preset quick|listops|recall|paper|test | --grid FILE] [--out DIR]
                   [--workers N | --scheduler ADDRESS] [--retry-failed]

Loads the sweep (gma_np.sweep.grid), runs its unfinished jobs on an embedded Dask
LocalCluster or the cluster at ADDRESS (gma_np.sweep.cluster, gma_np.sweep.runner),
then writes results.md, results.csv, jobs.csv, scaling.csv and the plots into the sweep
directory (default runs/compare-<name>) and prints the table. The same command again
skips what finished and resumes what did not (docs/compare.md).

Exit status: 0 when every run finished; 1 when Dask is not installed (one line with
the install command), the grid or the output directory cannot be used, or some runs
failed or are unfinished (the table is written all the same and names them); 2 for a
usage error; 130 on Ctrl-C (the checkpoints stay: the same command continues).
"""

import shlex
import time

from gma_np.cli import CommandError, fail, output_directory, positive_int


def _command_line(args):
    parts = ["gma-np", "compare"]
    if args.grid:
        parts += ["--grid", args.grid]
    else:
        parts += ["--preset", args.preset or "quick"]
    if args.out:
        parts += ["--out", args.out]
    if args.scheduler:
        parts += ["--scheduler", args.scheduler]
    elif args.workers:
        parts += ["--workers", str(args.workers)]
    if args.retry_failed:
        parts.append("--retry-failed")
    return " ".join(shlex.quote(p) for p in parts)


def cmd_compare(args, *, on_step=None, on_result=None, print_fn=print):
    """The compare subcommand (on_step, on_result: see gma_np.sweep.runner.run_sweep)."""
    from gma_np.sweep.cluster import DaskMissing, open_client, require_distributed
    from gma_np.sweep.grid import GridError, load_sweep
    try:
        require_distributed()
    except DaskMissing as err:
        return fail("compare", err)
    from gma_np.sweep.plots import write_plots
    from gma_np.sweep.results import collect, machine_description, markdown_table, write_results
    from gma_np.sweep.runner import run_sweep
    from gma_np.sweep.results import record_invocation
    start = time.perf_counter()
    machine = machine_description()
    sweep = None
    try:
        sweep = load_sweep(args.preset, args.grid, args.out)
        output_directory(sweep.out, "--out")
        record_invocation(sweep.out, "start")
        with open_client(workers=args.workers, scheduler=args.scheduler) as (client, about):
            print_fn(f"running on {about}")
            outcome = run_sweep(sweep, client, retry_failed=args.retry_failed, on_step=on_step,
                                on_result=on_result, print_fn=print_fn)
    except (GridError, CommandError, OSError) as err:    # OSError: no scheduler at --scheduler
        return fail("compare", err)
    except KeyboardInterrupt:
        if sweep is not None:
            record_invocation(sweep.out, "interrupted", time.perf_counter() - start)
        return fail("compare", "interrupted; the finished runs and the checkpoints of the others "
                               "are kept: run the same command again to continue", status=130)
    record_invocation(sweep.out, "end", time.perf_counter() - start, ran=outcome.done)
    collected = collect(sweep)
    plots = write_plots(sweep, collected[0], collected[1], collected[2], print_fn=print_fn)
    path = write_results(sweep, collected, command=_command_line(args), machine=machine,
                         wall_s=time.perf_counter() - start, plots=plots)
    print_fn("")
    print_fn(markdown_table(collected[1], sweep.axes))
    print_fn(f"results: {path} (with results.csv, jobs.csv"
             f"{', scaling.csv' if collected[2] else ''}{' and the plots' if plots else ''}); "
             f"{(time.perf_counter() - start) / 60:.1f} min")
    problems = len(outcome.failed) + len(outcome.unfinished)
    if problems:
        what = []
        if outcome.failed:
            what.append(f"{len(outcome.failed)} failed (reasons in the table)")
        if outcome.unfinished:
            what.append(f"{len(outcome.unfinished)} unfinished (run the same command again)")
        return fail("compare", f"{problems} of {outcome.total} units did not finish: "
                               f"{', '.join(what)}")
    return 0


def add_subcommand(sub):
    """Add `compare` to an argparse subparsers object."""
    p = sub.add_parser("compare", help="train every mixer on every task over seeds (Dask), "
                                       "with a table and plots",
                       description="Run a sweep (mixers x tasks x seeds, and any config field "
                                   "as an axis) on Dask distributed and write its results page. "
                                   "The same command again skips the finished runs and resumes "
                                   "the others from their checkpoints.")
    what = p.add_mutually_exclusive_group()
    from gma_np.sweep.grid import PRESETS
    what.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="a built-in sweep (default quick: under 30 minutes on 2 cores; "
                           "docs/compare.md lists them)")
    what.add_argument("--grid", metavar="FILE", default=None,
                      help="a sweep in a .toml or .json file (docs/compare.md: the format)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep directory: run directories, results, plots "
                        "(default runs/compare-<name>)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="worker processes of the local cluster (default: one per core)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on an existing Dask cluster, e.g. tcp://host:8786 (the sweep "
                            "directory must be on a file system its workers share)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run the jobs that failed before again (default: report them)")
    p.set_defaults(run=cmd_compare)

