"""Methods that update weights: Gram statistics, SparseGPT, DSnoT, R²-DSnoT."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.calibration.moments import Moments
from stade_cli.cli.app import app
from stade_cli.masks import NM, Unstructured
from stade_cli.metrics import LayerContext, LayerStats, dsnot, get_metric, r2dsnot, sparsegpt

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def layer(seed=0, rows=6, cols=16, tokens=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)   # correlated inputs
    x = (torch.randn(tokens, cols, generator=g) @ mix + torch.linspace(-1, 2, cols)).double()
    w = torch.randn(rows, cols, generator=g)
    return x, w, LayerStats(Moments.of(x), x.T @ x)


def slow_sparsegpt(w, x, pattern, percdamp=0.01):
    """Textbook OBS, one column at a time, no blocks or lazy updates (N:M masks only)."""
    w = w.double().clone()
    h = 2 * x.T @ x / x.shape[0]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(w.shape[1]):
        if i % pattern.m == 0:
            sal = w[:, i:i + pattern.m] ** 2 / torch.diag(u)[i:i + pattern.m] ** 2
            for r in range(w.shape[0]):
                order = sorted(range(pattern.m), key=lambda j: (float(sal[r, j]), j))
                mask[r, [i + j for j in order[:pattern.m - pattern.n]]] = True
        q = torch.where(mask[:, i], torch.zeros((), dtype=w.dtype), w[:, i])
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        w[:, i] = q
    return w, mask


@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_sparsegpt_matches_textbook_obs(blocksize):
    x, w, stats = layer()
    ctx = LayerContext(options=sparsegpt.Options(blocksize=blocksize))
    new, mask = get_metric("sparsegpt").solve(w, stats, NM(2, 4), ctx)
    ref, ref_mask = slow_sparsegpt(w, x, NM(2, 4))
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref, atol=1e-4)
    assert ((new == 0) == mask).all()


def test_sparsegpt_with_orthogonal_inputs_is_magnitude():
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    stats = LayerStats(Moments(2, torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)),
                       torch.eye(8, dtype=torch.float64))           # H = 2/N · I = I
    new, mask = get_metric("sparsegpt").solve(w, stats, Unstructured(0.5), LayerContext())
    expected = Unstructured(0.5, "layer").mask(w.abs())
    assert torch.equal(mask, expected)
    assert torch.equal(new, torch.where(mask, 0.0, w))               # nothing to compensate


def test_sparsegpt_reconstructs_better_than_masking():
    x, w, stats = layer(1, rows=8, cols=32)
    new, mask = get_metric("sparsegpt").solve(w, stats, Unstructured(0.5), LayerContext())
    dense = x @ w.double().T
    assert torch.linalg.norm(dense - x @ new.double().T) < 0.8 * torch.linalg.norm(dense - x @ torch.where(mask, 0.0, w).double().T)
    assert int(mask.sum()) == pytest.approx(0.5 * mask.numel(), abs=mask.shape[0])


def test_sparsegpt_dead_inputs():
    x, w, _ = layer(3)
    x[:, 5] = 0
    new, _ = get_metric("sparsegpt").solve(w, LayerStats(Moments.of(x), x.T @ x), NM(2, 4), LayerContext())
    assert (new[:, 5] == 0).all() and torch.isfinite(new).all()


def _row_error(w, mask, mean):
    return (torch.where(mask, w, torch.zeros(())).double() @ mean)


@pytest.mark.parametrize("name", ["dsnot", "r2dsnot"])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_dsnot_invariants(name, pattern):
    x, w, stats = layer(4, rows=10, cols=32)
    ctx = LayerContext(options=dsnot.Options(dsnot_threshold=0.0))
    init = pattern.mask(get_metric("wanda").score(w, stats.moments, ctx))
    new, mask = get_metric(name).solve(w, stats, pattern, ctx)
    assert torch.equal(mask.sum(1), init.sum(1))                      # per-row sparsity unchanged
    if isinstance(pattern, NM):
        assert (mask.view(10, -1, 4).sum(-1) == 2).all()
    assert not torch.equal(mask, init)                                # it did swap something
    e0, e1 = _row_error(w, init, stats.moments.mean), _row_error(w, mask, stats.moments.mean)
    assert (e1.abs() <= e0.abs() + 1e-9).all()                        # never worse, per row
    assert ((torch.sign(e1) == torch.sign(e0)) | (e1 == 0)).all()     # keeps the sign
    assert torch.equal(new, torch.where(mask, 0.0, w))                # kept weights unchanged


def test_dsnot_zero_cycles_is_init_and_r2_reduces_to_dsnot():
    x, w, stats = layer(5, rows=10, cols=32)
    pattern = Unstructured(0.5)
    none = LayerContext(options=dsnot.Options(dsnot_cycles=0))
    assert torch.equal(get_metric("dsnot").solve(w, stats, pattern, none)[1],
                       pattern.mask(get_metric("wanda").score(w, stats.moments, none)))
    plain = LayerContext(options=dsnot.Options(dsnot_threshold=0.01))
    r2_as_dsnot = LayerContext(options=r2dsnot.Options(dsnot_threshold=0.01, r2_gamma1=0.0, r2_gamma2=0.0))
    assert torch.equal(get_metric("dsnot").solve(w, stats, pattern, plain)[1],
                       get_metric("r2dsnot").solve(w, stats, pattern, r2_as_dsnot)[1])


def test_dsnot_by_hand():
    # one row, mean μ = 1 everywhere, σ = 1: D = W. Init (magnitude) prunes 0.5 and 0.6: e = 1.1 > 0.
    w = torch.tensor([[0.5, 0.6, -0.7, 3.0]])
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]).double()
    stats = LayerStats(Moments.of(x))
    ctx = LayerContext(options=dsnot.Options(init="magnitude", dsnot_threshold=0.1))
    _, mask = get_metric("dsnot").solve(w, stats, Unstructured(0.5), ctx)
    # regrow the largest D·sign(e) (0.6), prune the kept weight with D < 0 (-0.7): e = 1.1 - 0.6 - 0.7 < 0 flips
    # the sign, so the swap is refused and the mask stays
    assert mask.tolist() == [[True, True, False, False]]
    w2 = torch.tensor([[0.5, 0.6, -0.2, 3.0, 1.0, -0.9]])
    x2 = torch.tensor([[0.0] * 6, [2.0] * 6]).double()
    _, mask2 = get_metric("dsnot").solve(w2, LayerStats(Moments.of(x2)), Unstructured(0.5), ctx)
    # init prunes -0.2, 0.5, 0.6 (e = 0.9); swap 1: regrow 0.6, prune -0.9 → e = -0.6: sign flips, refused
    assert mask2.tolist() == [[True, True, True, False, False, False]]


# ------------------------------------------------------------------------------------ Gram statistics
@pytest.fixture(scope="module")
def gram_stats(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "stats"
    run("calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", 3, "--seqlen", 16, "--gram")
    return out


def test_gram_equals_direct_products(tiny_llama, gram_stats):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stade_cli.calibration.store import load_stats
    from stade_cli.data import calibration_windows, load_corpus

    st = load_stats(gram_stats)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama), load_corpus("builtin", "calibration"),
                                  3, 16, 0, 256)
    seen = {}
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        mod = dict(model.named_modules())[name]
        mod.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for name, xs in seen.items():
        x = torch.cat(xs).double()
        assert torch.allclose(st.gram(name).double(), x.T @ x, rtol=1e-4, atol=1e-4), name
    groups = st.manifest["gram"]["groups"]
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups.values()
    assert len(groups) == 8 and st.manifest["gram"]["bytes"] == 8 * 0 + sum(
        st.gram(lead).numel() * st.gram(lead).element_size() for lead in groups)
    assert sorted(p.name for p in (gram_stats / "gram").iterdir()) == ["block_0000.safetensors", "block_0001.safetensors"]
    summary = json.loads(run("inspect", gram_stats, "--json").stdout)
    assert summary["gram_bytes"] == st.manifest["gram"]["bytes"]


def test_a_truncated_gram_file_is_refused_before_the_work(tiny_llama, gram_stats, tmp_path):
    import shutil

    stats = shutil.copytree(gram_stats, tmp_path / "stats")
    last = stats / "gram" / "block_0001.safetensors"
    last.write_bytes(last.read_bytes()[:-100])
    r = run("prune", tiny_llama, "--metric", "sparsegpt", "--stats", stats, "-o", tmp_path / "x", code=1)
    assert "block_0001.safetensors is truncated or corrupt" in r.stderr and "--gram" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_sparsegpt_needs_gram(tiny_llama, gram_stats, tmp_path):
    plain = tmp_path / "plain"
    run("calibrate", tiny_llama, "-o", plain, "--dataset", "builtin", "--nsamples", 3, "--seqlen", 16)
    r = run("prune", tiny_llama, "--metric", "sparsegpt", "--stats", plain, "-o", tmp_path / "x", code=1)
    assert "--gram" in r.stderr and not (tmp_path / "x").exists()
    r = run("prune", tiny_llama, "--metric", "dsnot", "--init", "sparsegpt", "--stats", plain, "-o", tmp_path / "x", code=1)
    assert "--gram" in r.stderr


@pytest.mark.parametrize("args", [["--metric", "sparsegpt"], ["--metric", "sparsegpt", "--pattern", "2:4"],
                                  ["--metric", "dsnot"], ["--metric", "dsnot", "--init", "stade", "--pattern", "4:8"],
                                  ["--metric", "r2dsnot"], ["--metric", "dsnot", "--init", "sparsegpt"]])
def test_solvers_through_cli(tiny_llama, gram_stats, tmp_path, args):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run("prune", tiny_llama, "--stats", gram_stats, *args, "-o", out)
    summary = json.loads(run("inspect", out, "--json").stdout)
    assert summary["report_agrees"] and summary["overall"]["sparsity"] == pytest.approx(0.5)
    if "--pattern" in args:
        assert summary["nm_ok"]
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, l in summary["layers"].items():
        w = dict(model.named_modules())[name].weight
        if "sparsegpt" not in args or "--pattern" in args:  # its unstructured masks are per block, not per row
            assert ((w == 0).sum(1) == l["shape"][1] // 2).all(), name


def test_sparsegpt_sequential_without_gram_cache(tiny_llama, tmp_path):
    seq, one = tmp_path / "seq", tmp_path / "one"
    run("prune", tiny_llama, "--metric", "sparsegpt", "--sequential", "--dataset", "builtin", "--nsamples", 3,
        "--seqlen", 16, "-o", seq)
    run("prune", tiny_llama, "--metric", "sparsegpt", "--dataset", "builtin", "--nsamples", 3, "--seqlen", 16, "-o", one)
    a, b = load_file(seq / "model.safetensors"), load_file(one / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(a[key], b[key], atol=1e-6)                 # block 0: same inputs
    assert json.loads((seq / "stade_report.json").read_text())["mode"] == "sequential"


def slow_sparsegpt_unstructured(w, x, sparsity, blocksize, percdamp=0.01):
    """Textbook OBS for unstructured sparsity: each block's mask from the current weights (the lowest
    w²/U_jj² over its rows × columns, ties to the lower flat index), then one column at a time, every later
    column updated at once (no lazy batches)."""
    w = w.double().clone()
    h = 2 * x.T @ x / x.shape[0]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        sal = (w[:, i1:i2] ** 2 / torch.diag(u)[i1:i2] ** 2).reshape(-1).tolist()
        k = math.floor(sparsity * len(sal))
        for flat in sorted(range(len(sal)), key=lambda f: (sal[f], f))[:k]:
            mask[flat // (i2 - i1), i1 + flat % (i2 - i1)] = True
        for i in range(i1, i2):
            q = torch.where(mask[:, i], torch.zeros((), dtype=w.dtype), w[:, i])
            err = (w[:, i] - q) / u[i, i]
            w[:, i:] -= err[:, None] * u[i, i:][None, :]
            w[:, i] = q
    return w, mask


@pytest.mark.parametrize("blocksize,sparsity", [(4, 0.5), (8, 0.6), (128, 0.5)])
def test_unstructured_sparsegpt_matches_textbook_obs(blocksize, sparsity):
    x, w, stats = layer(7, rows=6, cols=24)
    ctx = LayerContext(options=sparsegpt.Options(blocksize=blocksize))
    new, mask = get_metric("sparsegpt").solve(w, stats, Unstructured(sparsity), ctx)
    ref, ref_mask = slow_sparsegpt_unstructured(w, x, sparsity, blocksize)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref, atol=1e-4)


def _hand_row():
    """One row W = [1, 1.1, -1.2, 5] over channels with μ = [0.2, 0.1, 0.05, 1] and σ = 1 (two tokens μ ± 1).
    Magnitude prunes channels 0 and 1: e = 1·0.2 + 1.1·0.1 = 0.31 > 0.1. DSnoT regrows the largest D/σ among
    the pruned (channel 0, D = 0.2) and prunes the only kept weight with D of the other sign (channel 2,
    D = −0.06): e' = 0.31 − 0.06 − 0.2 = 0.05, same sign and smaller, so the swap is accepted; then
    |e'| < 0.1 stops the row."""
    mu = torch.tensor([0.2, 0.1, 0.05, 1.0], dtype=torch.float64)
    x = torch.stack([mu + 1, mu - 1])
    w = torch.tensor([[1.0, 1.1, -1.2, 5.0]])
    return w, LayerStats(Moments.of(x))


