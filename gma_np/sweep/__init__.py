"""Sweeps: the paper's comparison (every mixer on every task over seeds) on Dask distributed.

    grid.py      the sweep's definition (a preset, or a TOML/JSON file) -> named jobs
    cluster.py   the Dask client: an embedded LocalCluster, or a cluster by address
    runner.py    one Dask task per run directory; done/failed markers, resume, locks
    results.py   the table (Markdown, CSV) read back from the runs' logs and checkpoints
    plots.py     learning curves, time and memory against N, GMA's metric against K
    scaling.py   the time/memory-vs-N measurement of one layer per mixer, fitted slopes
    commands.py  the `gma-np compare` subcommand

Dask is an optional extra (pip install "gma_np[sweep]"); everything but the runner and
the cluster (the grid, the results, the plots, the scaling measurement) works without it.
docs/compare.md: how to use it, the grid format, what resume guarantees, and results.
"""

from gma_np.sweep.grid import PRESETS, GridError, Job, Sweep, build_sweep, load_sweep

__all__ = ["PRESETS", "GridError", "Job", "Sweep", "build_sweep", "load_sweep"]
