"""gma_np.analysis: every statistic on a constructed case whose answer is known by hand,
the routing Jacobian against central finite differences, and `gma-np analyze` end to end.

Tolerances: float64 throughout; 1e-12 for closed forms, 1e-12 relative (RTOL_EXACT) where
two exact forms of one quantity are compared, 1e-7 relative for the central differences
(step 1e-5: truncation ~1e-10, rounding ~1e-11 of the entries).
"""

import argparse
import math
import os

import numpy as np
import pytest

import gma_np
from gma_np.analysis import affinity as aff
from gma_np.analysis import alignment as al
from gma_np.analysis import collect as co
from gma_np.analysis import gradients as gr
from gma_np.analysis import stability as st
from gma_np.analysis import usage as us
from gma_np.analysis.categories import ATTRIBUTES, CLASSES, byte_attributes, byte_classes

RTOL = 1e-12


def _softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def _mixture(rng, H, K, d, spherical=False):
    means = rng.standard_normal((H, K, d))
    log_var = 0.3 * rng.standard_normal((H, K) if spherical else (H, K, d))
    logits = 0.5 * rng.standard_normal((H, K))
    return means, log_var, logits


# ---------------------------------------------------------------- alignment

def test_nmi_hand_case_2x2():
    # table [[1, 1], [0, 2]] of T = 4 tokens, worked out on paper
    mi = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    h_labels = math.log(2)
    h_clusters = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = mi / ((h_labels + h_clusters) / 2)
    assert al.nmi([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(expected, rel=RTOL)
    assert al.mutual_information(al.contingency([0, 0, 1, 1], [0, 1, 1, 1])) == pytest.approx(mi, rel=RTOL)


def test_components_that_are_the_categories_give_nmi_and_purity_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 501)
    clusters = np.array([4, 0, 2, 5, 1, 3])[labels] + 10          # a relabelling of the categories
    assert al.nmi(labels, clusters) == pytest.approx(1.0, rel=RTOL)
    assert al.purity(labels, clusters) == 1.0
    base, _, base_purity = al.shuffled_baseline(labels, clusters, rng)
    assert base < 0.05 and base_purity < 0.5


def test_independent_labels_give_nmi_zero():
    # exactly independent: the contingency table is an outer product
    assert al.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 20001), rng.integers(0, 5, 20001)
    assert al.nmi(a, b) < 2e-3                     # the finite-sample bias, (A-1)(C-1)/2T / H