def test_dsnot_accepts_a_swap_by_hand():
    w, stats = _hand_row()
    ctx = LayerContext(options=dsnot.Options(init="magnitude", dsnot_threshold=0.1))
    assert get_metric("magnitude").score(w, None).argsort(1).tolist() == [[0, 1, 2, 3]]
    new, mask = get_metric("dsnot").solve(w, stats, Unstructured(0.5), ctx)
    assert mask.tolist() == [[False, True, True, False]]
    assert new.tolist() == [[1.0, 0.0, 0.0, 5.0]]
    e = float((torch.where(mask, w, torch.zeros(())).double() @ stats.moments.mean))
    assert e == pytest.approx(0.05)


def test_r2dsnot_boundary_scales_with_the_row_spread():
    """s = sqrt(Σ W² σ²) = sqrt(1 + 1.21 + 1.44 + 25) = 5.3526; the row swaps while |e| = 0.31 > τ + γ₂·s."""
    w, stats = _hand_row()
    spread = math.sqrt(1 + 1.21 + 1.44 + 25)
    init = Unstructured(0.5).mask(w.abs())
    for gamma2, swaps in ((0.0, True), (0.03, True), ((0.31 - 0.1) / spread + 1e-3, False), (0.1, False)):
        ctx = LayerContext(options=r2dsnot.Options(init="magnitude", dsnot_threshold=0.1, r2_gamma2=gamma2))
        _, mask = get_metric("r2dsnot").solve(w, stats, Unstructured(0.5), ctx)
        assert mask.tolist() == ([[False, True, True, False]] if swaps else init.tolist()), gamma2


