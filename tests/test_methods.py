"""The methods issue: bias correction, STADE-W roles, RIA, stochastic RIA, OWL, --group/--only/--skip, --sequential."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.calibration.moments import Moments
from stade_cli.cli.app import app
from stade_cli.masks import NM, Unstructured
from stade_cli.decide import select
from stade_cli.metrics import LayerContext, get_metric, ria, stochria
from stade_cli.owl import owl_outlier_ratio, owl_sparsities
from stade_cli.tensors import apply_mask, bias_delta, pruned_contribution

runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def calibrate(model, out, nsamples=4):
    run("calibrate", model, "-o", out, "--dataset", "builtin", "--nsamples", nsamples, "--seqlen", 32)
    return out


@pytest.fixture(scope="module")
def stats(tiny_llama, tmp_path_factory):
    return calibrate(tiny_llama, tmp_path_factory.mktemp("m") / "stats")


# ------------------------------------------------------------------------------------------ pure math
def test_bias_correction_keeps_the_mean_output_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) * 2 + torch.linspace(-3, 3, 16, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    m = Moments.of(x)
    mask = select(w, get_metric("stade"), Unstructured(0.5), m, LayerContext())
    w2 = torch.where(mask, torch.zeros((), dtype=w.dtype), w)
    b2 = b + bias_delta(w, w2, m.mean)
    dense, pruned = (x @ w.T + b).mean(0), (x @ w2.T + b2).mean(0)
    assert torch.allclose(dense, pruned, atol=1e-12, rtol=0)
    assert not torch.allclose(dense, (x @ w2.T + b).mean(0), atol=1e-3)  # without it the mean moves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pruned_contribution_is_bias_delta_of_the_mask(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g).to(dtype)
    mask = torch.rand(6, 10, generator=g) < 0.5
    mean = torch.randn(10, generator=g, dtype=torch.float64)
    assert torch.equal(pruned_contribution(w, mask, mean), bias_delta(w, apply_mask(w, mask), mean))
    slow = [sum(float(w[i, j]) * float(mean[j]) for j in range(10) if mask[i, j]) for i in range(6)]
    assert torch.allclose(pruned_contribution(w, mask, mean), torch.tensor(slow, dtype=torch.float64), rtol=1e-12)


def test_bias_delta_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0]])
    pruned = torch.tensor([[0.0, 2.0, 0.0]])
    assert bias_delta(w, pruned, torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)).tolist() == [1 * 10 + 3 * 30]
    updated = torch.tensor([[0.0, 2.5, 0.0]])                      # a solver may also move kept weights
    assert bias_delta(w, updated, torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)).tolist() == [100 - 0.5 * 20]


def test_ria_by_hand():
    w = torch.tensor([[1.0, -3.0], [2.0, 4.0]])
    x = torch.tensor([[1.0, 0.0], [1.0, 3.0]])          # ‖x0‖ = sqrt(2), ‖x1‖ = 3
    m = Moments.of(x)
    colsum, rowsum = [3.0, 7.0], [4.0, 6.0]
    act = [math.sqrt(2) ** 0.5, 3 ** 0.5]
    expected = torch.tensor([[(abs(w[i, j].item()) / colsum[j] + abs(w[i, j].item()) / rowsum[i]) * act[j]
                              for j in range(2)] for i in range(2)])
    assert torch.allclose(get_metric("ria").score(w, m, LayerContext()), expected)
    ctx = LayerContext(options=ria.Options(ria_alpha=1.0))
    assert torch.allclose(get_metric("ria").score(w, m, ctx)[:, 1] / get_metric("ria").score(w, m, LayerContext())[:, 1],
                          torch.full((2,), 3 ** 0.5))


def test_stochria_beta_one_is_ria_and_seeded():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, 20, generator=g), torch.randn(50, 20, generator=g)
    m = Moments.of(x)
    full = LayerContext("l", options=stochria.Options(stoch_beta=1.0))
    assert torch.allclose(get_metric("stochria").score(w, m, full), get_metric("ria").score(w, m, full))
    a = get_metric("stochria").score(w, m, LayerContext("l", options=stochria.Options(seed=1)))
    b = get_metric("stochria").score(w, m, LayerContext("l", options=stochria.Options(seed=1)))
    c = get_metric("stochria").score(w, m, LayerContext("l", options=stochria.Options(seed=2)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochria_sums_are_unbiased():
    from stade_cli.metrics.stochria import subset_sums

    absw = torch.rand(4, 50, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    estimates = torch.stack([subset_sums(absw, 5, g) for _ in range(4000)])
    assert torch.allclose(estimates.mean(0), absw.sum(1), rtol=0.02)
    assert torch.allclose(subset_sums(absw, 50, g), absw.sum(1))  # m = n: exact


def test_owl_by_hand():
    scores = [torch.tensor([1.0, 1.0, 1.0, 10.0])]        # mean 3.25; only 10 > 2 × 3.25
    assert owl_outlier_ratio(scores, 2.0) == 0.25
    s = owl_sparsities([0.1, 0.3, 0.2], 0.5, 0.08)        # D̂ = [0, 0.16, 0.08], mean 0.08
    assert s == pytest.approx([0.58, 0.42, 0.50])
    assert sum(s) / 3 == pytest.approx(0.5)
    assert owl_sparsities([0.2, 0.2], 0.6, 0.08) == [0.6, 0.6]
    # skewed outlier ratios: the span is 2λ but the low end goes below S − λ (as in the reference code)
    skew = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.5, 0.1)                 # D̂ = [0, 0, 0, 0.2], mean 0.05
    assert skew == pytest.approx([0.55, 0.55, 0.55, 0.35])
    assert max(skew) - min(skew) == pytest.approx(0.2) and sum(skew) / 4 == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ through the CLI
def _inputs_of(model, name, windows):
    """All inputs of the linear `name` over the windows: [tokens, in]."""
    seen = []
    module = dict(model.named_modules())[name]
    h = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    h.remove()
    return torch.cat(seen).double()


def test_stade_checkpoint_carries_biases_and_keeps_layer0_mean(tiny_llama, stats, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stade_cli.data import calibration_windows, load_corpus

    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "stade", "--stats", stats, "-o", out)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    pruned = AutoModelForCausalLM.from_pretrained(out)      # must load with no missing or random tensors
    sd = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in sd
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    windows = calibration_windows(tok, load_corpus("builtin", "calibration"), 4, 32, 0, 256)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):  # inputs unchanged by pruning
        x = _inputs_of(dense, name, windows)
        d, p = dict(dense.named_modules())[name], dict(pruned.named_modules())[name]
        mean_dense = (x @ d.weight.double().T).mean(0)
        mean_pruned = (x @ p.weight.double().T + p.bias.double()).mean(0)
        assert torch.allclose(mean_dense, mean_pruned, atol=1e-5), name
        assert (p.weight == 0).float().mean() == 0.5
    # the report says what happened
    report = json.loads((out / "stade_report.json").read_text())
    assert report["bias_correction"]["layers"] == 14


def test_no_bias_correction_writes_no_bias(tiny_llama, stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "stade", "--no-bias-correction", "--stats", stats, "-o", out)
    assert not any(k.endswith(".bias") for k in load_file(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text()).get("attention_bias") is False


def test_opt_updates_existing_biases(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_factory("opt")
    stats = calibrate(model, tmp_path / "s")
    out = tmp_path / "out"
    run("prune", model, "--metric", "stade", "--stats", stats, "-o", out)
    before, after = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    key = "model.decoder.layers.0.fc2.bias"
    assert not torch.equal(before[key], after[key])
    AutoModelForCausalLM.from_pretrained(out)


def test_stadew_refuses_stats_without_roles(tiny_llama, stats, tmp_path):
    """Stats that do not record which linears read a norm's output must not silently make stadew = stade."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(stats, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["modules"].values():
        entry.pop("reads_norm")
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = run("prune", tiny_llama, "--metric", "stadew", "--stats", old, "-o", tmp_path / "out", code=1)
    assert "read a normalisation layer's output" in r.stderr and "re-run `stade calibrate`" in r.stderr
    assert not (tmp_path / "out").exists()
    run("prune", tiny_llama, "--metric", "stade", "--stats", old, "-o", tmp_path / "ok")   # roles not needed


