"""Block-wise refinement (``--refine``), the ``--recipe`` preset, and sequential + ADMM on one block."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli import attention
from stade_cli.cli.app import app
from stade_cli.recipes import RECIPES, apply
from stade_cli.refine import balanced, fit_or_keep, learning_rate, refine_block, relative_error

runner = CliRunner()
REGISTRY = attention._registered()      # transformers ≥ 4.48: blocks may attend with attention.causal_attention


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


# ------------------------------------------------------------------------------------------- the pure step
class TwoLayer(torch.nn.Module):
    """A residual block in miniature: x + W2 relu(W1 x)."""

    def __init__(self, width=12, hidden=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, width, generator=g) / width ** 0.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(width, hidden, generator=g) / hidden ** 0.5, requires_grad=False)

    def forward(self, x):
        return x + torch.relu(x @ self.w1.T) @ self.w2.T


def test_refine_block_lowers_the_error_and_keeps_frozen_entries_exactly():
    g = torch.Generator().manual_seed(1)
    dense = TwoLayer()
    x = torch.randn(8, 5, 12, generator=g)                       # 8 windows × 5 tokens
    y = dense(x).detach()
    pruned = TwoLayer()
    frozen = []
    for p in (pruned.w1, pruned.w2):                              # half the weights pruned, a few others frozen
        m = torch.rand(p.shape, generator=g) < 0.5
        with torch.no_grad():
            p.masked_fill_(m, 0)
        keep_fixed = (torch.rand(p.shape, generator=g) < 0.1) & ~m
        frozen.append(m | keep_fixed)
    start = [p.detach().clone() for p in (pruned.w1, pruned.w2)]
    before = float((pruned(x) - y).pow(2).mean())
    still = []                                                    # at every step, before its forward pass

    def forward(xb):
        still.append(all(torch.equal(p[m], s[m]) for p, m, s in zip((pruned.w1, pruned.w2), frozen, start)))
        return pruned(xb)

    losses, first = refine_block(forward, x, y, [pruned.w1, pruned.w2], frozen, steps=60,
                                 lr=1e-2, batch=4, generator=torch.Generator().manual_seed(0))
    assert len(still) == 60 and all(still)                        # not only at the end: Adam moves them by 0
    after = float((pruned(x) - y).pow(2).mean())
    assert after < 0.5 * before, (before, after)
    assert len(losses) == 60 and len(first) == 4 and first == sorted(first)
    for p, m, s in zip((pruned.w1, pruned.w2), frozen, start):
        assert torch.equal(p[m], s[m])                           # bitwise: zeros stay zero, frozen stay as they were
        assert not torch.equal(p[~m], s[~m])                      # the others moved
        assert not p.requires_grad and p.grad is None


def test_refine_block_computes_no_gradient_for_the_blocks_other_parameters():
    """A parameter the forward pass uses but that is not one of the weights (a norm's gain, left requiring
    gradients as a loaded model leaves it) gets no gradient and does not move, and the fit is the same as with
    that parameter frozen."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, 12, generator=g)
    y = TwoLayer(seed=1)(x).detach()
    fits = []
    for flag in (True, False):
        block = TwoLayer()
        gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 12), requires_grad=flag)
        start = gain.detach().clone()
        frozen = [torch.zeros_like(block.w1, dtype=torch.bool), torch.zeros_like(block.w2, dtype=torch.bool)]
        refine_block(lambda xb: block(xb * gain), x, y, [block.w1, block.w2], frozen, steps=5, lr=1e-2, batch=4,
                     generator=torch.Generator().manual_seed(0))
        assert gain.grad is None and torch.equal(gain.detach(), start) and gain.requires_grad == flag
        fits.append([block.w1.detach().clone(), block.w2.detach().clone()])
    for a, b in zip(*fits):
        assert torch.equal(a, b)


