"""ADMM reconstruction (`--update admm`) against obviously correct solutions: least squares on the tokens
themselves (torch.linalg.lstsq on X, never the Gram), row by row."""
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.decide import decide_layer
from stade_cli.masks import NM, Unstructured
from stade_cli.metrics import LayerContext, LayerStats, get_metric, get_update
from stade_cli.metrics.admm import Options, factor, gradual_mask, product_dtype, reconstruct, schedule
from stade_cli.calibration.moments import Moments

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def tokens(n=400, width=12, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                              dtype=torch.float64)
    x += 0.7 * torch.rand(width, generator=g, dtype=torch.float64)        # a visible mean, as real inputs have
    for j in dead:
        x[:, j] = 0
    return x


def exact(x, w0, mask, damp, centred=False):
    """Per row: min ‖X w₀ − X w (− b)‖² + δ'‖d ⊙ (w₀ − w)‖² over the kept w (and a free b when centred), by
    least squares on the stacked tokens and pull rows. d_j = the (centred) column norm, δ' = damp · mean of the
    unit diagonal over all inputs (dead ones count 0). Returns (w, b)."""
    xc = x - x.mean(0) if centred else x
    d = xc.norm(dim=0)
    live = d > 0
    pull = damp * float(live.double().mean())
    scale = torch.where(live, d, torch.ones_like(d))
    out_w = torch.zeros_like(w0)
    out_b = torch.zeros(w0.shape[0], dtype=w0.dtype)
    for i in range(w0.shape[0]):
        keep = ~mask[i]
        design = torch.cat([x[:, keep], math.sqrt(pull) * torch.diag(scale[keep])], 0)
        target = torch.cat([x @ w0[i], math.sqrt(pull) * scale[keep] * w0[i, keep]])
        if centred:   # a free intercept on the token rows only
            design = torch.cat([design, torch.cat([torch.ones(x.shape[0], 1, dtype=x.dtype),
                                                   torch.zeros(int(keep.sum()), 1, dtype=x.dtype)])], 1)
        sol = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        out_w[i, keep] = sol[:int(keep.sum())]
        if centred:
            out_b[i] = sol[-1]
    return out_w, out_b


def objective(x, w0, w, damp, centred=False):
    """The row-wise objective the exact solution minimises (with the optimal intercept when centred)."""
    xc = x - x.mean(0) if centred else x
    d = xc.norm(dim=0)
    live = d > 0
    pull = damp * float(live.double().mean())
    e = (w0 - w).double()
    return ((xc @ e.T) ** 2).sum(0) + pull * ((torch.where(live, d, 0 * d) * e) ** 2).sum(1)