def test_stadew_roles(tiny_llama, stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "stadew", "--stats", stats, "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    corrected = {n for n, l in report["layers"].items() if l["bias_corrected"]}
    assert corrected == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert all(l["reads_norm"] == (n not in corrected) for n, l in report["layers"].items())
    wanda = tmp_path / "wanda"
    run("prune", tiny_llama, "--metric", "wanda", "--stats", stats, "-o", wanda)
    a, b = load_file(out / "model.safetensors"), load_file(wanda / "model.safetensors")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q] == 0, b[q] == 0)       # Wanda where the input is a norm's output


def test_group_layer_only_skip(tiny_llama, stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "magnitude", "--group", "layer", "--skip", r"layers\.0\.", "-o", out)
    sd, dense = load_file(out / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], dense["model.layers.0.mlp.up_proj.weight"])
    w = sd["model.layers.1.mlp.up_proj.weight"]
    assert int((w == 0).sum()) == w.numel() // 2
    assert (w == 0).sum(1).unique().numel() > 1                  # not per row
    out2 = tmp_path / "only"
    run("prune", tiny_llama, "--metric", "wanda", "--stats", stats, "--only", r"mlp\.down_proj", "-o", out2)
    assert set(json.loads((out2 / "stade_report.json").read_text())["layers"]) == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_nm_width_error(tiny_llama, stats, tmp_path):
    r = run("prune", tiny_llama, "--stats", stats, "--pattern", "3:7", "-o", tmp_path / "x", code=2)
    assert "divisible by 7" in r.stderr and not (tmp_path / "x").exists()


