"""The plots of a sweep (matplotlib, the `plot` extra; without it one line says so).

    curves_<task>.png   the validation metric against the step, one line per table row
                        (the mean over its seeds, the band their min..max)
    scaling.png         CPU time and memory per step against N per mixer, log-log, with
                        the fitted slope in the legend (gma_np.sweep.scaling)
    gma_k.png           GMA's metric against K (model.n_components), per task, mean
                        and standard deviation over seeds, when K is swept
"""

import os

from gma_np.sweep.scaling import fit_slope


def _pyplot(print_fn):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print_fn("plots: matplotlib is not installed (pip install 'gma_np[plot]'); skipping them")
        return None
    return plt


def _label(settings, varying):
    return ", ".join(f"{k.rpartition('.')[2]}={settings[k]}" for k in varying) or "run"


def learning_curves(job_rows, rows, axes, out, plt):
    """One PNG per task; returns their paths."""
    import numpy as np
    paths = []
    tasks = []
    for r in rows:
        if r["settings"].get("task") not in tasks:
            tasks.append(r["settings"].get("task"))
    for task in tasks:
        mine = [r for r in rows if r["settings"].get("task") == task]
        varying = [a for a in axes if a not in ("seed", "task")
                   and len({r["settings"].get(a) for r in mine}) > 1]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        key = ""
        for i, row in enumerate(mine):
            runs = [j for j in job_rows if j["curve"] and all(
                j["settings"].get(k) == v for k, v in row["settings"].items())]
            if not runs:
                continue
            key = runs[0]["metric_key"]
            steps = sorted(set.intersection(*(set(s for s, _ in j["curve"]) for j in runs)))
            if not steps:
                continue
            values = np.array([[dict(j["curve"])[s] for s in steps]
                               for j in runs])                                # (seeds, points)
            color = f"C{i % 10}"
            ax.plot(steps, values.mean(axis=0), "o-", ms=3, color=color,
                    label=f"{_label(row['settings'], varying)} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color,
                                alpha=0.15, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{task}: validation {key[4:].replace('_', ' ')} (mean, band min..max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"curves_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def scaling_plot(scaling, fit_from, out, plt):
    """scaling.png: time and memory per step against N, log-log; returns its path."""
    import numpy as np
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (mixer, rec) in enumerate(scaling.items()):
        n = np.array(rec["lengths"], dtype=float)
        for ax, values, scale in ((ax_t, rec["cpu_s"], 1e3), (ax_m, rec["memory_b"], 2.0 ** -20)):
            v = np.array(values, dtype=float) * scale
            slope, intercept = fit_slope(rec["lengths"], values, fit_from)
            ax.loglog(n, v, "o-", color=f"C{i}", label=f"{mixer}: slope {slope:.2f}")
            if np.isfinite(slope):
                fitted = np.exp(intercept) * n ** slope * scale
                keep = n >= fit_from
                ax.loglog(n[keep], fitted[keep], ":", color=f"C{i}", lw=1)
    from matplotlib.ticker import NullFormatter
    lengths = sorted({n for rec in scaling.values() for n in rec["lengths"]})
    for ax, what in ((ax_t, "CPU time of a forward + backward step (ms)"),
                     (ax_m, "peak memory of a step (MiB, tracemalloc)")):
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"one layer against N (dotted: least-squares fit over N >= "
                 f"{max(fit_from, min(min(r['lengths']) for r in scaling.values()))})", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gma_k_plot(rows, out, plt):
    """gma_k.png: GMA's metric against K per task; None when K takes fewer than 2 values."""
    key = "model.n_components"
    gma = [r for r in rows if r["settings"].get("model.mixer") == "gma" and key in r["settings"]
           and r["mean"] is not None]
    tasks = []
    for r in gma:
        if r["settings"].get("task") not in tasks:
            tasks.append(r["settings"].get("task"))
    tasks = [t for t in tasks if len({r["settings"][key] for r in gma
                                      if r["settings"].get("task") == t}) >= 2]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = sorted((r for r in gma if r["settings"].get("task") == task),
                      key=lambda r: r["settings"][key])
        # one line per combination of the other settings (the default grid has one)
        others = {}
        for r in mine:
            rest = tuple((k, v) for k, v in r["settings"].items()
                         if k not in (key, "task", "model.mixer"))
            others.setdefault(rest, []).append(r)
        for i, (rest, rs) in enumerate(others.items()):
            ks = [r["settings"][key] for r in rs]
            ax.errorbar(ks, [r["mean"] for r in rs], yerr=[r["std"] or 0.0 for r in rs],
                        fmt="o-", capsize=3, color=f"C{i}",
                        label=", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in rest) or None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (mixture components per head)")
        ax.set_ylabel(mine[0]["metric_key"].replace("_", " "))
        ax.set_title(f"GMA on {task}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        if len(others) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "gma_k.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(sweep, job_rows, rows, scaling, print_fn=print):
    """Every plot of the sweep into its directory; returns the paths ([] without matplotlib)."""
    plt = _pyplot(print_fn)
    if plt is None:
        return []
    paths = learning_curves(job_rows, rows, sweep.axes, sweep.out, plt)
    if scaling:
        paths.append(scaling_plot(scaling, sweep.scaling.fit_from, sweep.out, plt))
    k = gma_k_plot(rows, sweep.out, plt)
    if k is not None:
        paths.append(k)
    return paths
