"""The analyses of a collected sample, and the Markdown report that shows them.

    results = analyze(sample, categories, rng=rng, info=...)            # numbers only
    path = write_report(results, out_dir)                                # report.md (+ PNGs)

Dimension legend: B rows (windows), N tokens, T real tokens, H heads, K components,
L layers, C classes.

`analyze` runs every statistic of gma_np.analysis on the sample (usage, alignment,
per class for a classification task, affinity, stability, gradients), per layer and
head, over the real tokens only (padding, key_mask False, is left out of every count),
and keeps what the tables and figures need. `write_report` writes report.md: a summary,
then one section per analysis with its tables; with matplotlib (the `plot` extra) the
figures of gma_np.analysis.figures beside it, else one line saying how to get them.
docs/analysis.md says how to read each table and figure.
"""

import os

import numpy as np

from gma_np.analysis import affinity as aff
from gma_np.analysis import alignment as al
from gma_np.analysis import gradients as gr
from gma_np.analysis import stability as st
from gma_np.analysis.usage import DEAD_SHARE, entropy, usage_stats

REPORT_NAME = "report.md"
# Tokens of the first row shown in the responsibility heatmap and its text form.
SNIPPET = 64
# Points (queries and keys of a head) the stability analysis uses at most: its
# Jacobians are (T, K, d) arrays and its sweeps route T points many times.
STABILITY_POINTS = 2048
# Tokens a category needs for the class NMI within it: below that a per-category NMI
# over a handful of tokens is mostly its finite-sample bias.
MIN_CATEGORY_TOKENS = 50
PLOT_HINT = 'Figures: matplotlib is not installed; `pip install "gma_np[plot]"` gets the figures.'


def _flat(r, h, real):
    """(B, H, N, c) -> head h's real tokens (T, c), row-major."""
    return r[:, h][real]


def _streams(layer):
    return (("q", layer.rq), ("k", layer.rk))


def _usage(sample):
    rows, real = [], sample.real
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            for stream, r in _streams(layer):
                rows.append(dict(layer=l, head=h, stream=stream, **usage_stats(_flat(r, h, real))))
    return rows


def _alignment(sample, categories, rng):
    """NMI of the argmax component with every partition and attribute, purity with every
    partition, against shuffled baselines; the mean key responsibility per class of the
    first partition."""
    real = sample.real
    labels = {name: lab[real] for name, (lab, _) in categories.partitions.items()}
    labels.update({name: a[real] for name, a in categories.attributes.items()})
    main = next(iter(categories.partitions))
    n_main = len(categories.partitions[main][1])
    rows, class_means = [], {}
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            for stream, r in _streams(layer):
                rf = _flat(r, h, real)
                comp = rf.argmax(axis=1)
                nmis, purities = {}, {}
                for name, lab in labels.items():
                    base, base_std, pur_base = al.shuffled_baseline(lab, comp, rng)
                    nmis[name] = (al.nmi(lab, comp), base, base_std)
                    if name in categories.partitions:
                        purities[name] = (al.purity(lab, comp), pur_base)
                rows.append({"layer": l, "head": h, "stream": stream, "nmi": nmis,
                             "purity": purities[main][0], "purity_baseline": purities[main][1],
                             "purities": purities})
                if stream == "k":
                    class_means[(l, h)] = al.mean_responsibility_by_label(rf, labels[main], n_main)
    return rows, class_means


