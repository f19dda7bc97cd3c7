"""Alignment of a clustering (argmax components) with labels (token categories, classes).

Dimension legend: T tokens, A distinct labels, C distinct clusters.

Normalised mutual information with the arithmetic-mean normalisation, as
scikit-learn's `normalized_mutual_info_score` defines it (its default since 0.22):

    n_ac = #{t : label_t = a, cluster_t = c}           the contingency table (A, C)
    p_ac = n_ac / T,  p_a = sum_c p_ac,  p_c = sum_a p_ac
    MI  = sum_{a,c} p_ac log( p_ac / (p_a p_c) )        (terms with n_ac = 0 are 0; MI >= 0)
    NMI = MI / ((H(labels) + H(clusters)) / 2)

with scikit-learn's limit cases: 1 when both labelings have a single value (neither
splits the data: a perfect match), 0 when MI = 0 (otherwise). NMI is in [0, 1], 1 when
each cluster is exactly one label and each label one cluster, 0 for independence.

Purity: each cluster votes for its majority label, sum_c max_a n_ac / T, in [1/A, 1];
1 when every cluster holds one label (however many clusters share a label).

Both are biased upward on finite samples (more clusters, higher both); the baseline is
the same statistic with the labels shuffled across tokens, which keeps both marginals
and breaks the association: a statistic is worth reading only well above its baseline.
When the label belongs to a whole row (a classification task's class, given to each of
the row's tokens), the tokens of a row are not independent draws, and shuffling labels
token by token would break the row structure too and understate the baseline; the
labels are then permuted across rows (`groups`: the row of each token), which keeps
every row's tokens under one label.

Class information of the routing (soft: every token spreads its mass r_t):

    p_c = T_c / T,   u^(c) = (1/T_c) sum_{t in c} r_t,   u = sum_c p_c u^(c)
    I(class; component) = H(u) - sum_c p_c H(u^(c)) = sum_c p_c KL(u^(c) || u)      nats, >= 0

the mutual information of a token's class and a component drawn from its r_t: 0 when
every class uses the components in the same proportions, at most min(H(class), H(u)).
"""

import numpy as np
from scipy.special import entr

# Shuffles of the labels for the baseline: its mean is known to about
# std / sqrt(SHUFFLES), a few per cent of the baseline at the sample sizes of a report.
SHUFFLES = 20


def _labels(x, name):
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of labels, got shape {x.shape}")
    return x


def _codes(x):
    """(codes (T,) in [0, n), n) of a labeling: its values numbered in sorted order."""
    _, codes = np.unique(x, return_inverse=True)
    return codes.reshape(-1), (int(codes.max()) + 1 if codes.size else 0)


def _table(a, A, c, C):
    return np.bincount(a * C + c, minlength=A * C).reshape(A, C).astype(np.int64)


def contingency(labels, clusters):
    """The contingency table n (A, C) of two labelings of the same T tokens (int64)."""
    labels, clusters = _labels(labels, "labels"), _labels(clusters, "clusters")
    if labels.shape != clusters.shape:
        raise ValueError(f"clusters: expected as many entries as labels ({labels.size}), "
                         f"got {clusters.size}")
    (a, A), (c, C) = _codes(labels), _codes(clusters)
    return _table(a, A, c, C)


def mutual_information(table):
    """MI in nats of a contingency table (A, C)."""
    n = np.asarray(table, dtype=np.float64)
    p = n / n.sum()
    pa, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return max(0.0, float((p[nz] * np.log(p[nz] / (pa @ pc)[nz])).sum()))


def nmi(labels, clusters):
    """Normalised mutual information, arithmetic mean (module docstring)."""
    return nmi_of_table(contingency(labels, clusters))


def nmi_of_table(table):
    """NMI of a contingency table (A, C) (module docstring)."""
    table = np.asarray(table)
    if table.shape[0] == table.shape[1] == 1 or table.size == 0:
        return 1.0
    mi = mutual_information(table)
    if mi == 0.0:
        return 0.0
    p = table / table.sum()
    h_labels, h_clusters = entr(p.sum(1)).sum(), entr(p.sum(0)).sum()
    return mi / ((h_labels + h_clusters) / 2.0)