def test_r2dsnot_gamma1_blends_wanda_and_relative_importance():
    """Row 0 prunes columns 0–2 (40%, magnitude) and gets one swap: channel 0 regrows (largest D = 0.3), and
    one of the two kept weights of the other sign leaves: Wanda (|W|·‖X‖, equal norms) picks column 3
    (|W| 1.3 < 1.5); relative importance picks column 4, whose column sum row 1 makes large
    (RI₃ = 1.3/1.4 + 1.3/23.95 ≈ 0.98, RI₄ = 1.5/41.5 + 1.5/23.95 ≈ 0.10). γ₁ = 0 is Wanda, γ₁ = 1 is RI."""
    mu = torch.tensor([0.3, 0.1, 0.1, 0.02, 0.02, 1.0, 1.0, 1.0], dtype=torch.float64)
    x = torch.stack([mu + 1, mu - 1])                                    # σ = 1 everywhere
    w = torch.tensor([[1.0, 1.05, 1.1, -1.3, -1.5, 6.0, 6.0, 6.0],
                      [0.1, 0.1, 0.1, 0.1, 40.0, 0.1, 0.1, 0.1]])        # row 1: |e| = 0.05 < τ, inactive
    stats = LayerStats(Moments.of(x))
    pattern = Unstructured(0.4)
    assert pattern.mask(w.abs())[0].tolist() == [True, True, True, False, False, False, False, False]
    left = {}
    for gamma1 in (0.0, 1.0):
        ctx = LayerContext(options=r2dsnot.Options(init="magnitude", dsnot_threshold=0.06, dsnot_cycles=1,
                                                   r2_gamma1=gamma1, r2_gamma2=0.0))
        _, mask = get_metric("r2dsnot").solve(w, stats, pattern, ctx)
        assert not bool(mask[0, 0]) and mask[0, 1:3].all()              # channel 0 regrew
        assert mask[1].tolist() == pattern.mask(w.abs())[1].tolist()    # row 1 untouched
        left[gamma1] = [j for j in (3, 4) if bool(mask[0, j])]
    assert left == {0.0: [3], 1.0: [4]}