def _per_class(sample, categories, class_names, rng):
    """The routing against the class of the row (a classification task): per layer, head
    and stream the usage of each class, exp(H) of it, the class information of the
    routing and the NMI / purity of the argmax component with the class, against
    baselines that permute the class labels across rows; and the class NMI within each
    category of the first partition (module docstring of alignment.py)."""
    real = sample.real
    B, N = real.shape
    C = len(class_names)
    cls = np.broadcast_to(sample.row_labels[:, None], (B, N))[real]          # (T,)
    rows_of = np.broadcast_to(np.arange(B)[:, None], (B, N))[real]           # (T,)
    main = next(iter(categories.partitions))
    cat_labels, cat_names = categories.partitions[main]
    cat = cat_labels[real]
    out = {"names": tuple(class_names), "main": main,
           "rows": np.bincount(sample.row_labels, minlength=C),
           "tokens": np.bincount(cls, minlength=C), "heads": [], "within": [],
           "categories": tuple(n for i, n in enumerate(cat_names)
                               if (cat == i).sum() >= MIN_CATEGORY_TOKENS)}
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            for stream, r in _streams(layer):
                rf = _flat(r, h, real)
                comp = rf.argmax(axis=1)
                base, base_std, pur_base = al.shuffled_baseline(cls, comp, rng, groups=rows_of)
                u_c = al.mean_responsibility_by_label(rf, cls, C)                  # (C, K)
                tok_h = entropy(rf)
                present = out["tokens"] > 0
                pred = {}
                if sample.predicted is not None:
                    pc = np.broadcast_to(sample.predicted[:, None], (B, N))[real]
                    pb, _, _ = al.shuffled_baseline(pc, comp, rng, groups=rows_of)
                    pred = {"predicted_nmi": (al.nmi(pc, comp), pb),
                            "predicted_information": (
                                al.class_information(rf, pc),
                                al.class_information_baseline(rf, pc, rng, groups=rows_of))}
                out["heads"].append({**pred,
                    "layer": l, "head": h, "stream": stream, "usage": u_c,
                    "effective": np.where(present, np.exp(entropy(u_c)), np.nan),
                    "token_entropy": np.array([tok_h[cls == c].mean() if present[c] else np.nan
                                               for c in range(C)]),
                    "nmi": (al.nmi(cls, comp), base, base_std),
                    "purity": (al.purity(cls, comp), pur_base),
                    "information": (al.class_information(rf, cls),
                                    al.class_information_baseline(rf, cls, rng, groups=rows_of))})
                within = {}
                for name in out["categories"]:
                    sel = cat == cat_names.index(name)
                    b, _, _ = al.shuffled_baseline(cls[sel], comp[sel], rng, groups=rows_of[sel])
                    within[name] = (al.nmi(cls[sel], comp[sel]), b)
                out["within"].append({"layer": l, "head": h, "stream": stream, "nmi": within})
    return out


def _affinity_window(sample):
    """(row index, its real-token selector) of the row whose affinity is formed: the first
    with at most MAX_WINDOW real tokens, else (a causal body only) the first row's first
    MAX_WINDOW tokens, whose affinity is the leading block of the whole row's; None if none."""
    real = sample.real
    for b in range(real.shape[0]):
        if real[b].sum() <= aff.MAX_WINDOW:
            return b, real[b]
    if sample.causal:
        keep = real[0] & (np.cumsum(real[0]) <= aff.MAX_WINDOW)
        return 0, keep
    return None


def _affinity(sample, cfg, compare, compare_causal):
    """Stats of one row (_affinity_window), per layer and head; the matrices of head 0
    per layer. Over the row's real tokens: the padding keys carry no weight and the
    padding queries' outputs are read by nothing."""
    rows, matrices = [], {}
    window = _affinity_window(sample)
    if window is None:
        return rows, matrices, None
    w, sel = window
    causal = sample.causal
    for l, layer in enumerate(sample.layers):
        for h in range(layer.rq.shape[1]):
            rq, rk = layer.rq[w, h][sel], layer.rk[w, h][sel]
            K = rq.shape[1]
            A_bi, _ = aff.affinity(rq, rk, causal=False, norm="row")
            A, M = aff.affinity(rq, rk, causal=causal, norm=cfg["norm"])
            row = {"layer": l, "head": h, "bidirectional": aff.affinity_stats(A_bi, K),
                   "causal": aff.affinity_stats(A, K), "mixing": aff.affinity_stats(M, K)}
            P = None
            if compare is not None and l < len(compare.layers) and h < compare.layers[l].q.shape[1]:
                cl = compare.layers[l]
                P = aff.softmax_attention_map(cl.q[w, h][sel], cl.k[w, h][sel], causal=compare_causal)
                row["softmax"] = aff.affinity_stats(P, K)
            rows.append(row)
            if h == 0:
                matrices[l] = {"M": M, "P": P, "spectra": {}}
            matrices[l]["spectra"][h] = (row["bidirectional"]["singular_values"],
                                         row["causal"]["singular_values"],
                                         None if P is None else row["softmax"]["singular_values"])
    return rows, matrices, {"row": int(w), "tokens": int(sel.sum())}


