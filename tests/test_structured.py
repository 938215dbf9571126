"""Structured pruning: fewer MLP channels or fewer blocks, a smaller dense model that loads anywhere.

The math against hand values and slow references (the error of a removed channel measured by running the layer
without it; the refit against least squares on the activations themselves); the shrunk model's forward against
the dense model with the same channels zeroed and their mean folded; reload and generate per family; blocks on a
config with per-layer types; refusals.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.calibration.moments import Moments
from stade_cli.cli.app import app
from stade_cli.structured import scores

runner = CliRunner()
DATA = ["--dataset", "builtin", "--nsamples", 8, "--seqlen", 32]


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


# ------------------------------------------------------------------------------------------------ math
def test_channel_scores_by_hand():
    w = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 1.0]])           # column norms 5, 1, √2
    h = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 2.0]])           # per channel: mean 2, 2, 1; var 1, 0, 1
    m = Moments.of(h)
    assert torch.allclose(scores.channel_scores("magnitude", w, None), torch.tensor([5.0, 1.0, 2 ** 0.5]).double())
    assert torch.allclose(scores.channel_scores("wanda", w, m),
                          torch.tensor([5 * 10 ** 0.5, 1 * 8 ** 0.5, 2 ** 0.5 * 2]).double())
    assert torch.allclose(scores.channel_scores("stade", w, m), torch.tensor([5.0, 0.0, 2 ** 0.5]).double())
    assert scores.lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2).tolist() == [1, 3]      # ties: lower index first


def test_removal_error_is_the_error_of_running_without_the_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 5, dtype=torch.float64)
    h = torch.randn(200, 5, dtype=torch.float64) + torch.tensor([0.0, 3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    m = Moments.of(h)
    y = h @ w.T
    for folded in (False, True):
        predicted = scores.removal_error(w, m, folded)
        for j in range(5):
            keep = [i for i in range(5) if i != j]
            y_j = h[:, keep] @ w[:, keep].T
            if folded:
                y_j = y_j + scores.folded_bias(w, torch.tensor([j]), m.mean)
            assert torch.isclose((y - y_j).square().sum(1).mean(), predicted[j], rtol=1e-9), (folded, j)


@pytest.mark.parametrize("centred", [False, True])
def test_refit_is_least_squares_on_the_activations(centred):
    torch.manual_seed(1)
    w = torch.randn(4, 8, dtype=torch.float64)
    mix = torch.randn(8, 8, dtype=torch.float64)
    h = torch.randn(500, 8, dtype=torch.float64) @ mix + 1.5                 # correlated channels with a mean
    m = Moments.of(h)
    kept = torch.tensor([0, 2, 3, 5, 7])
    new, delta = scores.refit(w, kept, h.T @ h, m, centred=centred, damp=0.0)
    design = h[:, kept] if not centred else torch.cat([h[:, kept], torch.ones(500, 1, dtype=h.dtype)], 1)
    solution = torch.linalg.lstsq(design, h @ w.T).solution                 # [kept (+1), out]
    assert torch.allclose(new, solution[: len(kept)].T, atol=1e-8)
    if centred:
        assert torch.allclose(delta, solution[-1], atol=1e-8)
        error = (h @ w.T - h[:, kept] @ new.T - delta).square().sum()
        plain = (h @ w.T - h[:, kept] @ w[:, kept].T - scores.folded_bias(w, torch.tensor([1, 4, 6]), m.mean)).square()
        assert error <= plain.sum()                                             # never worse than the fold alone
    else:
        assert delta is None


def test_block_distance_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, -1.0]])                               # cos √½ and −1
    from stade_cli.calibration.moments import block_distance

    total, tokens = block_distance(x, y)
    assert tokens == 2 and total == pytest.approx((1 - 2 ** -0.5) + 2)


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def gram_stats(tiny_factory, tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny_factory(arch)
            out = tmp_path_factory.mktemp(f"sstats-{arch}") / "s"
            run("calibrate", model, "-o", out, *DATA, "--gram")
            cache[arch] = (model, out)
        return cache[arch]

    return get


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids).logits


@pytest.mark.parametrize("how", [["--metric", "stade"], ["--metric", "wanda"], ["--metric", "stade", "--update", "admm"]])
def test_the_smaller_model_computes_what_the_masked_dense_one_does(gram_stats, tmp_path, how):
    """Shrinking loses nothing: the output's forward equals the dense model's with the removed channels' down
    columns zeroed (and their mean folded, or the kept columns refitted) to float tolerance."""
    from transformers import AutoModelForCausalLM

    model, stats = gram_stats("llama")
    out = tmp_path / "out"
    run("prune", model, "--stats", stats, "--structure", "channels", "--sparsity", 0.25, *how, "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    st = report["structure"]
    assert st["removed_per_block"] == 16 and st["kept_per_block"] == 48
    small = load_file(str(out / "model.safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(model).eval()
    from stade_cli.calibration.store import load_stats

    moments = load_stats(stats).moments
    with torch.no_grad():
        for b, layer in enumerate(dense.model.layers):
            removed = st["removed"][str(b)]
            # the 16 channels of the lowest score, from its definition: ‖W_:,j‖ times σ_j (stade) or ‖h_j‖₂ (wanda)
            m = moments[f"model.layers.{b}.mlp.down_proj"]
            spread = m.std if "stade" in how else m.norm
            score = [float(layer.mlp.down_proj.weight[:, j].double().norm()) * float(spread[j]) for j in range(64)]
            assert removed == sorted(sorted(range(64), key=lambda j: score[j])[:16])
            kept = [i for i in range(64) if i not in removed]
            down = layer.mlp.down_proj
            new = torch.zeros_like(down.weight)
            new[:, kept] = small[f"model.layers.{b}.mlp.down_proj.weight"]
            down.weight.copy_(new)
            bias = small.get(f"model.layers.{b}.mlp.down_proj.bias")
            if bias is not None:
                down.bias = torch.nn.Parameter(bias.clone())
            assert torch.equal(small[f"model.layers.{b}.mlp.gate_proj.weight"], layer.mlp.gate_proj.weight[kept])
    ids = torch.randint(0, 384, (1, 24))
    with torch.no_grad():
        masked = dense(input_ids=ids).logits
    assert torch.allclose(_logits(out, ids), masked, atol=1e-5, rtol=1e-5)
    assert report["params"]["after"] < report["params"]["before"]
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 48 and config.get("mlp_bias", False) == ("stade" in how)


@pytest.mark.versions
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "opt"])
def test_channels_reload_and_generate_in_every_family(arch, gram_stats, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, stats = gram_stats(arch)
    out = tmp_path / "out"
    r = run("prune", model, "--stats", stats, "--structure", "channels", "--sparsity", 0.5, "-o", out)
    if arch in ("qwen2", "gemma3"):       # no switch gives their MLPs a bias: stade's fold is not possible
        assert "ranking channels by wanda instead" in r.stderr
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = AutoTokenizer.from_pretrained(out)("The model", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    before = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < before
    shown = run("inspect", out, "--summary").stdout
    assert "channels (32 removed" in shown and "parameters" in shown
    assert json.loads(run("eval", out, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 2, "--json").stdout)[
        "ppl"] > 1
    if arch == "opt":       # fc2's own bias comes before its weight in the shard: the refit's bias change still lands
        refit = tmp_path / "refit"
        run("prune", model, "--stats", stats, "--structure", "channels", "--sparsity", 0.5, "--update", "admm",
            "-o", refit)
        small, dense = load_file(str(refit / "model.safetensors")), load_file(str(model / "model.safetensors"))
        assert small["model.decoder.layers.0.fc2.weight"].shape == (32, 32)
        assert not torch.equal(small["model.decoder.layers.0.fc2.bias"], dense["model.decoder.layers.0.fc2.bias"])
        assert not AutoModelForCausalLM.from_pretrained(refit, output_loading_info=True)[1]["missing_keys"]


def test_blocks_with_per_layer_types(gram_stats, tmp_path):
    """Half of the 4 blocks go, those that change their input least; the rest are renumbered and the config's
    layer count and per-layer attention types follow, so it loads and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, stats = gram_stats("gemma3")
    out = tmp_path / "out"
    r = run("prune", model, "--stats", stats, "--structure", "blocks", "--sparsity", 0.5, "-o", out)
    report = json.loads((out / "stade_report.json").read_text())["structure"]
    distance = {int(b): d for b, d in report["distance"].items()}
    assert report["removed"] == sorted(sorted(range(4), key=lambda b: (distance[b], b))[:2])
    assert f"those that change their input least: {', '.join(map(str, report['removed']))}" in r.stderr
    config = json.loads((out / "config.json").read_text())
    types = ["sliding_attention", "full_attention"] * 2
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == [types[b] for b in report["kept"]]
    before, after = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for new, old in enumerate(report["kept"]):
        for key, value in before.items():
            if key.startswith(f"model.layers.{old}."):
                assert torch.equal(after[key.replace(f"layers.{old}.", f"layers.{new}.", 1)], value)
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in after)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = AutoTokenizer.from_pretrained(out)("The model", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert "2 of 4 blocks kept" in run("inspect", out, "--summary").stdout
    assert json.loads(run("inspect", out, "--json").stdout)["report_agrees"]
    report = json.loads((out / "stade_report.json").read_text())           # a report that says more than the shapes
    report["params"]["after"] += 1
    (out / "stade_report.json").write_text(json.dumps(report))
    assert not json.loads(run("inspect", out, "--json").stdout)["report_agrees"]


@pytest.mark.parametrize("arch,overrides,key", [
    ("deepseek_v3", dict(num_hidden_layers=4, first_k_dense_replace=1), "first_k_dense_replace"),
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2), "decoder_sparse_step"),
])
def test_blocks_keep_which_blocks_have_experts(tiny_factory, tmp_path, arch, overrides, key):
    """A config that states by a rule which blocks have experts (the first k dense; every second one) states it
    again for the blocks kept, so every block loads its own weights: none missing, none left over."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model, stats = tiny_factory(arch, **overrides), tmp_path / "s"
    run("calibrate", model, "-o", stats, *DATA)
    moe = {0: [False, True, True, True], 1: [False, True, False, True]}[key == "decoder_sparse_step"]
    for fraction in (0.25, 0.5):
        out = tmp_path / f"out{fraction}"
        run("prune", model, "--stats", stats, "--structure", "blocks", "--sparsity", fraction, "-o", out)
        kept = json.loads((out / "stade_report.json").read_text())["structure"]["kept"]
        loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (fraction, kept, info)
        names = loaded.state_dict()
        for new, old in enumerate(kept):
            assert any(f"layers.{new}.mlp.experts." in k or f"layers.{new}.mlp.experts" in k for k in names) == moe[old]
        assert AutoConfig.from_pretrained(out).num_hidden_layers == len(kept)


def test_eval_refuses_a_checkpoint_whose_config_wants_weights_it_lacks(tiny_llama, tmp_path):
    """A folder whose config and weights disagree would load with random weights where they are missing: every
    command refuses it with one line instead of measuring noise."""
    broken = shutil.copytree(tiny_llama, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    r = run("eval", broken, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 2, code=None)
    assert r.exit_code != 0 and "its files do not hold" in r.stderr and "model.layers.2." in r.stderr, r.stderr


def test_sweep_takes_structured_entries(gram_stats, tmp_path):
    model, stats = gram_stats("llama")
    out = tmp_path / "sweep"
    run("sweep", model, "--metrics", "stade:structure=channels,wanda:structure=blocks", "--sparsities", "0.5",
        "--stats", stats, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 2, "-o", out)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["stade:structure=channels", "wanda:structure=blocks"]
    assert all(0 < r["cells"]["50%"]["params_removed"] < 0.5 for r in rows)


@pytest.mark.parametrize("args,text", [
    (["--structure", "channels", "--sparsity", 0.99], "would remove every one of the 64 channels"),
    (["--structure", "channels", "--sparsity", 0.01], "rounds to no channel"),
    (["--structure", "blocks", "--sparsity", 0.9], "would remove every one of the 2 blocks"),
    (["--structure", "channels", "--pattern", "2:4"], "--pattern does not combine with it"),
    (["--structure", "channels", "--sparsity", 0.5, "--metric", "ria"], "ria has no channel score"),
    (["--structure", "blocks", "--sparsity", 0.5, "--metric", "wanda"], "--metric does not apply"),
    (["--structure", "rows", "--sparsity", 0.5], "--structure must be channels or blocks"),
    (["--structure", "channels", "--sparsity", 0.5, "--metric", "stade", "--update", "admm"], "needs Gram"),
])
def test_refusals_are_one_line(tiny_llama, tmp_path, args, text):
    stats = tmp_path / "s"
    run("calibrate", tiny_llama, "-o", stats, *DATA)
    r = run("prune", tiny_llama, "--stats", stats, *args, "-o", tmp_path / "out", code=None)
    assert r.exit_code in (1, 2) and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_explicit_stade_where_no_bias_can_be_held_is_refused(gram_stats, tmp_path):
    model, stats = gram_stats("qwen2")
    r = run("prune", model, "--stats", stats, "--structure", "channels", "--sparsity", 0.5, "--metric", "stade",
            "-o", tmp_path / "out", code=1)
    assert "cannot hold one there" in r.stderr and "--metric wanda" in r.stderr


def test_a_refit_from_fewer_tokens_than_channels_is_said(tiny_llama, tmp_path):
    """The refit solves for every kept channel: from fewer calibration tokens than that it can do worse than no
    refit (measured on SmolLM2: 256 tokens for 1152 channels), which the user is told, with what to pass."""
    few, many = tmp_path / "few", tmp_path / "many"
    run("calibrate", tiny_llama, "-o", few, "--dataset", "builtin", "--nsamples", 1, "--seqlen", 16, "--gram")
    run("calibrate", tiny_llama, "-o", many, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 32, "--gram")
    args = ["--structure", "channels", "--sparsity", 0.5, "--update", "admm"]
    r = run("prune", tiny_llama, "--stats", few, *args, "-o", tmp_path / "a")
    assert "the refit fits the 32 kept channels of each MLP from 16 calibration tokens" in r.stderr, r.stderr
    assert "note:" not in run("prune", tiny_llama, "--stats", many, *args, "-o", tmp_path / "b").stderr


def test_which_channel_removals_fold_their_mean():
    """--bias-correction decides; without it, the stade score folds (it ranks by the variance the bias cannot
    take) and the others do not."""
    assert scores.folds(True, "wanda") and scores.folds(True, "magnitude") and scores.folds(None, "stade")
    assert not scores.folds(None, "wanda") and not scores.folds(None, "magnitude") and not scores.folds(False, "stade")
