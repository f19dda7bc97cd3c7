"""The analyses of a collected sample, and the Markdown report that shows them.

    results = analyze(sample, attributes, classes, rng=rng, info=...)   # numbers only
    path = write_report(results, out_dir)                                # report.md (+ PNGs)

Dimension legend: B windows, N tokens, H heads, K components, L layers.

`analyze` runs every statistic of gma_np.analysis on the sample (usage, alignment,
affinity, stability, gradients), per layer and head, and keeps what the tables and
figures need. `write_report` writes report.md: a summary, then one section per
analysis with its tables; with matplotlib (the `plot` extra) the figures of
gma_np.analysis.figures beside it, else one line saying how to get them.
docs/analysis.md says how to read each table and figure.
"""

import os

import numpy as np

from gma_np.analysis import affinity as aff
from gma_np.analysis import alignment as al
from gma_np.analysis import gradients as gr
from gma_np.analysis import stability as st
from gma_np.analysis.categories import ATTRIBUTES, CLASSES, show_byte
from gma_np.analysis.usage import DEAD_SHARE, usage_stats

REPORT_NAME = "report.md"
# Characters of the first window shown in the responsibility heatmap and its text form.
SNIPPET = 64
# Points (queries and keys of a head) the stability analysis uses at most: its
# Jacobians are (T, K, d) arrays and its sweeps route T points many times.
STABILITY_POINTS = 2048
PLOT_HINT = 'Figures: matplotlib is not installed; `pip install "gma_np[plot]"` gets the figures.'


def _flat(r, h):
    """(B, H, N, c) -> head h's (B*N, c)."""
    return r[:, h].reshape(-1, r.shape[-1])


def _usage(sample):
    rows = []
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            for stream, r in (("q", layer.rq), ("k", layer.rk)):
                rows.append(dict(layer=l, head=h, stream=stream, **usage_stats(_flat(r, h))))
    return rows


def _alignment(sample, attributes, classes, rng):
    rows, class_means = [], {}
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            for stream, r in (("q", layer.rq), ("k", layer.rk)):
                rf = _flat(r, h)
                comp = rf.argmax(axis=1)
                labels = {"classes": classes.reshape(-1)}
                labels.update({a: attributes[a].reshape(-1) for a in ATTRIBUTES})
                nmis, baselines = {}, {}
                for name, lab in labels.items():
                    base, base_std, baselines[name] = al.shuffled_baseline(lab, comp, rng)
                    nmis[name] = (al.nmi(lab, comp), base, base_std)
                cls = labels["classes"]
                pur_base = baselines["classes"]
                rows.append({"layer": l, "head": h, "stream": stream, "nmi": nmis,
                             "purity": al.purity(cls, comp), "purity_baseline": pur_base})
                if stream == "k":
                    class_means[(l, h)] = al.mean_responsibility_by_label(rf, cls, len(CLASSES))
    return rows, class_means


def _affinity(sample, cfg, compare):
    """Stats of the first window, per layer and head; the matrices of head 0 per layer."""
    rows, matrices = [], {}
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            rq, rk = layer.rq[0, h], layer.rk[0, h]
            K = rq.shape[1]
            A_bi, _ = aff.affinity(rq, rk, causal=False, norm="row")
            A, M = aff.affinity(rq, rk, causal=True, norm=cfg["norm"])
            row = {"layer": l, "head": h, "bidirectional": aff.affinity_stats(A_bi, K),
                   "causal": aff.affinity_stats(A, K), "mixing": aff.affinity_stats(M, K)}
            P = None
            if compare is not None and l < len(compare.layers) and h < compare.layers[l].q.shape[1]:
                cl = compare.layers[l]
                P = aff.softmax_attention_map(cl.q[0, h], cl.k[0, h], causal=True)
                row["softmax"] = aff.affinity_stats(P, K)
            rows.append(row)
            if h == 0:
                matrices[l] = {"M": M, "P": P, "spectra": {}}
            matrices[l]["spectra"][h] = (row["bidirectional"]["singular_values"],
                                         row["causal"]["singular_values"],
                                         None if P is None else row["softmax"]["singular_values"])
    return rows, matrices