def _stability(sample, rng):
    rows, real = [], sample.real
    for l, layer in enumerate(sample.layers):
        mix = layer.mixture
        for h in range(layer.q.shape[1]):
            x = np.concatenate([_flat(layer.q, h, real), _flat(layer.k, h, real)])   # (2 T, d)
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
                                causal=sample.causal, norm=cfg["norm"], key_mask=sample.key_mask)
        for h in range(layer.q.shape[1]):
            for stream in ("q", "k"):
                rows.append(dict(layer=l, head=h, stream=stream,
                                 **gr.gradient_summary(tg, h, stream)))
        points[l] = {key: tg[key] for key in tg if key[:2] not in ("dq", "dk", "dr")}
    return rows, points


def analyze(sample, categories, *, rng, info, compare=None, compare_info=None, class_names=None):
    """Every analysis of a GMA sample (gma_np.analysis.collect.Sample with targets), as a
    dict that write_report renders. categories: the gma_np.analysis.categories.TaskCategories
    of the sample's tokens; info: the run's facts for the report's header (run, step,
    mixer, norm, K, windows, ...); compare: a Sample of a softmax-attention run on the same
    rows (or None); class_names: the classes of a classification task, whose labels are
    sample.row_labels (the per-class analysis runs when both are given)."""
    results = {"info": info, "compare_info": compare_info,
               "partitions": {name: names for name, (_, names) in categories.partitions.items()},
               "attributes": tuple(categories.attributes)}
    results["usage"] = _usage(sample)
    results["alignment"], results["class_means"] = _alignment(sample, categories, rng)
    results["per_class"] = None
    if class_names is not None and sample.row_labels is not None:
        results["per_class"] = _per_class(sample, categories, class_names, rng)
    compare_causal = sample.causal if compare is None else compare.causal
    results["affinity"], results["affinity_matrices"], results["affinity_window"] = _affinity(
        sample, info, compare, compare_causal)
    results["stability"] = _stability(sample, rng)
    results["gradients"], results["gradient_points"] = _gradients(sample, info)
    first = sample.real[0]
    tokens = sample.tokens[0][first][:SNIPPET]
    results["snippet"] = {"tokens": tokens, "names": [categories.show(t) for t in tokens],
                          "rk": [layer.rk[0][:, first][:, :SNIPPET] for layer in sample.layers]}
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
    main = next(iter(results["partitions"]))
    nmi = [r["nmi"][main][0] for r in results["alignment"]]
    base = [r["nmi"][main][1] for r in results["alignment"]]
    gate = [r["spearman"] for r in results["gradients"]]
    lines = [
        f"- Usage: effective number of components exp(H) {np.mean(eff):.2f} on average "
        f"(min {np.min(eff):.2f}, max {np.max(eff):.2f}) of K = {K}; mean token entropy "
        f"{np.mean(ent):.2f} nats of at most log K = {np.log(K):.2f}; {dead} dead "
        f"(head, stream, component) triples.",
        f"- Alignment with the {main}: NMI {np.mean(nmi):.3f} on average "
        f"(max {np.max(nmi):.3f}) against a shuffled-label baseline of {np.mean(base):.3f}.",
    ]
    pc = results["per_class"]
    if pc is not None:
        nmi_c = [r["nmi"][0] for r in pc["heads"]]
        base_c = [r["nmi"][1] for r in pc["heads"]]
        inf = [r["information"][0] for r in pc["heads"]]
        inf_b = [r["information"][1] for r in pc["heads"]]
        lines.append(f"- Per class (the row's class): NMI of the argmax component with the class "
                     f"{np.mean(nmi_c):.3f} on average (max {np.max(nmi_c):.3f}) against "
                     f"{np.mean(base_c):.3f} with the classes permuted across rows; class "
                     f"information of the routing {np.mean(inf):.4f} nats (max {np.max(inf):.4f}) "
                     f"against {np.mean(inf_b):.4f}.")
    if results["affinity"]:
        erank = [r["mixing"]["effective_rank"] for r in results["affinity"]]
        kind = "causal" if info["causal"] else "bidirectional"
        line = (f"- Affinity: every {kind} affinity non-negative: "
                f"{_fmt(all(r['causal']['min'] >= 0 for r in results['affinity']))}; R_Q R_K^T "
                f"of rank <= K in every head: "
                f"{_fmt(all(r['bidirectional']['rank_le_K'] for r in results['affinity']))}; "
                f"effective rank of the mixing matrix {np.mean(erank):.1f} on average (a row "
                f"of {results['affinity_window']['tokens']} tokens).")
        if "softmax" in results["affinity"][0]:
            sm = [r["softmax"]["effective_rank"] for r in results["affinity"] if "softmax" in r]
            line += f" Softmax attention of the compared run: {np.mean(sm):.1f}."
        lines.append(line)
    lines.append(f"- Gradients: rank correlation of the gradient norm with the responsibility "
                 f"entropy {np.nanmean(gate):.2f} on average over heads and streams.")
    return "\n".join(lines)


