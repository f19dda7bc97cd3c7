"""The report's PNG figures, with matplotlib (the `plot` extra); nothing without it.

`draw_all(results, out_dir)` draws every figure of gma_np.analysis.report's results
and returns {key: file name}; {} when matplotlib cannot be imported. docs/analysis.md
says how to read each one.
"""

import os

import numpy as np

from gma_np.analysis.stability import TEMPERATURE_FACTORS

DPI = 110
# Lowest weight the mixing-matrix figures resolve, and where singular values that are
# zero (or rounding, ~1e-16 of the largest) are drawn: the plots show structure, not rounding.
WEIGHT_FLOOR = 1e-4
SPECTRUM_FLOOR = 1e-16


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=DPI)
    plt.close(fig)
    return name


def _grid(plt, L, H, w=2.6, h=2.0):
    fig, axes = plt.subplots(L, H, figsize=(w * H + 0.5, h * L + 0.5), squeeze=False)
    return fig, axes


def usage(plt, results, out_dir):
    info = results["info"]
    L, H, K = info["layers"], info["heads"], info["K"]
    fig, axes = _grid(plt, L, H)
    by = {(r["layer"], r["head"], r["stream"]): r for r in results["usage"]}
    x = np.arange(K)
    for l in range(L):
        for h in range(H):
            ax = axes[l, h]
            ax.bar(x - 0.2, by[(l, h, "q")]["usage"], 0.4, label="queries")
            ax.bar(x + 0.2, by[(l, h, "k")]["usage"], 0.4, label="keys")
            ax.axhline(1.0 / K, color="k", lw=0.8, ls="--")
            ax.set_title(f"layer {l} head {h}: exp(H) {by[(l, h, 'k')]['effective_components']:.1f} (k)",
                         fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("component", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    return _save(plt, fig, out_dir, "usage.png")


def heatmap(plt, results, out_dir, l):
    snip = results["snippet"]
    rk = snip["rk"][l]                                             # (H, n, K)
    H, n, K = rk.shape
    fig, axes = plt.subplots(H, 1, figsize=(max(6.0, 0.16 * n + 1.5), 1.0 + 0.22 * K * H),
                             squeeze=False)
    labels = snip["names"]
    long_names = any(len(name) > 1 for name in labels)
    for h in range(H):
        ax = axes[h, 0]
        im = ax.imshow(rk[h].T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_ylabel(f"head {h}\ncomponent", fontsize=7)
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, fontsize=6 if long_names else 7, family="monospace",
                           rotation=90 if long_names else 0)
        ax.set_yticks(range(0, K, max(1, K // 8)))
        ax.tick_params(axis="y", labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[0, 0].set_title(f"layer {l}: responsibilities of the keys", fontsize=9)
    return _save(plt, fig, out_dir, f"heatmap_layer{l}.png")


def alignment(plt, results, out_dir):
    names = list(results["partitions"]) + list(results["attributes"])
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.6))
    x = np.arange(len(names))
    rows = [r for r in results["alignment"]]
    for i, r in enumerate(rows):
        jitter = (i / max(len(rows) - 1, 1) - 0.5) * 0.5
        ax.plot(x + jitter, [r["nmi"][n][0] for n in names], "o", ms=3,
                color="C0" if r["stream"] == "k" else "C1")
        ax.plot(x + jitter, [r["nmi"][n][1] for n in names], "x", ms=3, color="0.5")
    ax.plot([], [], "o", color="C0", label="keys")
    ax.plot([], [], "o", color="C1", label="queries")
    ax.plot([], [], "x", color="0.5", label="shuffled baseline")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("NMI")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out_dir, "alignment.png")


def categories(plt, results, out_dir):
    info = results["info"]
    L, H = info["layers"], info["heads"]
    names = next(iter(results["partitions"].values()))
    fig, axes = _grid(plt, L, H, w=3.0, h=0.6 + 0.22 * len(names))
    for (l, h), m in results["class_means"].items():
        ax = axes[l, h]
        ax.imshow(m, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"layer {l} head {h}", fontsize=8)
    return _save(plt, fig, out_dir, "categories.png")


def classes(plt, results, out_dir):
    """Per layer and head, the keys' usage u^(c) of each class (rows, each summing to 1)
    over the components, on one colour scale; the class information in the title."""
    info, pc = results["info"], results["per_class"]
    L, H = info["layers"], info["heads"]
    names = pc["names"]
    heads = [r for r in pc["heads"] if r["stream"] == "k"]
    top = max(float(r["usage"].max()) for r in heads)
    fig, axes = _grid(plt, L, H, w=3.0, h=0.8 + 0.2 * len(names))
    for r in heads:
        ax = axes[r["layer"], r["head"]]
        im = ax.imshow(r["usage"], aspect="auto", cmap="magma", vmin=0, vmax=top,
                       interpolation="nearest")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_xlabel("component", fontsize=6)
        info_c, base = r["information"]
        ax.set_title(f"layer {r['layer']} head {r['head']}: I {info_c:.3f} ({base:.3f})",
                     fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    fig.savefig(os.path.join(out_dir, "classes.png"), dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "classes.png"


def _weights(plt, fig, ax, w, title):
    """A mixing matrix on a log colour scale (its rows fall off like 1/i); zeros blank."""
    from matplotlib.colors import LogNorm
    positive = w[w > 0]
    vmin = max(WEIGHT_FLOOR, float(positive.min())) if positive.size else WEIGHT_FLOOR
    im = ax.imshow(np.ma.masked_where(w <= 0, w), cmap="viridis", interpolation="nearest",
                   norm=LogNorm(vmin=vmin, vmax=max(float(w.max()), vmin * 10)))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("key j", fontsize=7)
    ax.set_ylabel("query i", fontsize=7)


def affinity(plt, results, out_dir):
    mats = results["affinity_matrices"]
    K = results["info"]["K"]
    compare = any(m["P"] is not None for m in mats.values())
    cols = 3 if compare else 2
    fig, axes = plt.subplots(len(mats), cols, figsize=(3.4 * cols, 3.0 * len(mats)), squeeze=False)
    for row, (l, m) in enumerate(sorted(mats.items())):
        _weights(plt, fig, axes[row, 0], m["M"], f"GMA mixing M, layer {l} head 0")
        if compare and m["P"] is not None:
            _weights(plt, fig, axes[row, 1], m["P"], f"softmax attention P, layer {l} head 0")
        ax = axes[row, cols - 1]
        for h, spectra in sorted(m["spectra"].items()):
            for s, ls in zip(spectra, ("-", ":", "-.")):
                if s is not None:                          # exact zeros drawn at the floor
                    ax.semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], SPECTRUM_FLOOR),
                                color=f"C{h % 10}", lw=1, ls=ls)
        ax.axvline(K + 0.5, color="k", ls="--", lw=0.8)
        ax.set_ylim(SPECTRUM_FLOOR / 2, 2)
        ax.set_title(f"layer {l}: s_i / s_1\n(solid A_bi, dotted A, dash-dot P)", fontsize=8)
        ax.set_xlabel("i", fontsize=7)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, out_dir, "affinity.png")


def stability(plt, results, out_dir):
    rows = results["stability"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(rows):
        p = r["perturbation"]
        c = f"C{i % 10}"
        lab = f"L{r['layer']} H{r['head']}"
        a.loglog(r["sizes"], p["mean"], "o-", color=c, ms=3, lw=1, label=lab)
        a.loglog(r["sizes"], p["max"], ":", color=c, lw=1)
        a.loglog(r["sizes"], p["bound"], "--", color=c, lw=0.8)
        s = r["sweep"]
        f = s["tau"] / r["tau"]
        b.loglog(f, s["spectral"], "o-", color=c, ms=3, lw=1, label=lab)
        b.loglog(f, s["local"], "--", color=c, lw=0.8)
    b.set_xticks(TEMPERATURE_FACTORS, [f"{t:g}" for t in TEMPERATURE_FACTORS])
    b.minorticks_off()
    a.set_xlabel("perturbation size ‖delta‖")
    a.set_ylabel("‖r(x + delta) - r(x)‖_1")
    a.set_title("solid: mean, dotted: max, dashed: mean bound", fontsize=8)
    b.set_xlabel("tau / tau of the head")
    b.set_ylabel("mean ‖J‖_2 (dashed: local bound)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
    b.legend(fontsize=6, ncol=2)
    return _save(plt, fig, out_dir, "stability.png")


def gradients(plt, results, out_dir):
    from gma_np.analysis.gradients import binned_medians
    pts = results["gradient_points"]
    L = len(pts)
    fig, axes = plt.subplots(L, 2, figsize=(10, 3.4 * L), squeeze=False)
    for l in range(L):
        p = pts[l]
        a, b = axes[l]
        for h in range(p["grad_q"].shape[0]):
            c = f"C{h % 10}"
            a.scatter(p["entropy_q"][h], p["grad_q"][h], s=2, alpha=0.3, color=c)
            x, m = binned_medians(p["entropy_q"][h], p["grad_q"][h])
            a.plot(x, m, "-", color=c, lw=1.5, label=f"head {h}")
            b.scatter(1 - p["rmax_q"][h], p["modulation_q"][h], s=2, alpha=0.3, color=c)
        g = np.linspace(0, 1, 50)
        b.plot(g, np.minimum(2 * g, 0.5), "k--", lw=1, label="bound min(2 (1 - max r), 1/2)")
        a.set_yscale("log")
        a.set_xlabel("entropy of r(q_i), nats")
        a.set_ylabel("‖dL/dq_i‖")
        a.set_title(f"layer {l}", fontsize=9)
        b.set_xlabel("1 - max_k r_ik")
        b.set_ylabel("‖S_i dR_i‖ / ‖dR_i‖")
        b.set_xlim(0, 1)
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(plt, fig, out_dir, "gradients.png")


def draw_all(results, out_dir):
    """{key: file name} of every figure written to out_dir; {} without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return {}
    drawn = {"usage": usage(plt, results, out_dir)}
    for l in range(results["info"]["layers"]):
        drawn[f"heatmap_{l}"] = heatmap(plt, results, out_dir, l)
    drawn["alignment"] = alignment(plt, results, out_dir)
    drawn["categories"] = categories(plt, results, out_dir)
    if results.get("per_class") is not None:
        drawn["classes"] = classes(plt, results, out_dir)
    if results["affinity_matrices"]:
        drawn["affinity"] = affinity(plt, results, out_dir)
    drawn["stability"] = stability(plt, results, out_dir)
    drawn["gradients"] = gradients(plt, results, out_dir)
    return drawn