def _stability(sample, rng):
    rows = []
    for l, layer in enumerate(sample.layers):
        mix = layer.mixture
        for h in range(layer.q.shape[1]):
            x = np.concatenate([_flat(layer.q, h), _flat(layer.k, h)])      # (2 B N, d)
            if x.shape[0] > STABILITY_POINTS:
                x = x[rng.choice(x.shape[0], STABILITY_POINTS, replace=False)]
            args = (mix["means"][h], mix["log_var"][h], mix["logits"][h])
            tau = float(mix["temperature"][h])
            b = st.jacobian_bounds(x, *args, tau)
            scale = np.sqrt((x ** 2).sum(axis=1).mean())
            sizes = scale * np.array(st.PERTURBATION_FRACTIONS)
            rows.append({"layer": l, "head": h, "tau": tau, "points": x.shape[0],
                         "scale": float(scale), "sizes": sizes,
                         "spectral": float(b["spectral"].mean()),
                         "spectral_max": float(b["spectral"].max()),
                         "local": float(b["local"].mean()), "global": float(b["global"].mean()),
                         "within_local": float((b["spectral"] <= b["local"] * (1 + 1e-9)).mean()),
                         "perturbation": st.perturbation_sensitivity(x, *args, tau, sizes, rng),
                         "sweep": st.temperature_sweep(x, *args, tau, rng)})
    return rows


def _gradients(sample, cfg):
    rows, points = [], {}
    for l, layer in enumerate(sample.layers):
        mix = layer.mixture
        tg = gr.token_gradients(layer.q, layer.k, layer.v, layer.do, mix["means"],
                                mix["log_var"], mix["logits"], mix["temperature"],
                                causal=True, norm=cfg["norm"])
        for h in range(layer.q.shape[1]):
            for stream in ("q", "k"):
                rows.append(dict(layer=l, head=h, stream=stream,
                                 **gr.gradient_summary(tg, h, stream)))
        points[l] = {key: tg[key] for key in tg if key[:2] not in ("dq", "dk", "dr")}
    return rows, points


def analyze(sample, attributes, classes, *, rng, info, compare=None, compare_info=None):
    """Every analysis of a GMA sample (gma_np.analysis.collect.Sample with targets), as a
    dict that write_report renders. info: the run's facts for the report's header
    (run, step, mixer, norm, K, windows, ...); compare: a Sample of a softmax-attention
    run on the same windows (or None)."""
    results = {"info": info, "compare_info": compare_info}
    results["usage"] = _usage(sample)
    results["alignment"], results["class_means"] = _alignment(sample, attributes, classes, rng)
    results["affinity"], results["affinity_matrices"] = _affinity(sample, info, compare)
    results["stability"] = _stability(sample, rng)
    results["gradients"], results["gradient_points"] = _gradients(sample, info)
    n = min(SNIPPET, sample.tokens.shape[1])
    results["snippet"] = {"tokens": sample.tokens[0, :n],
                          "rk": [layer.rk[0, :, :n] for layer in sample.layers]}  # (H, n, K)
    return results


# ---------------------------------------------------------------- rendering

def _fmt(x, digits=3):
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if x is None or not np.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 10 ** 5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _digit(i):
    return "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[i] if i < 62 else "+"