def random_mask(rows, cols, sparsity, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Unstructured(sparsity).mask(torch.rand(rows, cols, generator=g))


@pytest.mark.parametrize("damp", [0.1, 0.0])
def test_matches_the_exact_masked_least_squares(damp):
    x = tokens()
    w0 = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = random_mask(6, 12, 0.5)
    want, _ = exact(x, w0, mask, damp)
    opts = Options(admm_damp=damp)
    many, _ = reconstruct(w0, mask, factor(x.T @ x, opts, dtype=torch.float64), 3000)
    assert torch.allclose(many, want, atol=1e-6, rtol=0), (many - want).abs().max()
    few, _ = reconstruct(w0.float(), mask, factor((x.T @ x).float(), opts), opts.admm_iterations)
    best, plain = objective(x, w0, want, damp), objective(x, w0, w0 * ~mask, damp)
    got = objective(x, w0, few.double(), damp)
    # default 20 iterations: within 5% of the optimum's error, far below plain masking's
    assert (got <= best * 1.05 + 1e-9).all() and (got < plain).all(), (got / best, plain / best)


def test_zeros_exact_counts_hold_and_never_worse_than_masking():
    x = tokens(width=16, seed=3)
    gram = x.T @ x
    w0 = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for pattern in (Unstructured(0.5), Unstructured(0.75, "layer"), NM(2, 4), NM(1, 4)):
        mask = pattern.mask(w0.abs() * x.norm(dim=0))
        for iterations in (1, 2, 20):
            new, out = reconstruct(w0, mask, factor(gram, Options(), dtype=torch.float64), iterations)
            assert torch.equal(out, mask) and (new[mask] == 0).all() and (new[~mask] != 0).all()
            assert (objective(x, w0, new, 0.1) <= objective(x, w0, w0 * ~mask, 0.1) + 1e-9).all()


def test_dead_inputs_keep_their_dense_value():
    x = tokens(dead=(3, 7))
    w0 = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mask = random_mask(5, 12, 0.5, seed=6)
    f = factor(x.T @ x, Options(), dtype=torch.float64)
    assert f.scale[3] == 1 and f.scale[7] == 1
    new, _ = reconstruct(w0, mask, f, 20)
    assert torch.isfinite(new).all()
    for j in (3, 7):
        keep = ~mask[:, j]
        assert torch.allclose(new[keep, j], w0[keep, j], rtol=1e-12, atol=0)   # no information: left as they were
    want, _ = exact(x, w0, mask, 0.1)
    many, _ = reconstruct(w0, mask, f, 3000)
    assert torch.allclose(many, want, atol=1e-6, rtol=0)


def test_centred_fit_with_bias_is_the_joint_optimum():
    """With bias correction, decide_layer fits on the centred Gram and moves the bias by (W₀ − W)μ: together
    the least-squares optimum of weights and intercept."""
    x = tokens(width=16, seed=7)
    w0 = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    moments = Moments.of(x)
    wanda = get_metric("wanda")
    admm = get_update("admm")
    opts = Options(admm_iterations=4000, admm_precision="float32")
    ctx = LayerContext(options=wanda.options())
    uctx = LayerContext(options=opts)
    new, mask, delta = decide_layer(w0.float(), wanda, Unstructured(0.5), LayerStats(moments, x.T @ x, "x"), ctx,
                                    True, admm, uctx, None)
    want_w, want_b = exact(x, w0, mask, 0.1, centred=True)
    assert torch.allclose(new.double(), want_w, atol=2e-4, rtol=1e-4), (new.double() - want_w).abs().max()
    # the intercept of the fit is the removed mean contribution: b = (W₀ − W) μ
    assert torch.allclose(delta.double(), ((w0 - want_w) @ x.mean(0)), atol=2e-4, rtol=1e-4)
    assert torch.allclose(want_b, (w0 - want_w) @ x.mean(0), atol=1e-8)


def test_bfloat16_products_keep_the_float32_result():
    """In bfloat16 only each iteration's correction is rounded (sums stay float32): on a 64-wide layer with
    correlated inputs the error stays within 1% of the float32 solve's, zeros exact, never worse than masking."""
    x = tokens(n=2000, width=64, seed=12).float()
    w0 = torch.randn(32, 64, generator=torch.Generator().manual_seed(13))
    mask = Unstructured(0.6).mask(w0.abs() * x.norm(dim=0))
    gram = x.T @ x
    f32 = factor(gram, Options())
    bf16 = factor(gram, Options(), products=torch.bfloat16)
    assert f32.step.dtype == torch.float32 and bf16.step.dtype == torch.bfloat16
    for gradual in (0, 15):
        score = (lambda w: w.abs() * x.norm(dim=0)) if gradual else None
        a, mask_a = reconstruct(w0, mask, f32, 20, score, Unstructured(0.6), gradual)
        b, mask_b = reconstruct(w0, mask, bf16, 20, score, Unstructured(0.6), gradual)
        assert b.dtype == torch.float32 and (b[mask_b] == 0).all()
        err_a, err_b = objective(x.double(), w0.double(), a, 0.1), objective(x.double(), w0.double(), b, 0.1)
        plain = objective(x.double(), w0.double(), w0.double() * ~mask_b, 0.1)
        assert err_b.sum() <= err_a.sum() * 1.01 and (err_b <= plain + 1e-6).all()


def test_products_precision_by_device(monkeypatch):
    cpu = torch.device("cpu")
    assert product_dtype(Options(admm_precision="float32"), cpu) == torch.float32
    assert product_dtype(Options(admm_precision="bfloat16"), cpu) == torch.bfloat16
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        want = torch.bfloat16 if amx or avx else torch.float32
        assert product_dtype(Options(), cpu) == want


def test_gradual_mask_ends_on_the_pattern():
    assert schedule(0, 15, 0.5) == pytest.approx(0.5 * (1 - (14 / 15) ** 3))
    assert schedule(14, 15, 0.5) == 0.5 and schedule(19, 15, 0.5) == 0.5
    rises = [schedule(t, 15, 0.6) for t in range(15)]
    assert rises == sorted(rises) and rises[-1] == 0.6
    x = tokens(width=16, seed=9)
    w0 = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    norm = x.norm(dim=0)
    for pattern in (Unstructured(0.6), Unstructured(0.5, "layer"), NM(2, 4), NM(4, 8)):
        start = pattern.mask(w0.abs() * norm)
        new, mask = reconstruct(w0, start, factor(x.T @ x, Options(), dtype=torch.float64), 20,
                                score=lambda w: w.abs() * norm, pattern=pattern, gradual_steps=15)
        assert (new[mask] == 0).all()
        if isinstance(pattern, NM):
            groups = (~mask).reshape(8, -1, pattern.m).sum(-1)
            assert (groups == pattern.n).all()
        elif pattern.group == "row":
            assert (mask.sum(1) == math.floor(0.6 * 16)).all()
        else:
            assert int(mask.sum()) == math.floor(0.5 * 8 * 16)
    # part-way, under N:M: only N:M's candidates, fewer of them
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(11))
    part = gradual_mask(scores, NM(2, 4), 0.25)
    assert (part <= NM(2, 4).mask(scores)).all() and (part.sum(1) == 2).all()