def test_nmi_limit_cases_as_scikit_learn():
    assert al.nmi([3, 3, 3], [1, 1, 1]) == 1.0     # neither splits the data
    assert al.nmi([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert al.nmi([0, 1, 2, 3], [5, 5, 5, 5]) == 0.0


def test_purity_hand_case():
    # cluster 0 holds a, a, b (majority 2), cluster 1 holds b, b (2): 4 / 5
    assert al.purity(["a", "a", "b", "b", "b"], [0, 0, 0, 1, 1]) == pytest.approx(0.8, rel=RTOL)


def test_nmi_matches_scikit_learn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for T, A, C in ((37, 3, 5), (200, 7, 16), (1000, 2, 4)):
        a, b = rng.integers(0, A, T), rng.integers(0, C, T)
        assert al.nmi(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), rel=1e-10)


def test_mean_responsibility_by_label():
    r = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m = al.mean_responsibility_by_label(r, np.array([0, 0, 2]), 4)
    np.testing.assert_allclose(m, [[0.5, 0.5], [0, 0], [0.5, 0.5], [0, 0]], rtol=RTOL)


def test_alignment_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="clusters"):
        al.nmi([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        al.nmi(np.zeros((2, 2)), np.zeros((2, 2)))


# ---------------------------------------------------------------- categories

def test_byte_categories_hand_case():
    text = b"The cat, 42 ate.\nX"
    a = byte_attributes(text)
    as_str = lambda m: "".join("1" if v else "." for v in m)
    assert as_str(a["letter"]) == "111.111.....111..1"
    assert as_str(a["vowel"]) == "..1..1......1.1..."
    assert as_str(a["digit"]) == ".........11......."
    assert as_str(a["whitespace"]) == "...1....1..1....1."
    assert as_str(a["punctuation"]) == ".......1.......1.."
    assert as_str(a["upper case"]) == "1................1"
    assert as_str(a["start of word"]) == "1...1....1..1....1"
    classes = byte_classes(text)
    assert [CLASSES[c] for c in classes[:4]] == ["consonant", "consonant", "vowel", "whitespace"]
    assert CLASSES[classes[9]] == "digit" and CLASSES[classes[7]] == "punctuation"
    assert CLASSES[byte_classes(bytes([0xC3, 0x9F]))[0]] == "other"
    # the byte before the window decides whether its first byte starts a word
    assert not byte_attributes(b"he", previous=ord("t"))["start of word"][0]
    assert set(a) == set(ATTRIBUTES)


def test_byte_categories_bad_input():
    with pytest.raises(ValueError, match="data"):
        byte_classes(np.array([1, 300]))
    with pytest.raises(TypeError, match="data"):
        byte_classes(np.array([0.5]))


# ---------------------------------------------------------------- usage

def test_uniform_router_gives_exp_entropy_k():
    K = 7
    r = np.full((3, 37, K), 1.0 / K)
    s = us.usage_stats(r)
    assert s["effective_components"] == pytest.approx(K, rel=RTOL)
    assert s["token_entropy"] == pytest.approx(math.log(K), rel=RTOL)
    assert s["n_dead"] == 0


def test_confident_routing_spread_over_all_components():
    K, per = 5, 11
    r = np.repeat(np.eye(K), per, axis=0)                          # one-hot, each used equally
    s = us.usage_stats(r)
    assert s["effective_components"] == pytest.approx(K, rel=RTOL)
    assert s["token_entropy"] == 0.0
    collapsed = us.usage_stats(np.tile(np.eye(K)[2], (per, 1)))
    assert collapsed["effective_components"] == pytest.approx(1.0, rel=RTOL)
    assert collapsed["n_dead"] == K - 1


def test_dead_components_counted_at_the_stated_share():
    K = 5
    counts = np.array([4000, 3000, 2989, 1, 2010])                 # shares 0.4 .. 1e-4 .. 0.201
    r = np.repeat(np.eye(K), counts, axis=0)
    u = us.component_usage(r)
    assert u[3] < us.DEAD_SHARE / K
    np.testing.assert_array_equal(us.dead_components(u), [3])
    # just above the threshold is not dead
    u2 = np.array([0.5, 0.3, 0.19, 1.01 * us.DEAD_SHARE / K, 0.0])
    np.testing.assert_array_equal(us.dead_components(u2), [4])


# ---------------------------------------------------------------- affinity

def test_rank_k_affinity_has_k_nonzero_singular_values():
    rng = np.random.default_rng(3)
    N, K = 37, 5
    rq, rk = _softmax(rng.standard_normal((N, K))), _softmax(rng.standard_normal((N, K)))
    A, _ = aff.affinity(rq, rk, causal=False)
    s = aff.singular_values(A)
    assert (s[:K] > 1e-3 * s[0]).all() and (s[K:] < 1e-13 * s[0]).all()
    stats = aff.affinity_stats(A, K)
    assert stats["rank"] == K and stats["rank_le_K"] and stats["min"] >= 0
    np.testing.assert_allclose(A, rq @ rk.T, rtol=RTOL)


def test_causal_affinity_is_k_semiseparable_not_rank_k():
    rng = np.random.default_rng(4)
    N, K = 37, 3
    rq, rk = _softmax(rng.standard_normal((N, K))), _softmax(rng.standard_normal((N, K)))
    A, M = aff.affinity(rq, rk, causal=True)
    assert np.all(np.triu(A, 1) == 0) and A.min() >= 0
    assert aff.affinity_stats(A, K)["rank"] > K
    assert max(aff.lower_block_ranks(A, range(1, N))) == K
    # K = 1: every responsibility is 1 and A is the lower-triangular mask, full rank
    ones = np.ones((N, 1))
    assert aff.affinity_stats(aff.affinity(ones, ones, causal=True)[0], 1)["rank"] == N
    # row normalisation: rows of M sum to (A 1) / (A 1 + eps)
    rows = A.sum(1)
    np.testing.assert_allclose(M.sum(1), rows / (rows + 1e-6), rtol=RTOL)


@pytest.mark.parametrize("norm", ["row", "slot"])
def test_mixing_matrix_reproduces_the_engine(norm):
    rng = np.random.default_rng(5)
    N, d, e, K = 37, 3, 4, 5
    q, k = rng.standard_normal((2, 1, 1, N, d))
    v = rng.standard_normal((1, 1, N, e))
    means, log_var, logits = _mixture(rng, 1, K, d)
    rq = gma_np.responsibilities(q, means, log_var, logits, 0.8)[0, 0]
    rk = gma_np.responsibilities(k, means, log_var, logits, 0.8)[0, 0]
    _, M = aff.affinity(rq, rk, causal=True, norm=norm)
    o = gma_np.gma(q, k, v, means, log_var, logits, causal=True, norm=norm, temperature=0.8)
    np.testing.assert_allclose(M @ v[0, 0], o[0, 0], rtol=1e-10, atol=1e-13)


def test_effective_rank_hand_case_and_the_softmax_pitfall():
    s = np.array([3.0, 1.0])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))     # 1.7548...
    assert aff.effective_rank(s) == pytest.approx(expected, rel=RTOL)
    assert aff.effective_rank(10 * s) == pytest.approx(expected, rel=RTOL)   # scale-invariant
    p = _softmax(s)
    softmax_version = math.exp(-(p * np.log(p)).sum())
    assert abs(softmax_version - expected) > 0.3                          # the pitfall differs
    assert aff.effective_rank(np.ones(9)) == pytest.approx(9, rel=RTOL)
    assert aff.effective_rank(np.array([2.0, 0, 0, 0])) == pytest.approx(1.0, rel=RTOL)
    # a zero singular value counts for nothing (a softmax would count it)
    assert aff.effective_rank(np.array([1.0, 1.0, 0.0])) == pytest.approx(2.0, rel=RTOL)