def _summary(results):
    info = results["info"]
    K = info["K"]
    eff = [r["effective_components"] for r in results["usage"]]
    ent = [r["token_entropy"] for r in results["usage"]]
    dead = sum(r["n_dead"] for r in results["usage"])
    nmi = [r["nmi"]["classes"][0] for r in results["alignment"]]
    base = [r["nmi"]["classes"][1] for r in results["alignment"]]
    erank = [r["mixing"]["effective_rank"] for r in results["affinity"]]
    gate = [r["spearman"] for r in results["gradients"]]
    lines = [
        f"- Usage: effective number of components exp(H) {np.mean(eff):.2f} on average "
        f"(min {np.min(eff):.2f}, max {np.max(eff):.2f}) of K = {K}; mean token entropy "
        f"{np.mean(ent):.2f} nats of at most log K = {np.log(K):.2f}; {dead} dead "
        f"(head, stream, component) triples.",
        f"- Alignment with the byte classes: NMI {np.mean(nmi):.3f} on average "
        f"(max {np.max(nmi):.3f}) against a shuffled-label baseline of {np.mean(base):.3f}.",
        f"- Affinity: every causal affinity non-negative: "
        f"{_fmt(all(r['causal']['min'] >= 0 for r in results['affinity']))}; bidirectional "
        f"rank <= K in every head: {_fmt(all(r['bidirectional']['rank_le_K'] for r in results['affinity']))}; "
        f"effective rank of the mixing matrix {np.mean(erank):.1f} on average (window of "
        f"{info['context']} tokens).",
        f"- Gradients: rank correlation of the gradient norm with the responsibility entropy "
        f"{np.nanmean(gate):.2f} on average over heads and streams.",
    ]
    if "softmax" in results["affinity"][0]:
        sm = [r["softmax"]["effective_rank"] for r in results["affinity"] if "softmax" in r]
        lines[2] += f" Softmax attention of the compared run: {np.mean(sm):.1f}."
    return "\n".join(lines)


def _usage_section(results):
    K = results["info"]["K"]
    rows = [[r["layer"], r["head"], r["stream"], _fmt(r["effective_components"], 2),
             _fmt(r["usage_entropy"]), _fmt(r["token_entropy"]), _fmt(float(r["usage"].max())),
             _fmt(float(r["usage"].min())), r["n_dead"]] for r in results["usage"]]
    return ("Routing mass per component u_k (mean responsibility over the sample's tokens), "
            f"the entropy H(u) of that average and exp(H(u)), the effective number of "
            f"components (K = {K}: {K} is uniform usage, 1 is collapse), the mean per-token "
            f"entropy (max log K = {np.log(K):.3f}), and the components below "
            f"{DEAD_SHARE:g} of the uniform share 1/K (dead).\n\n"
            + _table(["layer", "head", "stream", "exp(H(u))", "H(u)", "token H", "max u_k",
                      "min u_k", "dead"], rows))


def _snippet_text(results):
    snip = results["snippet"]
    chars = "".join(show_byte(int(b)) for b in snip["tokens"])
    lines = [f"{'text':<10}{chars}"]
    for l, rk in enumerate(snip["rk"]):
        for h in range(rk.shape[0]):
            lines.append(f"{f'L{l} H{h}':<10}" + "".join(_digit(int(c)) for c in rk[h].argmax(-1)))
    return ("The first window's first characters and, under each, the argmax component of "
            "its key in every layer and head (components written 0-9, a-z, A-Z; ␣ is a "
            "space, ⏎ a line break, · a byte outside printable ASCII).\n\n```\n"
            + "\n".join(lines) + "\n```")


def _alignment_section(results):
    def cell(v):
        return f"{_fmt(v[0])} ({_fmt(v[1])})"
    rows = [[r["layer"], r["head"], r["stream"], cell(r["nmi"]["classes"]),
             f"{_fmt(r['purity'])} ({_fmt(r['purity_baseline'])})"]
            + [cell(r["nmi"][a]) for a in ATTRIBUTES] for r in results["alignment"]]
    return ("NMI (arithmetic normalisation, as scikit-learn's normalized_mutual_info_score) "
            "between each token's argmax component and its category, and purity of the "
            "components with respect to the exclusive byte classes "
            f"({', '.join(CLASSES)}); in parentheses the same statistic with the labels "
            f"shuffled across tokens (mean of {al.SHUFFLES} shuffles). The attribute columns "
            "are binary labelings (the attribute or not).\n\n"
            + _table(["layer", "head", "stream", "NMI classes", "purity"] + list(ATTRIBUTES), rows))