def _usage_section(results):
    K = results["info"]["K"]
    rows = [[r["layer"], r["head"], r["stream"], _fmt(r["effective_components"], 2),
             _fmt(r["usage_entropy"]), _fmt(r["token_entropy"]), _fmt(float(r["usage"].max())),
             _fmt(float(r["usage"].min())), r["n_dead"]] for r in results["usage"]]
    return ("Routing mass per component u_k (mean responsibility over the sample's real tokens), "
            f"the entropy H(u) of that average and exp(H(u)), the effective number of "
            f"components (K = {K}: {K} is uniform usage, 1 is collapse), the mean per-token "
            f"entropy (max log K = {np.log(K):.3f}), and the components below "
            f"{DEAD_SHARE:g} of the uniform share 1/K (dead).\n\n"
            + _table(["layer", "head", "stream", "exp(H(u))", "H(u)", "token H", "max u_k",
                      "min u_k", "dead"], rows))


def _snippet_text(results):
    snip = results["snippet"]
    names = snip["names"]
    byte_like = all(len(n) == 1 for n in names)
    width = 1 if byte_like else max(len(n) for n in names) + 1

    def cells(items):
        return "".join(f"{x:>{width}}" for x in items)
    lines = [f"{'tokens':<10}{cells(names)}"]
    for l, rk in enumerate(snip["rk"]):
        for h in range(rk.shape[0]):
            lines.append(f"{f'L{l} H{h}':<10}" + cells(_digit(int(c)) for c in rk[h].argmax(-1)))
    shown = ("␣ is a space, ⏎ a line break, · a byte outside printable ASCII" if byte_like
             else "padding left out")
    return ("The first row's first tokens and, under each, the argmax component of "
            f"its key in every layer and head (components written 0-9, a-z, A-Z; {shown})."
            "\n\n```\n" + "\n".join(lines) + "\n```")