def test_softmax_attention_map_matches_the_softmax_reference():
    naive = pytest.importorskip("gma_np.mixers.softmax.naive")
    rng = np.random.default_rng(6)
    N, d, e = 37, 4, 3
    q, k = rng.standard_normal((2, 1, 1, N, d))
    v = rng.standard_normal((1, 1, N, e))
    P = aff.softmax_attention_map(q[0, 0], k[0, 0], causal=True)
    assert np.all(np.triu(P, 1) == 0)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=RTOL)
    o = naive.softmax_attention_naive_forward(q, k, v, causal=True)[0]
    np.testing.assert_allclose(P @ v[0, 0], o[0, 0], rtol=1e-10, atol=1e-13)


def test_affinity_bad_input():
    with pytest.raises(ValueError, match="rq: expected a window of at most"):
        aff.affinity(np.ones((aff.MAX_WINDOW + 1, 2)), np.ones((aff.MAX_WINDOW + 1, 2)))
    with pytest.raises(ValueError, match="norm"):
        aff.affinity(np.ones((3, 2)), np.ones((3, 2)), norm="col")


# ---------------------------------------------------------------- stability

@pytest.mark.parametrize("spherical", [False, True], ids=["diag", "spherical"])
def test_jacobian_matches_central_differences(spherical):
    rng = np.random.default_rng(7)
    T, K, d, tau = 7, 5, 3, 0.7
    means, log_var, logits = (a[0] for a in _mixture(rng, 1, K, d, spherical))
    x = rng.standard_normal((T, d))
    r, J = st.jacobian(x, means, log_var, logits, tau)
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=RTOL)
    h = 1e-5
    fd = np.empty_like(J)
    for j in range(d):
        dx = np.zeros(d)
        dx[j] = h
        fd[:, :, j] = (st.route(x + dx, means, log_var, logits, tau)
                       - st.route(x - dx, means, log_var, logits, tau)) / (2 * h)
    np.testing.assert_allclose(J, fd, rtol=1e-7, atol=1e-9)