def test_refine_block_without_a_fused_adam_gives_the_same_fit(monkeypatch):
    """Where this torch has no fused Adam for the device, the default one runs: the same fit to rounding."""
    import stade_cli.refine as refine_module

    results = []
    for fused in (True, False):
        if not fused:
            real = torch.optim.Adam

            def unfused(params, lr, fused=None):
                if fused:
                    raise RuntimeError("fused=True requires all the params to be floating point Tensors of "
                                       "supported devices")
                return real(params, lr=lr)
            monkeypatch.setattr(refine_module.torch.optim, "Adam", unfused)
        model = TwoLayer(seed=5)
        x = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(6))
        frozen = [torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) < 0.5 for p in (model.w1, model.w2)]
        refine_block(lambda xb: model(xb), x, TwoLayer(seed=8)(x).detach(), [model.w1, model.w2], frozen, steps=5,
                     lr=1e-2, batch=2, generator=torch.Generator().manual_seed(0))
        results.append([model.w1.detach().clone(), model.w2.detach().clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_refine_block_first_loss_is_the_unrefined_error_on_those_windows():
    g = torch.Generator().manual_seed(2)
    dense, pruned = TwoLayer(seed=3), TwoLayer(seed=4)
    x = torch.randn(6, 3, 12, generator=g)
    y = dense(x).detach()
    expected = {}
    with torch.no_grad():
        for i in range(6):
            expected[i] = (pruned(x[i:i + 1]) - y[i:i + 1]).pow(2)
    frozen = [torch.zeros_like(pruned.w1, dtype=torch.bool), torch.zeros_like(pruned.w2, dtype=torch.bool)]
    losses, first = refine_block(lambda xb: pruned(xb), x, y, [pruned.w1, pruned.w2], frozen, steps=1,
                                 lr=1e-3, batch=3)
    assert losses[0] == pytest.approx(float(torch.cat([expected[i] for i in first]).mean()), rel=1e-5)


def test_relative_error_by_hand():
    """Two tokens of hidden size 2: dense outputs (3, 4) and (0.1, 0) (mean squares 12.5 and 0.005), squared errors
    (1, 0) and (0.01, 0): relative 0.5 / 12.5 and 0.005 / 0.005 per token (the 1e-6 guard aside), mean of the four
    entries' ratios."""
    target = torch.tensor([[[3.0, 4.0], [0.1, 0.0]]])
    squared = torch.tensor([[[1.0, 0.0], [0.01, 0.0]]])
    expected = (1 / 12.5 + 0 + 0.01 / 0.005 + 0) / 4
    assert float(relative_error(squared, target)) == pytest.approx(expected, rel=1e-3)
    # the plain mean is dominated by the large token's error; the relative one by the small token's
    large, small = squared * torch.tensor([1.0, 0.0]).view(1, 2, 1), squared * torch.tensor([0.0, 1.0]).view(1, 2, 1)
    assert float(large.mean()) == pytest.approx(100 * float(small.mean()))
    assert float(relative_error(small, target)) == pytest.approx(25 * float(relative_error(large, target)), rel=1e-3)


def test_balanced_divides_each_part_by_its_first_value():
    a, b = torch.tensor(6.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    total = balanced((a * 1, b * 1), (3.0, 0.25))
    assert float(total.detach()) == pytest.approx(6 / 3 + 0.5 / 0.25)
    total.backward()
    assert float(a.grad) == pytest.approx(1 / 3) and float(b.grad) == pytest.approx(4.0)
    assert float(balanced((a.detach(), b.detach()), (0.0, 0.5))) == pytest.approx(6 + 1)     # a part that started at 0


def test_balanced_loss_fits_the_small_tokens_that_the_plain_mean_neglects():
    """A target whose first token is 100× the others (an attention sink) and follows another map than they do, so
    that no weight fits both: the plain mean squared difference fits the large token and leaves the others' error;
    ``balanced`` weighs every token relative to its size and fits the five small ones better. The returned losses
    are the plain mean squared difference either way."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 6, 5, generator=g)
    small, sink = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
    y = x @ small.T
    x[:, 0] *= 100
    y[:, 0] = x[:, 0] @ sink.T
    fits = {}
    for loss in ("mse", "balanced"):
        w = torch.nn.Parameter(torch.zeros(5, 5), requires_grad=False)
        losses, _ = refine_block(lambda xb: xb @ w.T, x, y, [w], [torch.zeros(5, 5, dtype=torch.bool)],
                                 steps=60, lr=0.05, batch=8, loss=loss)
        assert losses[0] == pytest.approx(float(y.pow(2).mean()), rel=1e-5)     # the plain mean at w = 0
        with torch.no_grad():
            fits[loss] = (float(relative_error((x[:, 1:] @ w.T - y[:, 1:]).pow(2), y[:, 1:])),
                          float(relative_error((x[:, :1] @ w.T - y[:, :1]).pow(2), y[:, :1])))
    assert fits["balanced"][0] < 0.5 * fits["mse"][0], fits      # the small tokens: better fitted
    assert fits["mse"][1] < fits["balanced"][1], fits            # the sink: what the plain mean buys


def test_refine_block_refuses_an_unknown_loss():
    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        refine_block(lambda xb: xb @ w.T, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), [w],
                     [torch.zeros(2, 2, dtype=torch.bool)], steps=1, lr=0.1, batch=1, loss="huber")


def test_learning_rate_rises_then_follows_the_cosine():
    """By hand: 8 steps, warmup 0.25 → w = 2: step 0 at 1/2 of the cosine, step 1 on at the cosine itself."""
    import math

    cos = [0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert [learning_rate(t, 8) for t in range(8)] == pytest.approx(cos)
    assert [learning_rate(t, 8, 0.25) for t in range(8)] == pytest.approx([cos[0] / 2] + cos[1:])
    ten = [learning_rate(t, 10, 0.5) for t in range(10)]          # w = 5: (t + 1)/5 × cosine for t < 5
    assert ten[:5] == pytest.approx([(t + 1) / 5 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(5)])
    assert max(range(10), key=ten.__getitem__) == 4               # the peak is the rise's last step, not step 0
    assert learning_rate(0, 4, 0.1) == 1.0                          # a warmup under one step is no warmup


def test_refine_block_steps_at_the_scheduled_rates():
    """The first update of plain SGD-like Adam is lr × factor × sign(grad) per entry: the warmup scales it."""
    moves = {}
    for warmup in (0.0, 0.5):
        w = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)
        x = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0))
        refine_block(lambda xb: xb @ w.T, x, torch.zeros(2, 1, 3), [w], [torch.zeros(3, 3, dtype=torch.bool)],
                     steps=4, lr=0.1, batch=2, warmup=warmup)
        moves[warmup] = w.detach().clone()
    # Adam's k-th step moves each entry by about lr_k (same-sign gradients): the total is the sum of the rates
    for warmup, expected in ((0.0, sum(learning_rate(t, 4) for t in range(4))),
                             (0.5, sum(learning_rate(t, 4, 0.5) for t in range(4)))):
        assert (1 - moves[warmup]).abs().mean() == pytest.approx(0.1 * expected, rel=0.05), warmup


def test_refine_block_with_bfloat16_products_keeps_the_masks_and_float32_weights():
    """Under bfloat16 autocast the weights, the optimiser and the loss stay float32; zeros stay zero bitwise; the
    error goes down as in float32, and the first step's loss is float32's to bfloat16's precision."""
    g = torch.Generator().manual_seed(5)
    dense = TwoLayer(seed=6)
    x = torch.randn(8, 5, 12, generator=g)
    y = dense(x).detach()
    runs = {}
    for products in (torch.float32, torch.bfloat16):
        pruned = TwoLayer(seed=7)
        masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(8)) < 0.5 for p in (pruned.w1, pruned.w2)]
        with torch.no_grad():
            for p, m in zip((pruned.w1, pruned.w2), masks):
                p.masked_fill_(m, 0)
        before = float((pruned(x) - y).pow(2).mean())
        losses, _ = refine_block(lambda xb: pruned(xb), x, y, [pruned.w1, pruned.w2], masks, steps=60, lr=1e-2,
                                 batch=4, generator=torch.Generator().manual_seed(0), products=products)
        after = float((pruned(x) - y).pow(2).mean())
        for p, m in zip((pruned.w1, pruned.w2), masks):
            assert p.dtype == torch.float32 and bool((p[m] == 0).all())
        runs[products] = (before, after, losses)
    (b32, a32, l32), (b16, a16, l16) = runs[torch.float32], runs[torch.bfloat16]
    assert b32 == b16 and a16 < 0.5 * b16 and a32 < 0.5 * b32
    assert l16[0] == pytest.approx(l32[0], rel=2e-2) and l16[0] != l32[0]     # the products were bfloat16's
    assert a16 == pytest.approx(a32, rel=0.2)


def test_refine_precision_by_device(monkeypatch):
    from stade_cli.refine import RefineOptions

    cpu = torch.device("cpu")
    assert RefineOptions(precision="float32").product_dtype(cpu) == torch.float32
    assert RefineOptions(precision="bfloat16").product_dtype(cpu) == torch.bfloat16
    assert RefineOptions(precision="BF16").product_dtype(cpu) == torch.bfloat16       # --dtype's spellings too
    assert RefineOptions(precision="fp32").product_dtype(cpu) == torch.float32
    RefineOptions(precision="bf16").check()
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        assert RefineOptions().product_dtype(cpu) == (torch.bfloat16 if amx or avx else torch.float32)


def test_for_windows_expands_what_was_recorded_for_one_window():
    """A block's keyword arguments recorded for one window, for a batch of 3: the tensors whose batch dimension is 1
    become views of 3 (nothing copied), inside tuples and dicts; 1-D tensors, other batches and non-tensors stay."""
    from stade_cli.blockwise import for_windows

    mask = torch.randn(1, 1, 4, 4)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    kw = {"attention_mask": mask, "position_embeddings": (cos, sin), "cache_position": torch.arange(4),
          "position_ids": torch.arange(4)[None], "other": torch.zeros(2, 4), "use_cache": False, "none": None}
    out = for_windows(kw, 3)
    assert out["attention_mask"].shape == (3, 1, 4, 4) and out["attention_mask"].data_ptr() == mask.data_ptr()
    assert all(torch.equal(out["attention_mask"][i], mask[0]) for i in range(3))
    assert isinstance(out["position_embeddings"], tuple)
    assert [t.shape for t in out["position_embeddings"]] == [(3, 4, 8), (3, 4, 8)]
    assert torch.equal(out["position_ids"], torch.arange(4).expand(3, 4))
    assert out["cache_position"] is kw["cache_position"] and out["other"] is kw["other"]
    assert out["use_cache"] is False and out["none"] is None
    assert for_windows(kw, 1)["attention_mask"] is mask


class StrictMask(TwoLayer):
    """A block whose attention mask must have the hidden states' batch, as OPT's attention checks in
    transformers 4.x ("Attention mask should be of size (4, 1, 32, 32)")."""

    def forward(self, x, attention_mask=None):
        if attention_mask.shape[0] != x.shape[0]:
            raise ValueError(f"Attention mask should be of size {(x.shape[0], *attention_mask.shape[1:])}")
        return super().forward(x)


def test_refinement_passes_each_batch_arguments_of_its_own_size():
    """The runner records a block's arguments for one window; the refinement's passes and steps run batches of
    several windows (the last one shorter): each call gets them expanded to its own batch."""
    from stade_cli.blockwise import for_windows
    from stade_cli.refine import _through

    block = StrictMask()
    x = torch.randn(6, 5, 12)
    kw = {"attention_mask": torch.zeros(1, 1, 5, 5)}
    with pytest.raises(ValueError, match="should be of size"):
        block(x[:4], **kw)
    torch.testing.assert_close(_through(block, x, kw, 4), block.forward(x, torch.zeros(6, 1, 5, 5)))
    target = TwoLayer(seed=1)(x)
    frozen = [torch.zeros_like(block.w1, dtype=torch.bool), torch.zeros_like(block.w2, dtype=torch.bool)]
    losses, _ = refine_block(lambda xb: block(xb, **for_windows(kw, len(xb))), x, target, [block.w1, block.w2],
                             frozen, 6, 1e-2, 4)
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_refine_block_refuses_a_mask_of_another_shape():
    block = TwoLayer()
    with pytest.raises(ValueError, match="does not match"):
        refine_block(lambda xb: block(xb), torch.zeros(2, 1, 12), torch.zeros(2, 1, 12), [block.w1],
                     [torch.zeros(3, 3, dtype=torch.bool)], 1, 1e-3, 1)


# ------------------------------------------------------------------------------------------- end to end
def _hidden_after_blocks(model_dir, windows):
    """The last decoder block's output (before the final norm) on ``windows``."""
    from transformers import AutoModelForCausalLM

    from stade_cli.loading import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        return model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states[-2]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_refinement_lowers_the_block_output_error_and_keeps_the_mask(tiny_llama, gram_stats, tmp_path, precision):
    """On the 2-block tiny model: the refined checkpoint's last block output is closer to the dense model's than
    the layer-wise fit's, on the refinement's own windows and on other windows of the text; the zeros are the
    layer-wise fit's, exactly; the report gives each block's error before and after. With float32 products and with
    bfloat16 ones (autocast, float32 weights)."""
    from stade_cli.data import calibration_windows, load_corpus
    from stade_cli.loading import Runtime

    layerwise, refined = tmp_path / "layerwise", tmp_path / "refined"
    common = ("--stats", gram_stats, "--metric", "wanda", "--update", "admm", "--sparsity", 0.6)
    run("prune", tiny_llama, *common, "-o", layerwise)
    out = run("prune", tiny_llama, *common, "--refine", 30, "--refine-lr", 3e-3, "--refine-samples", 8,
              "--refine-seqlen", 32, "--refine-precision", precision, "--refine-warmup", 0.2, "-o", refined)
    assert "refinement: each block's output error" in out.stderr
    assert "(lr 0.003, rising over the first 6 steps)" in out.stderr
    assert ("(bfloat16 products)" in out.stderr) == (precision == "bfloat16")
    assert "+ refine (30 steps a block)" in out.stderr
    a, b = load_file(layerwise / "model.safetensors"), load_file(refined / "model.safetensors")
    report = json.loads((refined / "stade_report.json").read_text())
    assert report["refine"]["steps"] == 30 and report["refine"]["samples"] == 8 and report["refine"]["seqlen"] == 32
    assert report["refine"]["precision"] == precision and report["refine"]["warmup"] == 0.2
    # bfloat16 products on the CPU: both blocks attend with the grouped causal attention (attention.py)
    assert report["refine"]["grouped_attention"] == ([0, 1] if precision == "bfloat16" and REGISTRY else [])
    assert "(lr 0.003, rising over the first 20% of them)" in (refined / "README.md").read_text()
    assert all(v.dtype == a[k].dtype for k, v in b.items())       # bfloat16 products, the checkpoint's own dtype
    assert [e["block"] for e in report["refine"]["blocks"]] == [0, 1]
    assert all(e["after"] < e["before"] for e in report["refine"]["blocks"])
    moved = 0
    for name in report["layers"]:
        wa, wb = a[f"{name}.weight"], b[f"{name}.weight"]
        assert torch.equal(wa == 0, wb == 0), name                # the mask is an invariant
        moved += int((wa != wb).sum())
    assert moved > 0
    for k in a:                                                   # nothing else changed
        if k.removesuffix(".weight") not in report["layers"]:
            assert torch.equal(a[k], b[k]), k
    rt = Runtime.of(str(tiny_llama), "cpu")
    corpus = load_corpus("builtin", "calibration")
    seen = calibration_windows(rt.tokenizer(), corpus, 8, 32, 0, 256)
    other = calibration_windows(rt.tokenizer(), corpus, 8, 32, 99, 256)
    for windows in (seen, other):
        dense = _hidden_after_blocks(tiny_llama, windows)
        err = {n: float((_hidden_after_blocks(d, windows) - dense).pow(2).mean()) for n, d in
               (("layerwise", layerwise), ("refined", refined))}
        assert err["refined"] < err["layerwise"], err


def test_refine_loss_balanced_from_the_command_line(tiny_llama, gram_stats, tmp_path):
    """--refine-loss balanced: said in the log, the report and the card; the masks stay the layer-wise fit's and
    each block's (plain) output error still goes down."""
    layerwise, refined = tmp_path / "layerwise", tmp_path / "refined"
    common = ("--stats", gram_stats, "--metric", "wanda", "--update", "admm", "--sparsity", 0.6)
    run("prune", tiny_llama, *common, "-o", layerwise)
    out = run("prune", tiny_llama, *common, "--refine", 20, "--refine-lr", 3e-3, "--refine-samples", 8,
              "--refine-seqlen", 32, "--refine-loss", "balanced", "-o", refined)
    assert "to the dense model's outputs (balanced loss)" in out.stderr
    report = json.loads((refined / "stade_report.json").read_text())
    assert report["refine"]["loss"] == "balanced"
    assert all(e["after"] < e["before"] for e in report["refine"]["blocks"])
    assert "calibration tokens (balanced loss)" in (refined / "README.md").read_text()
    a, b = load_file(layerwise / "model.safetensors"), load_file(refined / "model.safetensors")
    assert all(torch.equal(a[f"{n}.weight"] == 0, b[f"{n}.weight"] == 0) for n in report["layers"])


def test_refined_weights_in_memory_and_on_disk(tmp_path):
    """The store gives back each matrix as put (dtype and values, names with brackets as expert slices have), and
    on disk leaves nothing once closed."""
    from stade_cli.refine import RefinedWeights

    g = torch.Generator().manual_seed(3)
    block = {"model.layers.0.mlp.down_proj": torch.randn(4, 6, generator=g).to(torch.bfloat16),
             "model.layers.0.mlp.experts.gate_up_proj[1]": torch.randn(3, 2, generator=g)}
    for spill in ("device", "disk"):
        with RefinedWeights(spill, tmp_path / "spill") as store:
            store.open(100)
            assert store.on_disk == (spill == "disk")
            store.put(0, block)
            store.put(1, {"model.layers.1.mlp.down_proj": torch.ones(2, 2)})
            if spill == "disk":
                assert sorted(p.name for p in store.dir.iterdir()) == ["block0.safetensors", "block1.safetensors"]
            for name, w in block.items():
                assert store.get(name).dtype == w.dtype and torch.equal(store.get(name), w), name
            assert torch.equal(store.get("model.layers.1.mlp.down_proj"), torch.ones(2, 2))
    assert list((tmp_path / "spill").iterdir()) == []
    import stade_cli.runtime as runtime

    for available, on_disk in ((1000, False), (199, True)):   # auto: on disk past half of the available memory
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runtime, "available_bytes", lambda device: available)
            with RefinedWeights("auto") as store:
                store.open(100)
                assert store.on_disk == on_disk
                spilled = store.dir
        assert spilled is None or not spilled.exists()