def _affinity_section(results):
    compare = "softmax" in results["affinity"][0]
    header = ["layer", "head", "min A", "rank A_bi", "erank A_bi", "rank A", "max rank A[t:, :t]",
              "erank M", "row sums M"]
    if compare:
        header += ["erank softmax P"]
    rows = []
    for r in results["affinity"]:
        m = r["mixing"]
        row = [r["layer"], r["head"], _fmt(r["causal"]["min"]), r["bidirectional"]["rank"],
               _fmt(r["bidirectional"]["effective_rank"], 2), r["causal"]["rank"],
               r["causal"]["lower_block_rank_max"], _fmt(m["effective_rank"], 2),
               f"{_fmt(m['row_sum_min'])} .. {_fmt(m['row_sum_max'])}"]
        if compare:
            row.append(_fmt(r["softmax"]["effective_rank"], 2) if "softmax" in r else "n/a")
        rows.append(row)
    K, N = results["info"]["K"], results["info"]["context"]
    text = (f"The first window ({N} tokens) through the dense reference: A_bi = R_Q R_K^T "
            f"(rank <= K = {K}), the causal affinity A = A_bi o L, and the mixing matrix M "
            f"the values are averaged with ({results['info']['norm']} normalisation). Ranks are "
            "numerical (singular values above max(s) N eps); erank is the effective rank of "
            "Roy and Vetterli, exp of the entropy of s / sum(s). The causal mask makes A "
            "full-rank in general; every block below the diagonal keeps rank <= K.")
    if compare:
        ci = results["compare_info"]
        text += (f" The last column is the softmax attention map P = softmax(q k^T / sqrt(d)) "
                 f"(causal) of the compared run {ci['run']} ({ci['mixer']}, step {ci['step']}) "
                 f"on the same window.")
        if ci.get("warning"):
            text += f" Note: {ci['warning']}"
    return text + "\n\n" + _table(header, rows)


def _stability_section(results):
    rows = [[r["layer"], r["head"], _fmt(r["tau"]), _fmt(r["spectral"]), _fmt(r["spectral_max"]),
             _fmt(r["local"]), _fmt(r["global"]), _fmt(r["within_local"])]
            for r in results["stability"]]
    fr = st.PERTURBATION_FRACTIONS
    prow = []
    for r in results["stability"]:
        p = r["perturbation"]
        prow.append([r["layer"], r["head"]]
                    + [f"{_fmt(m)} / {_fmt(b)}" for m, b in zip(p["mean"], p["bound"])]
                    + [_fmt(float(p["violations"].max()))])
    srow = []
    for r in results["stability"]:
        s = r["sweep"]
        srow.append([r["layer"], r["head"]]
                    + [f"{_fmt(a)} / {_fmt(b)} / {_fmt(c, 2)}"
                       for a, b, c in zip(s["spectral"], s["local"], s["entropy"])])
    return ("Points: the head's queries and keys (at most "
            f"{STABILITY_POINTS}). The Jacobian J = dr/dx, its spectral norm (mean and max "
            "over points), the local bound (1/tau) sqrt(sum_k r_k ‖g_k - gbar‖^2) and the "
            "global bound (1/tau) max_k ‖x - mu_k‖ max 1/sigma^2 (docs/analysis.md); "
            "'within' is the share of points with ‖J‖_2 <= local bound (1 by the derivation)."
            "\n\n" + _table(["layer", "head", "tau", "mean ‖J‖", "max ‖J‖", "local bound",
                             "global bound", "within"], rows)
            + "\n\nMean ‖r(x + delta) - r(x)‖_1 / mean bound, for random directions of size "
            "‖delta‖ = fraction x RMS norm of the points; the last column is the share of "
            "points above their bound (0 by the derivation).\n\n"
            + _table(["layer", "head"] + [f"{f:g}" for f in fr] + ["above bound"], prow)
            + "\n\nThe temperature sweep: tau' = factor x the head's tau; each cell is mean "
              "‖J‖_2 / mean local bound / mean token entropy (nats).\n\n"
            + _table(["layer", "head"] + [f"x{f:g}" for f in st.TEMPERATURE_FACTORS], srow))