def test_dsnot_family_scores_elementwise_with_unequal_channels(monkeypatch):
    """What DSnoT and R²-DSnoT hand their shared swap loop, entry by entry from their definitions, on channels whose
    σ_j and ‖X_j‖ all differ (the tests above keep σ = 1 and equal norms): the regrow score D_ij / σ_j^p with
    D_ij = W_ij μ_j; DSnoT's prune criterion |W_ij|·‖X_j‖; R²-DSnoT's blend (1 − γ₁)·Wanda/mean + γ₁·RI/mean with
    RI_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|)·√‖X_j‖, and its boundary τ + γ₂·√(Σ_j W_ij² σ_j²)."""
    from stade_cli.metrics import dsnot as dsnot_module, r2dsnot as r2_module

    g = torch.Generator().manual_seed(3)
    rows, cols = 3, 5
    x = torch.randn(50, cols, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0, 0.2],
                                                                            dtype=torch.float64) + 0.3
    w = torch.randn(rows, cols, generator=g)
    stats = LayerStats(Moments.of(x))
    mu, sigma, norm = (stats.moments.mean, stats.moments.std, stats.moments.norm)
    assert len({round(float(s), 6) for s in sigma}) == cols and len({round(float(n), 6) for n in norm}) == cols
    seen = {}

    def capture(values, mask, grow, keep, d, pattern, threshold, cycles):
        seen.update(grow=grow, keep=keep, d=d, threshold=threshold)
        return mask

    p, tau, g1, g2 = 2.0, 0.05, 0.3, 0.2
    monkeypatch.setattr(dsnot_module, "refine", capture)
    get_metric("dsnot").solve(w, stats, Unstructured(0.4), LayerContext(options=dsnot.Options(
        init="magnitude", dsnot_pow=p, dsnot_threshold=tau)))
    for i in range(rows):
        for j in range(cols):
            d = float(w[i, j]) * float(mu[j])
            assert float(seen["d"][i, j]) == pytest.approx(d, rel=1e-5, abs=1e-7)
            assert float(seen["grow"][i, j]) == pytest.approx(d / float(sigma[j]) ** p, rel=1e-5, abs=1e-7)
            assert float(seen["keep"][i, j]) == pytest.approx(abs(float(w[i, j])) * float(norm[j]), rel=1e-5)
    assert seen["threshold"] == tau

    monkeypatch.setattr(r2_module, "refine", capture)
    get_metric("r2dsnot").solve(w, stats, Unstructured(0.4), LayerContext(options=r2dsnot.Options(
        init="magnitude", dsnot_pow=p, dsnot_threshold=tau, r2_gamma1=g1, r2_gamma2=g2)))
    a = [[abs(float(w[i, j])) for j in range(cols)] for i in range(rows)]
    wanda = [[a[i][j] * float(norm[j]) for j in range(cols)] for i in range(rows)]
    ri = [[(a[i][j] / sum(a[k][j] for k in range(rows)) + a[i][j] / sum(a[i])) * math.sqrt(float(norm[j]))
           for j in range(cols)] for i in range(rows)]
    mean_wanda, mean_ri = (sum(map(sum, t)) / (rows * cols) for t in (wanda, ri))
    for i in range(rows):
        spread = math.sqrt(sum(float(w[i, j]) ** 2 * float(sigma[j]) ** 2 for j in range(cols)))
        assert float(seen["threshold"][i]) == pytest.approx(tau + g2 * spread, rel=1e-5)
        for j in range(cols):
            blend = (1 - g1) * wanda[i][j] / mean_wanda + g1 * ri[i][j] / mean_ri
            assert float(seen["keep"][i, j]) == pytest.approx(blend, rel=1e-5)
            assert float(seen["grow"][i, j]) == pytest.approx(float(w[i, j]) * float(mu[j]) / float(sigma[j]) ** p,
                                                              rel=1e-5, abs=1e-7)