def test_options_are_checked(tiny_llama, tmp_path):
    stats = tmp_path / "stats"
    run("calibrate", tiny_llama, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32)
    base = ["prune", tiny_llama, "--stats", stats, "-o", tmp_path / "out", "--update", "admm"]
    assert "--admm-iterations must be at least 1" in run(*base, "--admm-iterations", 0, code=2).stderr
    assert "--admm-rho must be positive" in run(*base, "--admm-rho", 0, code=2).stderr
    assert "--admm-damp must be non-negative" in run(*base, "--admm-damp", -1, code=2).stderr
    assert "--admm-precision must be auto, float32 or bfloat16" in run(*base, "--admm-precision", "fp16",
                                                                        code=2).stderr
    assert "--admm-gradual-steps" in run(*base, "--admm-gradual", "--admm-gradual-steps", 30, code=2).stderr
    assert "did you mean admm" in run(*base[:-1], "admn", code=2).stderr
    assert "give it as --update admm" in run(*base[:-2], "--metric", "admm", code=2).stderr
    assert "sparsegpt has none" in run(*base, "--metric", "sparsegpt", "--admm-gradual", code=2).stderr
    no_gram = run(*base, code=1)
    assert "Gram matrices" in no_gram.stderr and "stade calibrate --gram" in no_gram.stderr
    assert not (tmp_path / "out").exists()


def _layer_errors(model, pruned, stats):
    """tr((W₀ − W) H (W₀ − W)ᵀ) per target layer: its output error on the calibration tokens."""
    from safetensors.torch import load_file

    from stade_cli.calibration.store import load_stats

    st = load_stats(stats)
    dense, new = load_file(str(model / "model.safetensors")), load_file(str(pruned / "model.safetensors"))
    out = {}
    for name in st.moments:
        e = (dense[f"{name}.weight"] - new[f"{name}.weight"]).double()
        out[name] = float(((e @ st.gram(name).double()) * e).sum())
    return out