def purity(labels, clusters):
    """sum over clusters of their majority label's count, over T (module docstring)."""
    table = contingency(labels, clusters)
    if table.size == 0:
        raise ValueError("labels: expected at least one token")
    return float(table.max(axis=0).sum() / table.sum())


def _shuffler(labels, rng, groups):
    """A function () -> the label codes permuted across tokens, or across groups (rows)
    when groups (T,) is given (labels must then be constant within each group)."""
    a, _ = _codes(labels)
    if groups is None:
        return lambda: rng.permutation(a)
    g, n_groups = _codes(_labels(groups, "groups"))
    if g.shape != a.shape:
        raise ValueError(f"groups: expected one group per label ({a.size}), got {g.size}")
    per_group = np.full(n_groups, -1)
    per_group[g] = a
    if not np.array_equal(per_group[g], a):
        raise ValueError("groups: expected one label per group (a row's tokens share its class)")
    return lambda: rng.permutation(per_group)[g]


def shuffled_baseline(labels, clusters, rng, n_shuffles=SHUFFLES, groups=None):
    """(mean NMI, std NMI, mean purity) with the labels permuted across tokens, or across
    groups (the row of each token: module docstring) when groups (T,) is given."""
    labels, clusters = _labels(labels, "labels"), _labels(clusters, "clusters")
    if labels.shape != clusters.shape:
        raise ValueError(f"clusters: expected as many entries as labels ({labels.size}), "
                         f"got {clusters.size}")
    draw = _shuffler(labels, rng, groups)
    A = _codes(labels)[1]
    c, C = _codes(clusters)
    nmis, purities = [], []
    for _ in range(n_shuffles):
        table = _table(draw(), A, c, C)
        nmis.append(nmi_of_table(table))
        purities.append(float(table.max(axis=0).sum() / table.sum()))
    return float(np.mean(nmis)), float(np.std(nmis)), float(np.mean(purities))


def class_information(r, labels):
    """I(class; component) in nats of responsibilities r (T, K) and labels (T,) (module
    docstring): H(u) - sum_c p_c H(u^(c)), clipped at 0 against rounding."""
    r = np.asarray(r, dtype=np.float64)
    a, A = _codes(_labels(labels, "labels"))
    if r.ndim != 2 or r.shape[0] != a.size:
        raise ValueError(f"r: expected shape (T, K) with T = {a.size}, got {r.shape}")
    mass = np.zeros((A, r.shape[1]))
    np.add.at(mass, a, r)                                          # (A, K) summed r per class
    counts = np.bincount(a, minlength=A)
    u_c = mass / counts[:, None]
    p_c = counts / counts.sum()
    u = mass.sum(0) / counts.sum()
    return max(0.0, float(entr(u).sum() - (p_c * entr(u_c).sum(1)).sum()))


def class_information_baseline(r, labels, rng, n_shuffles=SHUFFLES, groups=None):
    """Mean class_information with the labels permuted (across groups when given)."""
    draw = _shuffler(_labels(labels, "labels"), rng, groups)
    return float(np.mean([class_information(r, draw()) for _ in range(n_shuffles)]))


def mean_responsibility_by_label(r, labels, n_labels):
    """M (n_labels, K): the mean responsibility vector of the tokens of each label
    (a row of zeros for a label with no token). r (T, K), labels (T,) ints in [0, n_labels)."""
    r = np.asarray(r, dtype=np.float64)
    labels = _labels(labels, "labels")
    if r.ndim != 2 or r.shape[0] != labels.size:
        raise ValueError(f"r: expected shape (T, K) with T = {labels.size}, got {r.shape}")
    sums = np.zeros((n_labels, r.shape[1]))
    np.add.at(sums, labels, r)
    counts = np.bincount(labels, minlength=n_labels)[:, None]
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