def test_jacobian_is_below_its_bounds():
    rng = np.random.default_rng(8)
    T, K, d = 37, 5, 4
    means, log_var, logits = (a[0] for a in _mixture(rng, 1, K, d))
    x = 1.5 * rng.standard_normal((T, d))
    for tau in (0.3, 1.0, 2.5):
        b = st.jacobian_bounds(x, means, log_var, logits, tau)
        assert (b["spectral"] <= b["local"] * (1 + 1e-12)).all()
        assert (b["local"] <= b["max_gradient"] * (1 + 1e-12)).all()
        assert (b["max_gradient"] <= b["global"] * (1 + 1e-12)).all()
        # the local bound holds for the 2 -> 1 norm: ||J u||_1 for random unit u
        _, J = st.jacobian(x, means, log_var, logits, tau)
        u = rng.standard_normal((T, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        assert (np.abs(np.einsum("tkd,td->tk", J, u)).sum(1) <= b["local"] * (1 + 1e-12)).all()


def test_jacobian_on_the_boundary_of_two_components_hand_case():
    # mu = -a, +a, equal spherical variance s2, equal weights, x = 0: r = (1/2, 1/2) and
    # ||J||_2 = sqrt(2) ||g_1 - g_2|| / (4 tau) = ||a|| / (sqrt(2) s2 tau)
    a, s2 = np.array([0.6, -0.8, 0.0]), 0.5
    means, log_var, logits = np.stack([-a, a]), np.full(2, math.log(s2)), np.zeros(2)
    for tau in (1.0, 0.5, 0.25):
        b = st.jacobian_bounds(np.zeros((1, 3)), means, log_var, logits, tau)
        expected = np.linalg.norm(a) / (math.sqrt(2) * s2 * tau)
        assert b["spectral"][0] == pytest.approx(expected, rel=RTOL)


def test_perturbations_stay_below_the_bound():
    rng = np.random.default_rng(9)
    T, K, d, tau = 200, 5, 4, 0.6
    means, log_var, logits = (a[0] for a in _mixture(rng, 1, K, d))
    x = rng.standard_normal((T, d))
    sizes = [1e-4, 1e-2, 0.3, 3.0]
    p = st.perturbation_sensitivity(x, means, log_var, logits, tau, sizes, rng)
    assert (p["violations"] == 0).all()
    assert (np.diff(p["mean"]) > 0).all() and p["flips"][0] < p["flips"][-1]
    # the linear regime: ||delta r||_1 / size near the mean of ||J u||_1, which <= mean ||J||_{2->1}
    b = st.jacobian_bounds(x, means, log_var, logits, tau)
    assert p["mean"][0] / sizes[0] <= b["local"].mean()
    sweep = st.temperature_sweep(x, means, log_var, logits, tau, rng)
    assert (np.diff(sweep["entropy"]) > 0).all()                   # hotter: softer routing
    assert (sweep["spectral"] <= sweep["local"] * (1 + 1e-12)).all()


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("norm", ["row", "slot"])
def test_gradients_through_the_routing_jacobian(norm):
    rng = np.random.default_rng(10)
    B, H, N, d, e, K = 2, 2, 37, 3, 4, 5
    q, k = rng.standard_normal((2, B, H, N, d))
    v, do = rng.standard_normal((2, B, H, N, e))
    means, log_var, logits = _mixture(rng, H, K, d)
    tau = np.array([0.7, 1.3])
    tg = gr.token_gradients(q, k, v, do, means, log_var, logits, tau, causal=True, norm=norm)
    for h in range(H):
        for name, x, dr in (("q", q, tg["drq"]), ("k", k, tg["drk"])):
            for b in range(B):
                _, J = st.jacobian(x[b, h], means[h], log_var[h], logits[h], tau[h])
                np.testing.assert_allclose(np.einsum("tkd,tk->td", J, dr[b, h]),
                                           tg["d" + name][b, h], rtol=1e-9, atol=1e-12)
            s = gr.gradient_summary(tg, h, name)
            assert s["gate_ok"] == 1.0
            # the bound of the docs: ||dq_i|| <= (2/tau) (1 - max r) ||G_i||_2 ||dR_i||
            x_h = x[:, h].reshape(-1, d)
            G = st.log_density_gradients(x_h, means[h], log_var[h])
            dr_h = dr[:, h].reshape(-1, K)
            bound = (2 / tau[h]) * (1 - tg[f"rmax_{name}"][h]) * np.linalg.norm(G, ord=2, axis=(1, 2)) \
                * np.linalg.norm(dr_h, axis=1)
            assert (tg[f"grad_{name}"][h] <= bound * (1 + 1e-9)).all()


def test_binned_medians():
    ent = np.arange(100.0)
    centres, med = gr.binned_medians(ent, 2 * ent, n_bins=4)
    assert len(centres) == 4
    np.testing.assert_allclose(med, 2 * centres, rtol=RTOL)


# ---------------------------------------------------------------- collection and the model

def _tiny_model(dtype="float32", seed=0):
    from gma_np.nn.model import LanguageModel, ModelConfig
    cfg = ModelConfig(max_len=32, d_model=16, n_layers=2, n_heads=2, head_dim=4, value_dim=4,
                      n_components=5, dtype=dtype)
    model = LanguageModel(cfg, seed=seed)
    idx = np.random.default_rng(seed).integers(32, 127, (3, 32))
    model.init_from_data(idx)
    return model, idx


def test_collect_gradients_are_the_models():
    """do recorded in the model's backward, pushed through gma_backward and the query
    projection, gives the model's own dW_q of every layer."""
    from gma_np.mixers.attention import merge_heads
    model, idx = _tiny_model("float64")
    targets = np.roll(idx, -1, axis=1)
    sample = co.collect(model, idx, targets)
    loss, grads = model.loss_and_grads(idx, targets)
    assert sample.loss == pytest.approx(loss, rel=RTOL)
    cfg = model.cfg
    for l, layer in enumerate(sample.layers):
        mix = layer.mixture
        _, cache = gma_np.gma_forward(layer.q, layer.k, layer.v, mix["means"], mix["log_var"],
                                      mix["logits"], causal=True, norm=cfg.norm,
                                      temperature=mix["temperature"])
        dq = gma_np.gma_backward(layer.do, cache)["q"]
        dWq = np.einsum("bnD,bnc->Dc", layer.h, merge_heads(dq))
        np.testing.assert_allclose(dWq, grads[f"h{l}.gma.Wq"], rtol=1e-9, atol=1e-14)
        r = gma_np.responsibilities(layer.q, mix["means"], mix["log_var"], mix["logits"],
                                    mix["temperature"])
        np.testing.assert_allclose(layer.rq, r, rtol=RTOL)


def test_usage_summary_counts_a_killed_component():
    model, idx = _tiny_model()
    before = co.usage_summary(model, idx)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert set(before) == {"eff_components", "eff_components_min", "token_entropy", "dead_q", "dead_k"}
    assert 1 <= before["eff_components_min"] <= before["eff_components"] <= model.cfg.n_components
    for l in range(L):
        name = f"h{l}.gma.logits"
        sample = co.collect(model, idx)
        assert (us.component_usage(sample.layers[l].rk[:, 0].reshape(-1, 5))[2]
                >= us.DEAD_SHARE / 5)                  # component 2 was alive
        logits = model.params[name].copy()
        logits[:, 2] = -200.0                          # prior weight e^-200: nothing routes there
        model.params[name] = logits
    after = co.usage_summary(model, (idx, idx))
    assert after["dead_q"] - before["dead_q"] == L * H
    assert after["dead_k"] - before["dead_k"] == L * H
    assert after["eff_components"] < before["eff_components"]


def test_sample_windows_and_categories():
    data = np.frombuffer(b"Hello world, 12 times.\n" * 5, dtype=np.uint8)
    idx, targets, previous = co.sample_windows(data, 16, 4, np.random.default_rng(0))
    assert idx.shape == targets.shape == (4, 16)
    np.testing.assert_array_equal(idx[:, 1:], targets[:, :-1])
    attrs, classes = co.window_categories(idx, previous)
    assert attrs["letter"].shape == classes.shape == (4, 16)
    with pytest.raises(co.AnalysisError, match="validation split"):
        co.sample_windows(data[:10], 16, 4, np.random.default_rng(0))


# ---------------------------------------------------------------- gma-np analyze

def _write_run(run_dir, seed=0, mixer="gma"):
    """A run directory holding an untrained test-preset model, as the trainer writes one."""
    from gma_np.nn.model import LanguageModel
    from gma_np.optim import AdamW
    from gma_np.train import load_corpus, preset, save_checkpoint
    from gma_np.train.data import sample_batch
    cfg = preset("test", seed=seed, model=dict(mixer=mixer))
    model = LanguageModel(cfg.model_config(), seed=seed)
    rng = np.random.default_rng(seed)
    first, _ = sample_batch(load_corpus(cfg.data, cfg.val_fraction).train, cfg.batch_size,
                            cfg.context, rng)
    model.init_from_data(first)
    save_checkpoint(str(run_dir), model.params, AdamW(model.params).state_arrays(),
                    {"step": 0, "config": cfg.to_dict(), "rng": rng.bit_generator.state,
                     "val_bpb": None})
    return str(run_dir)


def _parse(argv):
    from gma_np.analysis.commands import add_subcommand
    from gma_np.cli import Parser
    parser = Parser(prog="gma-np")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


SECTIONS = ("## Summary", "## Usage", "## Responsibilities over a text snippet",
            "## Alignment with token categories", "## Affinity", "## Routing stability",
            "## Gradient structure")
FIGURES = ("usage.png", "heatmap_layer0.png", "alignment.png", "categories.png", "affinity.png",
           "stability.png", "gradients.png")


def test_analyze_writes_the_report(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    out = tmp_path / "report"
    args = _parse(["analyze", run, "--out", str(out), "--windows", "3", "--compare", run])
    assert args.run(args) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert section in text
    assert "erank softmax P" in text                # the compared run's column
    assert "not softmax" in capsys.readouterr().err  # compared with a GMA run: said so
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert 'pip install "gma_np[plot]"' in text
        assert not any(name.endswith(".png") for name in os.listdir(out))
    else:
        for name in FIGURES:
            assert (out / name).stat().st_size > 0 and f"]({name})" in text


def test_analyze_beside_a_softmax_run(tmp_path, capsys, monkeypatch):
    from gma_np.analysis import figures
    from gma_np.mixers import MIXER_NAMES
    if "softmax" not in MIXER_NAMES:
        pytest.skip("the softmax mixer is not registered")
    monkeypatch.setattr(figures, "_pyplot", lambda: None)         # the tables are the point here
    run, softmax = _write_run(tmp_path / "run"), _write_run(tmp_path / "sm", mixer="softmax")
    args = _parse(["analyze", run, "--windows", "2", "--compare", softmax])
    assert args.run(args) == 0
    assert "warning" not in capsys.readouterr().err
    text = open(os.path.join(run, "analysis", "report.md"), encoding="utf-8").read()
    assert "(softmax, step 0)" in text
    row = [line for line in text.splitlines() if line.startswith("| 0 | 0 | 0.000 |")][0]
    assert float(row.split("|")[-2]) >= 1.0                        # an effective rank of P
    # a softmax run is not a GMA run
    args = _parse(["analyze", softmax])
    assert args.run(args) == 1
    assert "expected a GMA run" in capsys.readouterr().err
    if "mamba" in MIXER_NAMES:                                      # no queries and keys at all
        args = _parse(["analyze", run, "--compare", _write_run(tmp_path / "mb", mixer="mamba")])
        assert args.run(args) == 1
        assert "--compare" in capsys.readouterr().err


def test_analyze_without_matplotlib_writes_the_tables_and_the_hint(tmp_path, monkeypatch):
    from gma_np.analysis import figures
    monkeypatch.setattr(figures, "_pyplot", lambda: None)
    run = _write_run(tmp_path / "run")
    args = _parse(["analyze", run, "--windows", "2", "--seed", "3"])
    assert args.run(args) == 0
    out = os.path.join(run, "analysis")
    text = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert 'pip install "gma_np[plot]"' in text and "| layer | head |" in text
    assert not any(name.endswith(".png") for name in os.listdir(out))


def test_analyze_errors_are_one_line(tmp_path, capsys):
    args = _parse(["analyze", str(tmp_path / "missing")])
    assert args.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("gma-np analyze: error: ") and err.count("\n") == 1
    run = _write_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    args = _parse(["analyze", run, "--out", str(tmp_path / "file")])
    assert args.run(args) == 1
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _parse(["analyze", run, "--windows", "0"])
    assert exc.value.code == 2