def test_prune_with_admm_lowers_every_layers_error(tiny_llama, gram_stats, tmp_path, monkeypatch):
    """End to end from cached stats: the same mask as wanda's (unstructured, N:M), every layer's error on the
    calibration data below plain masking's, one factorisation per distinct input, and the report says so."""
    import stade_cli.metrics.admm as admm

    calls = []
    real = admm.factor
    monkeypatch.setattr(admm, "factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    for pattern in ("unstructured", "2:4"):
        plain, rebuilt = tmp_path / f"wanda-{pattern[0]}", tmp_path / f"admm-{pattern[0]}"
        run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--pattern", pattern, "-o", plain)
        calls.clear()
        run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--pattern", pattern, "--update", "admm",
            "-o", rebuilt)
        assert len(calls) == 2 * 4        # per block: q/k/v, o, gate/up, down
        a, b = _layer_errors(tiny_llama, plain, gram_stats), _layer_errors(tiny_llama, rebuilt, gram_stats)
        assert all(b[n] < a[n] for n in a), {n: b[n] / a[n] for n in a}
        report = json.loads((rebuilt / "stade_report.json").read_text())
        assert report["update"] == "admm" and report["options"]["admm_iterations"] == 20
        assert report["overall"]["sparsity"] == pytest.approx(0.5)
        cmp = json.loads(run("inspect", plain, "--against", rebuilt, "--json").stdout)
        assert cmp["mask_changed"] == 0 and cmp["changed"] > 0     # same mask, new kept weights
        assert cmp["b_method"] == "wanda + admm"


def test_sequential_admm_and_gradual(tiny_llama, gram_stats, tmp_path):
    seq = tmp_path / "seq"
    run("prune", tiny_llama, "--stats", gram_stats, "--metric", "stade", "--update", "admm", "--sequential", "-o", seq)
    report = json.loads((seq / "stade_report.json").read_text())
    assert report["mode"] == "sequential" and report["update"] == "admm"
    assert report["bias_correction"]["layers"] == 0        # with an update, stade's bias is off by default
    corrected = tmp_path / "corrected"
    run("prune", tiny_llama, "--stats", gram_stats, "--metric", "stade", "--update", "admm", "--bias-correction",
        "-o", corrected)
    assert json.loads((corrected / "stade_report.json").read_text())["bias_correction"]["layers"] == 14
    grad = tmp_path / "grad"
    run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--pattern", "2:4", "--update", "admm",
        "--admm-gradual", "-o", grad)
    summary = json.loads(run("inspect", grad, "--json").stdout)
    assert summary["nm_ok"] and summary["overall"]["sparsity"] == pytest.approx(0.5)