def _gradient_section(results):
    rows = [[r["layer"], r["head"], r["stream"], _fmt(r["spearman"], 2),
             _fmt(r["low_entropy_median"]), _fmt(r["high_entropy_median"]), _fmt(r["gate_ok"])]
            for r in results["gradients"]]
    return ("Per token, the norm of the gradient of the mean loss reaching q (or k) and the "
            "entropy of its responsibilities. Expected (docs/analysis.md): ‖dq_i‖ <= (2/tau) "
            "(1 - max_k r_ik) ‖G_i‖ ‖dR_i‖, so confident tokens pass little gradient. "
            "Spearman is the rank correlation of norm and entropy; the medians are those of "
            f"the lowest and highest of {gr.ENTROPY_BINS} entropy bins; 'gate' is the share of "
            "tokens whose modulation ‖S dR‖ / ‖dR‖ is within 2 (1 - max r) (1 by the "
            "derivation).\n\n"
            + _table(["layer", "head", "stream", "Spearman", "median, low H", "median, high H",
                      "gate"], rows))


def _figure(name, caption):
    return f"![{caption}]({name})\n\n*{caption}*"


def write_report(results, out_dir):
    """Write out_dir/report.md and, with matplotlib, its PNG figures. Returns the path."""
    from gma_np.analysis import figures
    os.makedirs(out_dir, exist_ok=True)
    drawn = figures.draw_all(results, out_dir)            # {} without matplotlib
    info = results["info"]

    def fig(key, caption):
        return "\n\n" + _figure(drawn[key], caption) if key in drawn else ""
    heat = "".join(fig(f"heatmap_{l}", f"Key responsibilities over the snippet, layer {l}: "
                                       f"tokens along x, components along y, one panel per head")
                   for l in range(info["layers"]))
    parts = [
        f"# Analysis of {info['run']}",
        (f"Step {info['step']}, mixer {info['mixer']}, {info['layers']} layers x {info['heads']} "
         f"heads, K = {info['K']}, {info['covariance']} covariance, {info['norm']} read-out. "
         f"Sample: {info['windows']} validation windows of {info['context']} bytes of "
         f"{info['data']} (seed {info['seed']}), mean loss {info['loss_bpb']:.3f} bits per byte. "
         "How to read every table and figure: docs/analysis.md."),
        "" if drawn else PLOT_HINT,
        "## Summary", _summary(results),
        "## Usage", _usage_section(results) + fig("usage", "Routing mass per component, "
                                                  "queries and keys, per layer and head; "
                                                  "the line is the uniform share 1/K"),
        "## Responsibilities over a text snippet", _snippet_text(results) + heat,
        "## Alignment with token categories", _alignment_section(results)
        + fig("alignment", "NMI of the argmax component with each category, per head "
                           "(dots), against the shuffled-label baseline (crosses)")
        + fig("categories", "Mean key responsibility of each byte class (rows) on each "
                            "component (columns), per layer and head"),
        "## Affinity", _affinity_section(results)
        + fig("affinity", "First window: GMA's mixing matrix M, the softmax attention map "
                          "of the compared run, and the singular values s_i / s_1 of every "
                          "head (dashed: K)"),
        "## Routing stability", _stability_section(results)
        + fig("stability", "Left: measured ‖delta r‖_1 (mean, max) and the bound against "
                           "the perturbation size. Right: mean ‖J‖_2 and its bounds "
                           "against the temperature"),
        "## Gradient structure", _gradient_section(results)
        + fig("gradients", "Per token: gradient norm reaching q against the responsibility "
                           "entropy (binned medians as lines), and the modulation "
                           "‖S dR‖ / ‖dR‖ against 1 - max r with the bound 2 (1 - max r)"),
    ]
    path = os.path.join(out_dir, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(p for p in parts if p) + "\n")
    return path