def test_refined_weights_spilled_to_disk_give_the_same_checkpoint(tiny_llama, gram_stats, tmp_path, monkeypatch):
    """--spill disk: the refined weights wait for the writer in files (the log says where), the checkpoint is the
    one kept in memory gives, bit for bit, and the files are gone after the run, and after a failed one."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    common = ("--stats", gram_stats, "--metric", "wanda", "--update", "admm", "--sparsity", 0.5, "--refine", 4,
              "--refine-samples", 4, "--refine-seqlen", 16)
    memory = run("prune", tiny_llama, *common, "--spill", "device", "-o", tmp_path / "memory")
    assert "refined weights: " in memory.stderr and "until written, in memory" in memory.stderr
    disk = run("prune", tiny_llama, *common, "--spill", "disk", "-o", tmp_path / "disk")
    assert f"until written, on disk ({tmp_path / 'tmp'}/stade-refined-" in disk.stderr
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "tmp").glob("stade-refined-*"))

    import stade_cli.pruning as pruning

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pruning, "write", broken)
    run("prune", tiny_llama, *common, "--spill", "disk", "-o", tmp_path / "failed", code=1)
    assert not list((tmp_path / "tmp").glob("stade-refined-*"))
    monkeypatch.undo()

    import stade_cli.outputs as outputs                 # a temp dir that cannot hold them: refused before block 0
    real = outputs.check_space

    def small_tmp(path, needed):
        if str(path).startswith(str(tmp_path / "tmp")):
            raise outputs.OutputError(f"not enough disk space for {path}: {needed:,} bytes needed, 10 free")
        return real(path, needed)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(outputs, "check_space", small_tmp)
    r = run("prune", tiny_llama, *common, "--spill", "disk", "-o", tmp_path / "full", code=1)
    assert "not enough disk space for " + str(tmp_path / "tmp") in r.stderr
    assert "refining blocks" not in r.stderr and not (tmp_path / "full").exists()


def test_refine_zero_is_the_layerwise_prune(tiny_llama, gram_stats, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("prune", tiny_llama, "--stats", gram_stats, "--update", "admm", "-o", a)
    run("prune", tiny_llama, "--stats", gram_stats, "--update", "admm", "--refine", 0, "-o", b)
    assert load_file(a / "model.safetensors").keys() == load_file(b / "model.safetensors").keys()
    for k, v in load_file(a / "model.safetensors").items():
        assert torch.equal(v, load_file(b / "model.safetensors")[k]), k
    assert json.loads((b / "stade_report.json").read_text())["refine"] is None


@pytest.mark.parametrize("args, message", [
    (("--refine", -1), "--refine must be a number of steps"),
    (("--refine", 2, "--refine-lr", 0), "--refine-lr must be positive"),
    (("--refine", 2, "--refine-batch", 0), "--refine-batch must be at least 1"),
    (("--refine", 2, "--refine-warmup", 1), "--refine-warmup must be a share of the steps"),
    (("--refine", 2, "--refine-warmup", 25), "(a quarter of the steps is --refine-warmup 0.25; 25% is 0.25)"),
    (("--refine", 2, "--refine-warmup", -0.1), "--refine-warmup must be a share of the steps"),
    (("--refine", 2, "--refine-samples", 0), "--refine-samples must be at least 1"),
    (("--refine", 2, "--refine-loss", "huber"), "--refine-loss must be one of mse, balanced (got 'huber')"),
    (("--refine", 2, "--refine-seqlen", 1), "--refine-seqlen must be at least 2"),
    (("--refine", 2, "--refine-precision", "half"), "--refine-precision must be one of auto, float32, bfloat16"),
    (("--refine", 2, "--structure", "channels", "--sparsity", 0.2), "--refine does not combine with --structure"),
    (("--recipe", "fastest"), "unknown recipe 'fastest'"),
    # the recipe's --refine is not a flag the user typed: the message names the recipe
    (("--recipe", "best", "--structure", "channels", "--sparsity", 0.2),
     "--recipe best (its --refine 40) does not combine with --structure"),
    (("--recipe", "best", "--experts", 2), "--recipe best (its --refine 40) does not combine with --experts"),
    (("--recipe", "best", "--experts", 2), "then prune M-K with --recipe best"),
])
def test_refine_and_recipe_mistakes_are_refused_before_any_work(tiny_llama, gram_stats, tmp_path, args, message):
    out = tmp_path / "out"
    res = run("prune", tiny_llama, "--stats", gram_stats, *args, "-o", out, code=2)
    assert message in res.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------- the recipe
def test_recipe_best_is_exactly_the_flags_it_names(tiny_llama, gram_stats, tmp_path):
    """The report of --recipe best equals, field by field, the report of the flags --help and the report name;
    --help shows those flags."""
    recipe = RECIPES["best"]
    flags = recipe.flags()
    assert flags == ("--metric wanda --update admm --admm-gradual --refine 40 --refine-lr 0.008 --refine-warmup 0.25 "
                     "--refine-loss balanced --refine-batch 4 --refine-samples 128 --refine-seqlen 256")
    helptext = " ".join(run("prune", "--help").stdout.replace("│", " ").split())
    assert " ".join(f"best: the best measured composition, i.e. {flags}".split()) in helptext
    a, b = tmp_path / "recipe", tmp_path / "flags"
    out = run("prune", tiny_llama, "--stats", gram_stats, "--recipe", "best", "--refine-samples", 4, "--refine-seqlen",
              32, "-o", a)
    assert f"recipe best: {flags} (yours instead: --refine-samples 4 --refine-seqlen 32)" in out.stderr
    run("prune", tiny_llama, "--stats", gram_stats, *flags.replace("--refine-samples 128 --refine-seqlen 256",
                                                                     "--refine-samples 4 --refine-seqlen 32").split(),
        "-o", b)
    ra, rb = (json.loads((d / "stade_report.json").read_text()) for d in (a, b))
    assert ra["recipe"] == {"name": "best", "flags": flags,
                            "overridden": ["--refine-samples 4", "--refine-seqlen 32"]}
    assert rb["recipe"] is None
    for key in ("method", "update", "pattern", "target_sparsity", "mode", "options", "layer_sparsity"):
        assert ra[key] == rb[key], key
    assert ra["options"]["admm_gradual"] is True and ra["method"] == "wanda" and ra["update"] == "admm"
    assert {k: v for k, v in ra["refine"].items() if k != "blocks"} == {
        k: v for k, v in rb["refine"].items() if k != "blocks"}
    assert ra["refine"]["steps"] == 40 and ra["refine"]["lr"] == 8e-3 and ra["refine"]["warmup"] == 0.25
    assert ra["refine"]["batch"] == 4 and ra["refine"]["loss"] == "balanced"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)            # the same run


def test_recipe_apply_lets_given_values_win():
    args, options, record = apply("best", {"metric": "stade", "refine": 0}, {}, {"metric"}, {"admm_gradual"})
    assert args["metric"] == "stade" and args["refine"] == 40 and args["update"] == "admm"
    assert options == {"admm_gradual": True}
    assert record["overridden"] == ["--metric stade"]
    _, _, same = apply("best", {"metric": "wanda"}, {}, {"metric"}, {"admm_gradual"})
    assert same["overridden"] == []                              # given, but the recipe's own value


def test_library_recipe(tiny_llama, gram_stats, tmp_path):
    from stade_cli.pruning import prune

    report = prune(str(tiny_llama), tmp_path / "lib", stats=gram_stats, recipe="best", refine_samples=4,
                   refine_seqlen=32)
    assert report["recipe"]["overridden"] == ["--refine-samples 4", "--refine-seqlen 32"]
    assert report["update"] == "admm" and report["options"]["admm_gradual"] is True and report["refine"]["steps"] == 40


def test_the_refinement_says_how_far_each_block_is(tiny_llama, gram_stats, tmp_path):
    """A block of a 70B model takes minutes: within each block the layer-wise fits and the steps are tasks of their
    own (a bar on a terminal, a heartbeat line in a log), advanced once per fit and once per step."""
    from contextlib import contextmanager

    from stade_cli.pruning import prune
    from stade_cli.runtime import Reporter

    tasks: list[list] = []

    class Tasks(Reporter):
        @contextmanager
        def task(self, description, total=None):
            entry = [description, total, 0]
            tasks.append(entry)

            def advance(n=1):
                entry[2] += n
            yield advance

    report = prune(str(tiny_llama), tmp_path / "out", stats=gram_stats, metric="wanda", update="admm", refine=3,
                   refine_samples=4, refine_seqlen=16, reporter=Tasks())
    blocks = len(report["refine"]["blocks"])
    per_block = [t for t in tasks if t[0].startswith("block ")]
    assert blocks >= 2 and len(per_block) == 2 * blocks, tasks
    for b in range(blocks):
        fits = next(t for t in per_block if t[0] == f"block {b}: layer-wise fits")
        steps = next(t for t in per_block if t[0].startswith(f"block {b}: steps"))
        assert fits[1] == fits[2] == 7             # q, k, v, o, gate, up, down: one advance as each is decided
        assert steps[1] == steps[2] == 3


def test_the_recipes_own_flags_are_not_called_unused(tiny_llama, gram_stats, tmp_path):
    """The note on flags a run does not read names what the caller set, not what the recipe filled in: under
    ``--recipe best --refine 0`` the recipe's --refine-lr and the rest are not the user's, while a --refine-lr the
    user typed is (the same rule from Python)."""
    from stade_cli.pruning import prune
    from stade_cli.runtime import Reporter

    r = run("prune", tiny_llama, "--stats", gram_stats, "--recipe", "best", "--refine", 0, "-o", tmp_path / "a")
    assert "note:" not in r.stderr, r.stderr
    assert "(yours instead: --refine 0)" in r.stderr
    r = run("prune", tiny_llama, "--stats", gram_stats, "--recipe", "best", "--refine", 0, "--refine-lr", 0.01,
            "-o", tmp_path / "b")
    note = next(line for line in r.stderr.splitlines() if line.startswith("note:"))
    assert note == "note: --refine-lr applies only with --refine N", note
    r = run("prune", tiny_llama, "--stats", gram_stats, "--recipe", "best", "--update", "none", "--refine", 0,
            "-o", tmp_path / "c")
    assert "note:" not in r.stderr, r.stderr        # the recipe's --admm-gradual, without the update it is for
    logged = []

    class Notes(Reporter):
        def log(self, message: str) -> None:
            logged.append(message)

    prune(str(tiny_llama), tmp_path / "d", stats=gram_stats, recipe="best", refine=0, reporter=Notes())
    assert [line for line in logged if line.startswith("recipe best:")], logged    # the reporter did hear the run
    assert not [line for line in logged if line.startswith("note:")], logged
    r = run("prune", tiny_llama, "--stats", gram_stats, "--metric", "wanda", "--refine-lr", 0.01,
            "-o", tmp_path / "e")                   # without a recipe: as before
    assert "note: --refine-lr applies only with --refine N" in r.stderr


# ------------------------------------------------------------------------------------------- sequential, one block
def test_sequential_admm_equals_one_shot_on_one_block(tiny_factory, tmp_path):
    """With one block there is nothing to propagate: the sequential pass sees the dense inputs, so its ADMM
    refit (plain and gradual) is the one-shot one from stats of the same windows."""
    model = tiny_factory("llama", num_hidden_layers=1)
    stats = tmp_path / "stats"
    run("calibrate", model, "-o", stats, "--dataset", "builtin", "--nsamples", 8, "--seqlen", 32, "--gram")
    for extra in ((), ("--admm-gradual",), ("--pattern", "2:4")):
        one, seq = tmp_path / f"one{len(extra)}", tmp_path / f"seq{len(extra)}"
        run("prune", model, "--stats", stats, "--update", "admm", *extra, "-o", one)
        run("prune", model, "--stats", stats, "--update", "admm", *extra, "--sequential", "-o", seq)
        a, b = load_file(one / "model.safetensors"), load_file(seq / "model.safetensors")
        assert a.keys() == b.keys()
        layers = json.loads((one / "stade_report.json").read_text())["layers"]
        assert len(layers) == 7
        for k in a:
            if k.removesuffix(".weight") in layers:
                assert torch.equal(a[k] == 0, b[k] == 0), k
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ["mixtral", "granitemoe"])
def test_refinement_of_experts_keeps_every_experts_mask(tiny_factory, tmp_path, arch):
    """Experts per expert on disk (Mixtral) and fused 3-D (Granite-MoE): the refined checkpoint has the layer-wise
    zeros in every expert's matrix and lowers each block's error."""
    if arch == "granitemoe" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("experts held as 3-D parameters need transformers ≥ 5's experts interface")
    model = tiny_factory(arch)
    stats = tmp_path / "stats"
    run("calibrate", model, "-o", stats, "--dataset", "builtin", "--nsamples", 8, "--seqlen", 32, "--gram")
    flags = ("--stats", stats, "--update", "admm", "--sparsity", 0.5)
    run("prune", model, *flags, "-o", tmp_path / "a")
    run("prune", model, *flags, "--refine", 10, "--refine-samples", 4, "--refine-seqlen", 32, "-o", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    report = json.loads((tmp_path / "b" / "stade_report.json").read_text())
    assert all(e["after"] < e["before"] for e in report["refine"]["blocks"])
    changed = 0
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k
        changed += int((a[k] != b[k]).sum())
    assert changed > 0


@pytest.mark.parametrize("extra", [("--sequential",), ("--layer-sparsity", "owl"), ("--admm-gradual", "--pattern", "2:4")])
def test_refinement_composes(tiny_llama, gram_stats, tmp_path, extra):
    """--refine after --sequential, OWL's block sparsities and the gradual N:M mask: the zeros of the same prune
    without it, exactly."""
    flags = ("--stats", gram_stats, "--update", "admm", *extra)
    run("prune", tiny_llama, *flags, "-o", tmp_path / "a")
    run("prune", tiny_llama, *flags, "--refine", 4, "--refine-samples", 4, "--refine-seqlen", 32, "-o", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    ra, rb = (json.loads((tmp_path / d / "stade_report.json").read_text()) for d in "ab")
    assert ra["mode"] == rb["mode"] and ra["layer_sparsity"] == rb["layer_sparsity"]
    assert rb["refine"]["steps"] == 4
    for name in ra["layers"]:
        assert torch.equal(a[f"{name}.weight"] == 0, b[f"{name}.weight"] == 0), name


def test_a_block_the_steps_make_worse_keeps_its_layerwise_weights(tiny_llama, gram_stats, tmp_path):
    """A learning rate far too high: every block's error goes up, so every block keeps the layer-wise fit and the
    checkpoint is the prune without --refine, and prune says so."""
    flags = ("--stats", gram_stats, "--update", "admm")
    run("prune", tiny_llama, *flags, "-o", tmp_path / "a")
    res = run("prune", tiny_llama, *flags, "--refine", 3, "--refine-lr", 100, "--refine-samples", 4,
              "--refine-seqlen", 32, "-o", tmp_path / "b")
    assert "block(s) 0, 1 kept the layer-wise weights (the steps did not lower their error at 100 nor at 50" in res.stderr
    report = json.loads((tmp_path / "b" / "stade_report.json").read_text())
    assert [e["kept"] for e in report["refine"]["blocks"]] == ["layer-wise", "layer-wise"]
    for e in report["refine"]["blocks"]:
        assert [rate for rate, _ in e["tried"]] == [100, 50] and e["lr"] is None
        assert all(reached > e["before"] for _, reached in e["tried"])
        assert e["after"] == pytest.approx(e["before"], rel=1e-4), e
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:     # the same fit (computed with another thread count here: equal to float rounding)
        assert torch.equal(a[k] == 0, b[k] == 0), k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


class _Block:
    """A block for ``fit_or_keep``: the error its steps reach at each rate (by hand), the layer-wise one 1.0."""

    def __init__(self, reached: dict[float, float]):
        self.reached, self.now, self.log = reached, 1.0, []

    def train(self, rate):
        self.log.append(("train", rate))
        self.now = self.reached[rate]
        return [1.0, 0.9], [3, 5] if len(self.log) == 1 else [0, 1]     # a retry draws other windows

    def error(self, windows):
        self.log.append(("error", tuple(windows)))
        return self.now

    def restore(self):
        self.log.append(("restore",))
        self.now = 1.0


def test_fit_or_keep_keeps_steps_that_lower_the_error():
    b = _Block({0.01: 0.6})
    entry = fit_or_keep(b.train, b.error, b.restore, 0.01)
    assert entry == {"windows": [3, 5], "before": 1.0, "after": 0.6, "kept": "refined", "lr": 0.01,
                     "tried": [[0.01, 0.6]]}
    assert b.log == [("train", 0.01), ("error", (3, 5))]


def test_fit_or_keep_retries_at_half_the_rate_on_the_same_windows():
    b = _Block({0.01: 1.3, 0.005: 0.7})
    entry = fit_or_keep(b.train, b.error, b.restore, 0.01)
    assert entry == {"windows": [3, 5], "before": 1.0, "after": 0.7, "kept": "refined", "lr": 0.005,
                     "tried": [[0.01, 1.3], [0.005, 0.7]]}
    # restored before the retry, and the retry judged on the first try's windows against the first try's loss
    assert b.log == [("train", 0.01), ("error", (3, 5)), ("restore",), ("train", 0.005), ("error", (3, 5))]


def test_fit_or_keep_keeps_the_layerwise_weights_when_no_rate_helps():
    b = _Block({0.01: 1.3, 0.005: 1.0})                 # equal is not lower
    entry = fit_or_keep(b.train, b.error, b.restore, 0.01)
    assert entry["kept"] == "layer-wise" and entry["lr"] is None and entry["after"] == 1.0
    assert entry["tried"] == [[0.01, 1.3], [0.005, 1.0]]
    assert b.log[-2:] == [("restore",), ("error", (3, 5))] and b.now == 1.0
    one = _Block({0.01: 1.3})
    assert fit_or_keep(one.train, one.error, one.restore, 0.01, tries=1)["tried"] == [[0.01, 1.3]]


def test_a_pass_with_casts_cached_gives_the_same_numbers_and_leaves_the_flags_as_they_were():
    """``_through`` under bfloat16 autocast converts each weight once (it marks the weights as requiring gradients
    for the pass): the outputs are those of the plain autocast pass to the bit, nothing is recorded for a backward,
    and every parameter's ``requires_grad`` is what it was, after a pass and after one that raised."""
    from stade_cli.refine import _casts_cached, _through

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    block[0].weight.requires_grad_(False)
    block[2].bias.requires_grad_(False)
    flags = [p.requires_grad for p in block.parameters()]
    x = torch.randn(6, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.cat([block(x[s:s + 4]).float() for s in range(0, 6, 4)])
    out = _through(block, x, {}, 4, torch.bfloat16)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, plain)
    assert [p.requires_grad for p in block.parameters()] == flags
    with pytest.raises(RuntimeError), _casts_cached(block):
        assert all(p.requires_grad for p in block.parameters())
        raise RuntimeError("interrupted")
    assert [p.requires_grad for p in block.parameters()] == flags
    with _casts_cached(block):      # a parameter replaced during the pass (as an offloading hook does)
        block[0].weight = torch.nn.Parameter(block[0].weight.detach().clone(), requires_grad=True)
    assert [p.requires_grad for p in block.parameters()] == flags


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "mistral", "gemma", "gemma3", "gpt_oss", "deepseek_v3"])
def test_refinement_with_bfloat16_products_on_every_architecture(tiny_factory, tmp_path, arch):
    """Every tiny architecture refines with bfloat16 products on the CPU: the layer-wise zeros stay, each block's
    error goes down, and the blocks that attended with the grouped causal attention are the ones whose attention
    dispatches through transformers' sdpa (the probe agreed there; elsewhere their own attention ran)."""
    model = tiny_factory(arch)
    stats = tmp_path / "stats"
    run("calibrate", model, "-o", stats, "--dataset", "builtin", "--nsamples", 8, "--seqlen", 32, "--gram")
    flags = ("--stats", stats, "--update", "admm", "--sparsity", 0.5, "--no-bias-correction")
    run("prune", model, *flags, "-o", tmp_path / "a")
    run("prune", model, *flags, "--refine", 10, "--refine-samples", 4, "--refine-seqlen", 32,
        "--refine-precision", "bfloat16", "-o", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    report = json.loads((tmp_path / "b" / "stade_report.json").read_text())
    for name in report["layers"]:
        key = f"{name}.weight" if f"{name}.weight" in a else name
        if key in a:
            assert torch.equal(a[key] == 0, b[key] == 0), key
    assert all(e["after"] <= e["before"] for e in report["refine"]["blocks"]), report["refine"]["blocks"]
    # Gemma 3's sliding-window blocks (0, 2) get an attention mask (its windows of 16 tokens are shorter than the
    # 32-token ones here), its full-attention blocks none; gpt-oss attends eagerly (its sinks): theirs ran
    expected = {"gemma3": [1, 3], "gpt_oss": []}.get(arch, [0, 1]) if REGISTRY else []
    assert report["refine"]["grouped_attention"] == expected


@pytest.mark.versions
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_refinement_steps_of_several_windows_on_every_supported_transformers(tiny_factory, tmp_path, arch):
    """`--refine` with 4 windows a step and the last batch of a pass shorter (6 windows), run also under the oldest
    transformers: OPT's attention there checks that the mask's batch is the hidden states' (the runner records a
    block's arguments for one window). The zeros stay the layer-wise ones and each block's error goes down."""
    model = tiny_factory(arch)
    stats = tmp_path / "stats"
    run("calibrate", model, "-o", stats, "--dataset", "builtin", "--nsamples", 8, "--seqlen", 32, "--gram")
    flags = ("--stats", stats, "--update", "admm", "--sparsity", 0.5, "--no-bias-correction")
    run("prune", model, *flags, "-o", tmp_path / "a")
    run("prune", model, *flags, "--refine", 6, "--refine-samples", 6, "--refine-batch", 4, "--refine-seqlen", 32,
        "--refine-lr", 3e-3, "-o", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    report = json.loads((tmp_path / "b" / "stade_report.json").read_text())
    assert report["refine"]["batch"] == 4 and report["refine"]["samples"] == 6
    for name in report["layers"]:
        assert torch.equal(a[f"{name}.weight"] == 0, b[f"{name}.weight"] == 0), name
    assert any(not torch.equal(a[f"{n}.weight"], b[f"{n}.weight"]) for n in report["layers"])
    assert all(e["after"] <= e["before"] for e in report["refine"]["blocks"]), report["refine"]["blocks"]