def test_factorisations_are_computed_once_per_input_across_threads():
    """Eight threads ask for one input's factorisation at once: one computes it (while the others wait on it),
    all get the same object; a third block's arrival drops the first block's entries."""
    import threading

    from stade_cli.decide import Factorisations

    cache = Factorisations()
    release, calls, got = threading.Event(), [], []
    arrived = threading.Semaphore(0)

    class Counted:          # the cache's lock, telling the test each time a thread has looked up its entry
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            return self.lock.__enter__()

        def __exit__(self, *exc):
            self.lock.__exit__(*exc)
            arrived.release()

    cache._lock = Counted(cache._lock)

    def compute():
        calls.append(1)
        release.wait()
        return object()

    threads = [threading.Thread(target=lambda: got.append(cache.at(0).shared("q", compute))) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in threads:       # every thread has found the entry (one owns it) before the computation ends
        assert arrived.acquire(timeout=60)
    assert not got                     # the owner computes until released: no thread has a result yet
    release.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1
    first = got[0]
    assert cache.at(0).shared("q", object) is first
    cache.at(1).shared("k", object)
    cache.at(2).shared("v", object)                   # blocks 1 and 2 kept, block 0 dropped
    assert cache.at(0).shared("q", object) is not first


def test_sole_inputs_are_those_one_layer_reads():
    from stade_cli.decide import sole_inputs

    names = ["q", "k", "v", "o", "gate", "up", "down", "e0.gate", "e0.up"]
    key = {"q": "x", "k": "x", "v": "x", "o": "attn", "gate": "h", "up": "h", "down": "mid",
           "e0.gate": "e0.in", "e0.up": "e0.in"}
    assert sole_inputs(names, key.get) == {"attn", "mid"}
    # a layer on fallback statistics reads a pooled input: it does not make another layer's input shared
    assert sole_inputs(names, key.get, {"e0.up": "pooled"}) == {"attn", "mid", "e0.in"}


@pytest.mark.parametrize("mode", [(), ("--sequential",)])
def test_only_shared_inputs_keep_their_factorisation(tiny_llama, gram_stats, tmp_path, monkeypatch, mode):
    """The update's factorisation of an input that one layer alone reads (o_proj's, down_proj's: 6.6 GB a block
    for Llama-2-70B's down projections) is not kept in the cache for two blocks; q/k/v and gate/up still share
    theirs (one computation each a block). The checkpoint is the same as with every factorisation kept."""
    from stade_cli import decide

    kept_keys = []
    shared = decide.Factorisations.shared

    def recording(self, block, key, compute):
        kept_keys.append(key[0])
        return shared(self, block, key, compute)

    outs = {}
    for name, cached in (("sole", recording), ("all", None)):
        if cached is not None:
            monkeypatch.setattr(decide.Factorisations, "shared", cached)
        else:           # the old way: every input's factorisation kept
            monkeypatch.setattr(decide.Factorisations, "shared", shared)
            monkeypatch.setattr(decide, "sole_inputs", lambda *a, **k: frozenset())
            import stade_cli.sequential as sequential
            monkeypatch.setattr(sequential, "sole_inputs", lambda *a, **k: frozenset())
        outs[name] = tmp_path / name
        run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--update", "admm", *mode,
            "-o", outs[name])
    from collections import Counter

    from safetensors.torch import load_file

    blocks = len({k.split(".layers.")[1].split(".")[0] for k in kept_keys})
    # q, k and v ask for the input q_proj leads, gate and up for gate_proj's; o and down never ask
    assert blocks == 2 and Counter(k.rpartition(".")[2] for k in kept_keys) == {"q_proj": 3 * blocks,
                                                                                  "gate_proj": 2 * blocks}, kept_keys
    a, b = (load_file(outs[n] / "model.safetensors") for n in ("sole", "all"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_factor_is_its_formulas_and_leaves_the_gram_as_it_was():
    """The factorisation, from its definitions written plainly (centred H = Σxxᵀ − n·μμᵀ, d = √diag H, Hn = H / ddᵀ,
    G = Hn + δ·mean(diag Hn)·I, step = ρ(G + ρI)⁻¹), with a dead input; the caller's Gram matrix is not changed
    (the factorisation works in place on its own copy)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 12, dtype=torch.float64) + 1
    x[:, 4] = 0.0
    gram, mu, n = x.T @ x, x.mean(0), x.shape[0]
    kept = gram.clone()
    opts = Options()
    f = factor(gram, opts, mean=mu, count=n, dtype=torch.float64)
    assert torch.equal(gram, kept)
    h = gram - n * torch.outer(mu, mu)
    live = torch.diagonal(h) > 1e-9
    d = torch.where(live, torch.diagonal(h).clamp(min=0).sqrt(), torch.ones(12, dtype=torch.float64))
    hn = (h / torch.outer(d, d)) * torch.outer(live, live)
    big_g = hn + opts.admm_damp * torch.diagonal(hn).mean() * torch.eye(12, dtype=torch.float64)
    step = opts.admm_rho * torch.linalg.inv(big_g + opts.admm_rho * torch.eye(12, dtype=torch.float64))
    assert torch.allclose(f.scale, d) and torch.allclose(f.g, big_g) and torch.allclose(f.step, step, atol=1e-10)
    assert float(f.scale[4]) == 1.0                                     # the dead input: d = 1, and its row of G
    assert int(torch.count_nonzero(f.g[4])) == 1 and float(f.g[4, 4]) > 0   # holds the dampening alone