def _alignment_section(results):
    def cell(v):
        return f"{_fmt(v[0])} ({_fmt(v[1])})"
    parts = list(results["partitions"])
    main = parts[0]
    rows = [[r["layer"], r["head"], r["stream"]] + [cell(r["nmi"][p]) for p in parts]
            + [f"{_fmt(r['purity'])} ({_fmt(r['purity_baseline'])})"]
            + [cell(r["nmi"][a]) for a in results["attributes"]] for r in results["alignment"]]
    described = "; ".join(f"{p}: {', '.join(names) if len(names) <= 12 else f'{len(names)} classes'}"
                          for p, names in results["partitions"].items())
    return ("NMI (arithmetic normalisation, as scikit-learn's normalized_mutual_info_score) "
            "between each real token's argmax component and its category in each partition "
            f"({described}), and purity of the components with respect to the {main}; in "
            f"parentheses the same statistic with the labels shuffled across tokens (mean of "
            f"{al.SHUFFLES} shuffles). The attribute columns are binary labelings (the "
            "attribute or not).\n\n"
            + _table(["layer", "head", "stream"] + [f"NMI {p}" for p in parts]
                     + [f"purity {main}"] + list(results["attributes"]), rows))


def _per_class_section(results):
    pc = results["per_class"]
    names = pc["names"]
    head = [[r["layer"], r["head"], r["stream"],
             f"{_fmt(r['nmi'][0])} ({_fmt(r['nmi'][1])})",
             f"{_fmt(r['purity'][0])} ({_fmt(r['purity'][1])})",
             f"{_fmt(r['information'][0], 4)} ({_fmt(r['information'][1], 4)})",
             _fmt(float(np.nanmin(r["effective"])), 2), _fmt(float(np.nanmax(r["effective"])), 2)]
            + ([f"{_fmt(r['predicted_nmi'][0])} ({_fmt(r['predicted_nmi'][1])})",
                f"{_fmt(r['predicted_information'][0], 4)} ({_fmt(r['predicted_information'][1], 4)})"]
               if "predicted_nmi" in r else [])
            for r in pc["heads"]]
    predicted = "predicted_nmi" in pc["heads"][0]
    keys = [r for r in pc["heads"] if r["stream"] == "k"]
    per = [[c, int(pc["rows"][i]), int(pc["tokens"][i])]
           + [_fmt(float(r["effective"][i]), 2) for r in keys] for i, c in enumerate(names)]
    within = [[r["layer"], r["head"], r["stream"]]
              + [f"{_fmt(r['nmi'][c][0])} ({_fmt(r['nmi'][c][1])})" for c in pc["categories"]]
              for r in pc["within"]]
    text = ("Every real token of a row gets the row's class. Per layer, head and stream: the "
            "NMI and purity of the argmax component with the class; the class information "
            "I(class; component) = H(u) - sum_c p_c H(u^(c)) in nats (u^(c) the mean "
            "responsibility of the class's tokens; 0 when every class routes alike); the "
            "smallest and largest exp(H(u^(c))) over the classes. In parentheses the baselines: "
            f"the class labels permuted across rows (mean of {al.SHUFFLES}), which keeps each "
            "row's tokens together."
            + (" The last two columns are the NMI and the information with the class the model "
               "predicts for the row instead of the true one: routing that tracks the model's "
               "own answer scores higher there." if predicted else "") + "\n\n"
            + _table(["layer", "head", "stream", "NMI class", "purity class", "I(class; comp)",
                      "min exp(H(u^c))", "max exp(H(u^c))"]
                     + (["NMI predicted", "I(predicted; comp)"] if predicted else []), head)
            + "\n\nPer class: validation rows and real tokens in the sample, and exp(H(u^(c))) "
              "of the keys in each layer and head (K means the class spreads its mass evenly).\n\n"
            + _table(["class", "rows", "tokens"] + [f"L{r['layer']} H{r['head']}" for r in keys], per))
    if pc["categories"]:
        text += (f"\n\nThe class NMI within each {pc['main']} category (its tokens only, "
                 f"categories of at least {MIN_CATEGORY_TOKENS} tokens): does a head route the "
                 "same kind of token differently by the row's class? Baseline in parentheses "
                 "(classes permuted across rows).\n\n"
                 + _table(["layer", "head", "stream"] + list(pc["categories"]), within))
    return text