def test_owl_report_and_bounds(tiny_llama, stats, tmp_path):
    out = tmp_path / "out"
    run("prune", tiny_llama, "--metric", "wanda", "--layer-sparsity", "owl", "--owl-lambda", 0.1, "--stats", stats,
        "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    blocks = report["layer_sparsity"]["blocks"]
    assert sum(blocks.values()) / len(blocks) == pytest.approx(0.5)
    assert all(0.4 - 1e-9 <= s <= 0.6 + 1e-9 for s in blocks.values())
    for l in report["layers"].values():
        assert l["zeros"] == math.floor(blocks[str(l["block"])] * l["shape"][1]) * l["shape"][0]
    # the block sparsities from their definition: per block, the Wanda scores |W_ij|·‖X_j‖ of all its pruned
    # linears, read here from the model's own file and the stats' moments
    from stade_cli.calibration.store import load_stats

    weights = {k: v for f in sorted(Path(tiny_llama).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    moments = load_stats(Path(stats)).moments
    per_block = {}
    for name, l in report["layers"].items():
        per_block.setdefault(l["block"], []).append(weights[f"{name}.weight"].double().abs() * moments[name].norm)
    order = sorted(per_block)
    ratios = [owl_outlier_ratio(per_block[b], 5.0) for b in order]
    assert len(set(ratios)) > 1                                    # the blocks differ: a real allocation
    expected = owl_sparsities(ratios, 0.5, 0.1)
    assert [blocks[str(b)] for b in order] == pytest.approx(expected, abs=1e-9)
    r = run("prune", tiny_llama, "--layer-sparsity", "owl", "--sparsity", 0.9, "--owl-lambda", 0.2, "--stats", stats,
            "-o", tmp_path / "y", code=2)                              # block 1 would get 1.1
    assert "outside [0, 1)" in r.stderr and not (tmp_path / "y").exists()
    r = run("prune", tiny_llama, "--layer-sparsity", "owl", "--pattern", "2:4", "--stats", stats, "-o", tmp_path / "x",
            code=2)
    assert "unstructured" in r.stderr


def test_sequential_agrees_on_block0(tiny_llama, stats, tmp_path):
    one, seq = tmp_path / "one", tmp_path / "seq"
    run("prune", tiny_llama, "--metric", "wanda", "--stats", stats, "-o", one)
    run("prune", tiny_llama, "--metric", "wanda", "--stats", stats, "--sequential", "-o", seq)
    a, b = load_file(one / "model.safetensors"), load_file(seq / "model.safetensors")
    for key in a:
        if key.startswith("model.layers.0.") and key.endswith("proj.weight"):
            assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.1.") and k.endswith("proj.weight"))
    assert json.loads((seq / "stade_report.json").read_text())["mode"] == "sequential"
    assert json.loads((one / "stade_report.json").read_text())["mode"] == "one-shot"


def test_sequential_stade_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "seq"
    run("prune", tiny_llama, "--metric", "stade", "--sequential", "--dataset", "builtin", "--nsamples", 2,
        "--seqlen", 16, "-o", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].mlp.down_proj.bias is not None


def test_refuses_bias_it_cannot_hold(tiny_factory, tmp_path):
    model = tiny_factory("mistral")
    r = run("prune", model, "--metric", "stade", "--dataset", "builtin", "--nsamples", 2, "--seqlen", 16,
            "-o", tmp_path / "x", code=1)
    assert "--no-bias-correction" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_bad_method_options(tiny_llama, stats, tmp_path):
    for args, text in [(["--stoch-beta", 0], "stoch-beta"), (["--layer-sparsity", "nope"], "layer-sparsity"),
                       (["--layer-sparsity", "owl", "--owl-lambda", 0.6], "owl-lambda")]:
        r = run("prune", tiny_llama, "--stats", stats, *args, "-o", tmp_path / "x", code=2)
        assert text in r.stderr


def test_method_options_of_the_wrong_type_are_refused_by_name(tiny_llama, stats, tmp_path):
    """From Python (or a sweep entry, typed as text): a number as text is converted, anything else refused with
    the option's name, before any work; options that are not a mapping are refused too."""
    from stade_cli import prune
    from stade_cli.errors import MethodError
    from stade_cli.metrics.base import build_options

    assert build_options({"ria_alpha": "2", "admm_iterations": "7", "admm_gradual": "true"})["ria"].ria_alpha == 2.0
    assert build_options({"admm_iterations": 7.0})["admm"].admm_iterations == 7
    for bad, text in [({"ria_alpha": "abc"}, "ria_alpha must be a number"),
                      ({"admm_iterations": 2.5}, "admm_iterations must be a whole number"),
                      ({"admm_gradual": "maybe"}, "admm_gradual must be true or false"),
                      ({"init": 3}, "init must be text")]:
        with pytest.raises(MethodError, match=text):
            build_options(bad)
    for call in (lambda: prune(tiny_llama, tmp_path / "x", stats=stats, options=[("ria_alpha", 1.0)]),
                 lambda: build_options([("ria_alpha", 1.0)])):
        with pytest.raises(MethodError, match="must be a mapping") as refused:
            call()
        assert str(refused.value).endswith('(e.g. options={"ria_alpha": 1.0})')     # a hint to copy as it is
    assert not (tmp_path / "x").exists()
    r = run("sweep", tiny_llama, "--stats", stats, "--metrics", "ria:ria_alpha=abc", "--sparsities", 0.5,
            "--dataset", "builtin", "--seqlen", 16, "--max-windows", 1, "-o", tmp_path / "sw", code=2)
    assert "--ria-alpha must be a number (got 'abc')" in r.stderr and not (tmp_path / "sw").exists()


def test_flags_this_run_does_not_read_are_said(tiny_llama, stats, tmp_path):
    """A flag for another method, OWL's without OWL, the refinement's without it, a text beside --stats: the run
    goes on (a script may pass one set of flags to every method) and says, in one note, what changed nothing."""
    r = run("prune", tiny_llama, "--stats", stats, "--metric", "wanda", "--ria-alpha", 2, "--owl-m", 3,
            "--refine-lr", 0.1, "--dataset", "wikitext2", "--nsamples", 999, "-o", tmp_path / "a")
    note = next(line for line in r.stderr.splitlines() if line.startswith("note:"))
    for text in ("--ria-alpha changes nothing in this run (only ria, stochria read it)",
                 "--owl-m applies only with --layer-sparsity owl", "--refine-lr applies only with --refine N",
                 "--dataset and --nsamples are not used"):
        assert text in note, note
    r = run("prune", tiny_llama, "--stats", stats, "--metric", "dsnot", "--init", "ria", "--ria-alpha", 2,
            "-o", tmp_path / "b")
    assert "note:" not in r.stderr, r.stderr          # dsnot's --init ria reads it
    r = run("prune", tiny_llama, "--stats", stats, "--metric", "wanda", "-o", tmp_path / "c")
    assert "note:" not in r.stderr


def test_owl_reduces_each_block_as_soon_as_it_is_read(tiny_factory, tmp_path):
    """OWL holds one block's scores at a time (a 7B model's all at once are 26 GB): a block's outlier ratio is taken
    as soon as its last target is read, before the later shards are opened, and the result is that of all at once."""
    import stade_cli.owl as owl
    from transformers import AutoModelForCausalLM

    from stade_cli.arch import describe, meta_model
    from stade_cli.calibration.store import load_stats
    from stade_cli.checkpoint import load_config, weight_files

    src = tiny_factory("llama", num_hidden_layers=4)
    model = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(model, max_shard_size="60KB")
    for f in src.glob("tokenizer*"):
        (model / f.name).write_bytes(f.read_bytes())
    files = weight_files(model)
    assert len(files) >= 4
    calibrate(model, tmp_path / "stats")
    arch, st = describe(meta_model(load_config(model))), load_stats(tmp_path / "stats")
    opened, when = [], []

    class Reader(owl.ShardReader):
        def __init__(self, path):
            opened.append(path)
            super().__init__(path)

    def ratio(scores, m):
        when.append(len(opened))
        return owl_outlier_ratio(scores, m)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owl, "ShardReader", Reader)
        mp.setattr(owl, "owl_outlier_ratio", ratio)
        got = owl.owl_block_sparsity(model, files, arch, st, 0.5, 5.0, 0.1, torch.device("cpu"))
    assert len(when) == 4 and when[0] < len(files)          # block 0 reduced before the last shard was opened
    weights = {k: v for f in files for k, v in load_file(str(model / f)).items()}
    ratios = [owl_outlier_ratio([weights[t.weight_key].double().abs() * st.moments[t.name].norm
                                 for t in arch.targets.values() if t.block == b], 5.0) for b in range(4)]
    assert [got[b] for b in range(4)] == pytest.approx(owl_sparsities(ratios, 0.5, 0.1), abs=1e-9)


def test_sequential_keeps_new_weights_in_the_dtype_they_are_written_in(tiny_llama, tmp_path, monkeypatch):
    """--sequential computes in float32 on the CPU and holds every new weight until the writer: in the checkpoint's
    own dtype (bfloat16 here), half the memory, the same bits as casting at the write."""
    import stade_cli.sequential as sequential
    from transformers import AutoModelForCausalLM

    from stade_cli import prune

    model = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(model)
    for f in Path(tiny_llama).glob("tokenizer*"):
        (model / f.name).write_bytes(f.read_bytes())
    held = []

    class Recorded(sequential.LayerDecision):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held.append(self.weight.dtype)

    monkeypatch.setattr(sequential, "LayerDecision", Recorded)
    prune(str(model), tmp_path / "out", metric="sparsegpt", sequential=True, dataset="builtin", nsamples=4,
          seqlen=32, dtype="float32")
    assert len(held) == 14 and set(held) == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.bfloat16}