def _affinity_section(results):
    if not results["affinity"]:
        return (f"No row of the sample has at most {aff.MAX_WINDOW} real tokens, the largest "
                "window whose bidirectional affinity is formed here.")
    compare = "softmax" in results["affinity"][0]
    causal = results["info"]["causal"]
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
    K = results["info"]["K"]
    win = results["affinity_window"]
    N = win["tokens"]
    body = ("the causal affinity A = A_bi o L" if causal else
            "the affinity the bidirectional body uses, A = A_bi (every real key, padding "
            "left out)")
    text = (f"Row {win['row']} of the sample ({N} real tokens) through the dense reference: "
            f"A_bi = R_Q R_K^T (rank <= K = {K}), {body}, and the mixing matrix M the values "
            f"are averaged with ({results['info']['norm']} normalisation). Ranks are "
            "numerical (singular values above max(s) N eps); erank is the effective rank of "
            "Roy and Vetterli, exp of the entropy of s / sum(s). "
            + ("The causal mask makes A full-rank in general; every block below the diagonal "
               "keeps rank <= K." if causal else
               "Without the mask A is A_bi itself, so rank A <= K, and so is every block."))
    if compare:
        ci = results["compare_info"]
        text += (f" The last column is the softmax attention map P = softmax(q k^T / sqrt(d)) "
                 f"({'causal' if ci.get('causal', True) else 'bidirectional'}) of the compared "
                 f"run {ci['run']} ({ci['mixer']}, step {ci['step']}) on the same row.")
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
    return ("Points: the head's queries and keys of real tokens (at most "
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
    return ("Per real token, the norm of the gradient of the task's mean loss reaching q (or k) and the "
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
    heat = "".join(fig(f"heatmap_{l}", f"Key responsibilities over the first tokens, layer {l}: "
                                       f"tokens along x, components along y, one panel per head")
                   for l in range(info["layers"]))
    lm = info.get("task", "lm") == "lm"
    if lm:
        sample = (f"Sample: {info['windows']} validation windows of {info['context']} bytes of "
                  f"{info['data']} (seed {info['seed']}), mean loss {info['loss_bpb']:.3f} bits "
                  "per byte.")
    else:
        lo, hi = info["lengths"]
        metric = info.get("metric_name")
        sample = (f"Task {info['task']}, {'causal' if info['causal'] else 'bidirectional'} body. "
                  f"Sample: {info['windows']} validation rows of {lo}..{hi} tokens, "
                  f"{info['tokens']} real tokens (padding is left out of every statistic; "
                  f"seed {info['seed']}); mean loss {info['loss_nats']:.3f} nats"
                  + (f", {metric.replace('_', ' ')} {info['metric']:.3f} on these rows" if metric else "")
                  + ".")
    pc = results["per_class"]
    per_class = [] if pc is None else [
        "## Per class", _per_class_section(results)
        + fig("classes", "Routing mass of the keys per class (rows) and component (columns), "
                         "per layer and head; in each title the class information and its "
                         "baseline")]
    parts = [
        f"# Analysis of {info['run']}",
        (f"Step {info['step']}, mixer {info['mixer']}, {info['layers']} layers x {info['heads']} "
         f"heads, K = {info['K']}, {info['covariance']} covariance, {info['norm']} read-out. "
         + sample + " How to read every table and figure: docs/analysis.md."),
        "" if drawn else PLOT_HINT,
        "## Summary", _summary(results),
        "## Usage", _usage_section(results) + fig("usage", "Routing mass per component, "
                                                  "queries and keys, per layer and head; "
                                                  "the line is the uniform share 1/K"),
        "## Responsibilities over a text snippet" if lm else "## Responsibilities over a row",
        _snippet_text(results) + heat,
        "## Alignment with token categories", _alignment_section(results)
        + fig("alignment", "NMI of the argmax component with each category, per head "
                           "(dots), against the shuffled-label baseline (crosses)")
        + fig("categories", f"Mean key responsibility of each class of the "
                            f"{next(iter(results['partitions']))} (rows) on each "
                            "component (columns), per layer and head"),
        *per_class,
        "## Affinity", _affinity_section(results)
        + fig("affinity", "One row: GMA's mixing matrix M, the softmax attention map "
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
