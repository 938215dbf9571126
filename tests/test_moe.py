"""Mixtures of experts: every expert pruned from its own tokens, whole experts removed, and never less than we say.

Tiny Mixtral, Qwen2-MoE (a shared expert) and Qwen3-MoE store one 2-D tensor per expert on disk; Granite-MoE and
GPT-OSS store each projection of all experts as one 3-D tensor (GPT-OSS transposed, gate/up interleaved, with
expert biases). Under transformers ≥ 5 the experts are fused 3-D parameters at run time, under 4.x linears.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from stade_cli.arch import describe, meta_model
from stade_cli.calibration.moments import Moments
from stade_cli.calibration.store import load_stats
from stade_cli.checkpoint import load_config, read_header, tensor_shapes
from stade_cli.cli.app import app

runner = CliRunner()
FIVE = int(transformers.__version__.split(".")[0]) >= 5
PER_EXPERT = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
FUSED = ["granitemoe", "gpt_oss"]
CAL = ["--dataset", "builtin", "--nsamples", 8, "--seqlen", 32]


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def arch_of(path: Path):
    return describe(meta_model(load_config(path)), disk=tensor_shapes(path))


def supported(name: str) -> None:
    if name in FUSED and not FIVE:
        pytest.skip("experts held as 3-D parameters need transformers ≥ 5's experts interface")


@pytest.fixture(scope="module")
def moe_stats(tiny_factory, tmp_path_factory):
    """name → (model, stats with Gram matrices), calibrated once per module."""
    cache = {}

    def get(name: str):
        supported(name)
        if name not in cache:
            model = tiny_factory(name)
            out = tmp_path_factory.mktemp(f"stats-{name}") / "s"
            run("calibrate", model, "-o", out, *CAL, "--gram")
            cache[name] = (model, out)
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------ description
@pytest.mark.parametrize("name", PER_EXPERT + FUSED)
def test_every_expert_matrix_is_a_target_and_routers_are_not(name, tiny_factory):
    supported(name)
    path = tiny_factory(name)
    a = arch_of(path)
    shapes = tensor_shapes(path)
    assert sorted(a.experts) == [0, 1]
    for b, moe in a.experts.items():
        assert moe.num_experts == 4 and moe.top_k == 2
        for e in range(4):
            assert moe.inputs[e] and len(moe.middles[e]) == 1
            assert all(a.targets[n].expert == e and a.targets[n].block == b for n in moe.members(e))
        assert moe.router and all(k in a.dense for k in moe.router)
        assert not any(k in {t.weight_key for t in a.targets.values()} for k in moe.router)
    expert_params = sum(t.in_features * t.out_features for t in a.targets.values() if t.expert is not None)
    on_disk = sum(math.prod(s) for k, s in shapes.items() if re.search(r"(?<!shared_)experts\.|_linear", k) and len(s) >= 2
                  and "bias" not in k and not k.endswith("router.weight"))
    assert expert_params == on_disk                               # every expert weight, once
    if name == "qwen2_moe":                                       # the shared expert is an ordinary target
        assert {"model.layers.0.mlp.shared_expert.down_proj", "model.layers.0.mlp.shared_expert.gate_proj"} <= set(
            a.targets)
        assert "model.layers.0.mlp.shared_expert_gate.weight" in a.dense
    if name in FUSED:
        assert all(t.fused for t in a.targets.values() if t.expert is not None)
        assert all(t.transposed == (name == "gpt_oss") for t in a.targets.values() if t.expert is not None)
    from stade_cli.arch import coverage
    assert coverage(a, shapes).unknown == ()


@pytest.mark.skipif(not FIVE, reason="fused experts at run time are transformers ≥ 5")
@pytest.mark.parametrize("name", PER_EXPERT + FUSED)
def test_each_target_is_found_where_the_loaded_model_holds_it(name, tiny_factory):
    """``--sequential`` writes pruned matrices back into the loaded model: each target's place there holds exactly
    the checkpoint's matrix (halves of a fused gate_up, transposed slices)."""
    from transformers import AutoModelForCausalLM

    path = tiny_factory(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    a = describe(model, disk=tensor_shapes(path))
    modules = dict(model.named_modules())
    disk = tensors(path)
    assert set(a.places) >= set(a.targets)
    for n, t in a.targets.items():
        assert torch.equal(a.places[n].view(modules), t.matrix(disk[t.weight_key])), n


# ------------------------------------------------------------------------------------------------ calibration
@pytest.mark.versions
def test_expert_moments_are_those_of_the_tokens_its_router_picked(tiny_factory, tmp_path):
    """Routing by hand, from the checkpoint's own router and expert weights and each block's MoE input (the
    post-attention norm's output): counts, moments of each expert's input and of its intermediate activation, and
    REAP's router-weighted output norms are what calibrate stored."""
    from transformers import AutoModelForCausalLM

    from stade_cli.loading import CalibrationSpec, Runtime

    path = tiny_factory("mixtral")
    stats = tmp_path / "s"
    run("calibrate", path, "-o", stats, *CAL)
    st = load_stats(stats)
    windows = CalibrationSpec("builtin", 8, 32).windows(Runtime.of(str(path)))
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    seen = {}
    hooks = [model.model.layers[b].post_attention_layernorm.register_forward_hook(
        lambda m, i, o, b=b: seen.setdefault(b, []).append(o.detach().reshape(-1, o.shape[-1]))) for b in (0, 1)]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    disk = tensors(path)
    for b in (0, 1):
        x = torch.cat(seen[b]).double()                                       # [tokens, hidden]
        p = f"model.layers.{b}.block_sparse_moe"
        probs = torch.softmax(x @ disk[f"{p}.gate.weight"].double().T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)                                 # Mixtral renormalises its top-k
        for e in range(4):
            rows, slot = torch.where(idx == e)
            xe = x[rows]
            w1, w2, w3 = (disk[f"{p}.experts.{e}.{w}.weight"].double() for w in ("w1", "w2", "w3"))
            h = torch.nn.functional.silu(xe @ w1.T) * (xe @ w3.T)
            y = h @ w2.T
            for name, acts in ((f"{p}.experts.{e}.w1", xe), (f"{p}.experts.{e}.w3", xe), (f"{p}.experts.{e}.w2", h)):
                m = st.moments[name]
                assert m.count == len(rows)
                assert torch.allclose(m.sum, acts.sum(0), rtol=1e-4, atol=1e-5), name
                assert torch.allclose(m.sumsq, acts.square().sum(0), rtol=1e-4, atol=1e-5), name
            ex = st.experts[b]
            assert int(ex.count[e]) == len(rows)
            if FIVE:                                                          # the router weights are seen there
                assert math.isclose(float(ex.gate[e]), float(top[rows, slot].sum()), rel_tol=1e-4)
                reap = float((top[rows, slot] * y.norm(dim=-1)).sum())
                assert math.isclose(float(ex.reap[e]), reap, rel_tol=1e-4)
            else:
                assert ex.reap is None and st.manifest["experts"]["reap"] is False
        assert int(st.experts[b].count.sum()) == 2 * x.shape[0]              # every token went to two experts


def test_offloaded_experts_give_the_same_stats(moe_stats, tmp_path):
    """With accelerate's placement (a CPU budget sending blocks to disk) the experts are captured the same way."""
    model, stats = moe_stats("mixtral")
    out = tmp_path / "placed"
    if not FIVE:    # transformers 4.x refuses a map with every module on disk: stade says what to pass instead
        r = run("calibrate", model, "-o", out, *CAL, "--gram", "--max-memory", "cpu=100KB", "--offload-dir",
                tmp_path / "off", code=1)
        assert "--device-map stream" in r.stderr and not out.exists()
        return
    r = run("calibrate", model, "-o", out, *CAL, "--gram", "--max-memory", "cpu=100KB", "--offload-dir", tmp_path / "off")
    assert "on disk" in r.stderr
    a, b = load_file(str(stats / "moments.safetensors")), load_file(str(out / "moments.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_family_whose_experts_compute_otherwise_is_refused(tiny_factory, tmp_path, monkeypatch):
    """The per-expert capture checks itself against the module's own forward once per module."""
    if not FIVE:
        pytest.skip("the capture of fused experts is transformers ≥ 5")
    from stade_cli.calibration import experts as ex

    real = ex.experts_forward
    monkeypatch.setattr(ex, "experts_forward", lambda *a, **k: real(*a, **k) * 1.01)
    r = run("calibrate", tiny_factory("mixtral"), "-o", tmp_path / "s", *CAL, code=1)
    assert "does not reproduce MixtralExperts's forward" in r.stderr and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ pruning
def _check_sparsity(path: Path, sparsity: float, nm: tuple[int, int] | None = None) -> dict:
    return _check_sparsity_of(path, sparsity, lambda name: True, nm)


def _check_sparsity_of(path: Path, sparsity: float, which, nm: tuple[int, int] | None = None) -> dict:
    a = arch_of(path)
    disk = tensors(path)
    for t in (t for t in a.targets.values() if which(t.name)):
        w = t.matrix(disk[t.weight_key])
        zeros = int((w == 0).sum())
        assert abs(zeros / w.numel() - sparsity) <= 1 / w.shape[1] + 1e-9, (t.name, zeros / w.numel())
        if nm is not None:
            assert ((w != 0).reshape(w.shape[0], -1, nm[1]).sum(-1) <= nm[0]).all(), t.name
    return disk


@pytest.mark.versions
@pytest.mark.parametrize("name", PER_EXPERT + FUSED)
def test_every_expert_is_pruned_and_routers_stay(name, moe_stats, tmp_path):
    model, stats = moe_stats(name)
    before = tensors(model)
    for pattern, sparsity, nm in (("unstructured", 0.5, None), ("2:4", 0.5, (2, 4))):
        out = tmp_path / pattern.replace(":", "-")
        args = ["--sparsity", 0.5] if pattern == "unstructured" else ["--pattern", pattern]
        r = run("prune", model, "--stats", stats, "--metric", "wanda", *args, "--expert-min-tokens", 0, "-o", out)
        after = _check_sparsity(out, sparsity, nm)
        a = arch_of(model)
        for b, moe in a.experts.items():
            for key in moe.router:
                assert torch.equal(before[key], after[key]), key            # routers untouched
        assert before.keys() == after.keys()
        share = json.loads((out / "stade_report.json").read_text())["coverage"]["share"]
        assert f"targets: {share:.2%} of the decoder blocks' weights" in r.stderr
        assert 0.9 < share < 1.0
        shown = run("inspect", out, "--summary").stdout
        assert f"targets: {share:.2%} of the decoder blocks' weights" in shown and "the report agrees" in shown


@pytest.mark.parametrize("name", FUSED)
def test_a_fused_expert_tensor_is_pruned_slice_by_slice(name, moe_stats, tmp_path):
    """Each expert's slice of a 3-D tensor is its own [out, in] matrix with its own statistics (GPT-OSS: stored
    [in, out], so rows are the tensor's last dimension)."""
    from stade_cli.masks import parse_pattern
    from stade_cli.metrics import get_metric
    from stade_cli.tensors import apply_mask

    model, stats = moe_stats(name)
    out = tmp_path / "out"
    run("prune", model, "--stats", stats, "--metric", "wanda", "--sparsity", 0.5, "--expert-min-tokens", 0, "-o", out)
    st = load_stats(stats)
    before, after = tensors(model), tensors(out)
    wanda, pattern = get_metric("wanda"), parse_pattern("unstructured", 0.5)
    fused = [t for t in arch_of(model).targets.values() if t.fused]
    assert len(fused) == 16
    for t in fused:
        w = t.matrix(before[t.weight_key])
        expected = apply_mask(w, pattern.mask(wanda.score(w.float(), st.moments[t.name])))
        assert torch.equal(t.matrix(after[t.weight_key]), expected), t.name
    for key in {t.weight_key for t in fused}:
        assert after[key].shape == before[key].shape


@pytest.mark.parametrize("metric,extra", [
    ("magnitude", []), ("wanda", []), ("stade", ["--no-bias-correction"]), ("stadew", ["--no-bias-correction"]),
    ("ria", []), ("stochria", []), ("sparsegpt", []), ("dsnot", []), ("r2dsnot", []),
    ("wanda", ["--update", "admm"]), ("wanda", ["--update", "admm", "--admm-gradual"]),
    ("wanda", ["--pattern", "4:8"]), ("wanda", ["--layer-sparsity", "owl", "--owl-lambda", "0.02"]),
    ("sparsegpt", ["--sequential"]), ("wanda", ["--sequential", "--update", "admm"]),
])
def test_every_method_and_option_prunes_the_experts(metric, extra, moe_stats, tmp_path):
    model, stats = moe_stats("qwen2_moe")
    out = tmp_path / "out"
    args = [] if "--pattern" in extra else ["--sparsity", 0.5]
    run("prune", model, "--stats", stats, "--metric", metric, *args, *extra, "--expert-min-tokens", 0, "-o", out,
        *(CAL if "--sequential" in extra else []))
    report = json.loads((out / "stade_report.json").read_text())
    a = arch_of(model)
    assert set(report["layers"]) == set(a.targets)                # every expert, the shared expert, attention
    if "owl" in extra:
        blocks = report["layer_sparsity"]["blocks"]
        assert abs(sum(blocks.values()) / len(blocks) - 0.5) < 1e-9
        for name, layer in report["layers"].items():
            assert abs(layer["sparsity"] - blocks[str(layer["block"])]) <= 1 / layer["shape"][1] + 1e-9, name
    else:
        _check_sparsity(out, 0.5, (4, 8) if "4:8" in extra else None)


@pytest.mark.parametrize("name", FUSED)
def test_stade_on_fused_experts_corrects_what_can_be_corrected(name, moe_stats, tmp_path):
    """stade's default bias correction leaves the slices of fused expert tensors uncorrected (a slice takes no
    bias of its own) and runs; asked for explicitly, it is refused before any work, naming why."""
    model, stats = moe_stats(name)
    out = tmp_path / "out"
    run("prune", model, "--stats", stats, "--metric", "stade", "--expert-min-tokens", 0, "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    slices = {n for n, t in arch_of(model).targets.items() if t.fused}
    assert slices and set(report["layers"]) >= slices
    corrected = {n for n, layer in report["layers"].items() if layer["bias_corrected"]}
    assert corrected and not slices & corrected and report["bias_correction"]["layers"] == len(corrected)
    _check_sparsity(out, 0.5)
    refused = run("prune", model, "--stats", stats, "--metric", "stade", "--bias-correction", "-o", tmp_path / "b",
                  code=2).stderr
    assert "does not apply to slices of fused expert tensors" in refused and f"({len(slices)} in all)" in refused
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", FUSED)
def test_sequential_prunes_fused_experts_in_the_loaded_model(name, moe_stats, tmp_path):
    """--sequential writes each pruned slice back into the loaded model's 3-D parameter (transposed for GPT-OSS)
    before the next block runs, and the checkpoint holds the same decisions."""
    model, stats = moe_stats(name)
    out = tmp_path / "out"
    run("prune", model, "--stats", stats, "--metric", "sparsegpt", "--sequential", "--sparsity", 0.5,
        "--expert-min-tokens", 0, "-o", out)
    _check_sparsity(out, 0.5)
    assert json.loads((out / "stade_report.json").read_text())["mode"] == "sequential"


def test_only_and_skip_choose_experts(moe_stats, tmp_path):
    model, stats = moe_stats("mixtral")
    out = tmp_path / "out"
    run("prune", model, "--stats", stats, "--only", r"experts\.[01]\.", "--skip", r"\.w2$", "--expert-min-tokens", 0,
        "-o", out)
    layers = json.loads((out / "stade_report.json").read_text())["layers"]
    assert set(layers) == {f"model.layers.{b}.block_sparse_moe.experts.{e}.{w}" for b in (0, 1) for e in (0, 1)
                           for w in ("w1", "w3")}


def test_pooled_statistics_are_those_of_every_token_the_experts_saw():
    """The fallback statistics of a starved expert: the block's experts' inputs pooled, as if one layer had seen
    every token routed to any of them (one input per expert: its gate's, or its up's where the gate is skipped)."""
    from types import SimpleNamespace

    from stade_cli.experts import pooled_gram, pooled_moments

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) * (i + 1) + i for i, n in enumerate((7, 3, 11))]
    moe = SimpleNamespace(inputs=[[f"e{i}.gate", f"e{i}.up"] for i in range(3)])
    moments = {"e0.gate": Moments.of(xs[0]), "e1.gate": Moments.of(xs[1]), "e1.up": Moments.of(xs[1]),
               "e2.up": Moments.of(xs[2])}
    leaders = {"e0.gate": xs[0], "e1.gate": xs[1], "e2.up": xs[2]}
    every = torch.cat(xs)
    pooled = pooled_moments(moe, moments)
    assert pooled.count == 21
    assert torch.allclose(pooled.mean, every.mean(0)) and torch.allclose(pooled.norm, every.norm(dim=0))
    assert torch.allclose(pooled.std, every.std(0, correction=0))
    gram = pooled_gram(moe, lambda name: leaders[name].T @ leaders[name], moments)
    assert torch.allclose(gram, every.T @ every)


def test_experts_that_saw_few_tokens_use_stated_fallbacks(moe_stats, tmp_path):
    """Below --expert-min-tokens: gate/up from the block's pooled input, down by magnitude; counted in the report,
    said by prune and by inspect."""
    from stade_cli.experts import pooled_moments
    from stade_cli.masks import parse_pattern
    from stade_cli.metrics import get_metric
    from stade_cli.tensors import apply_mask

    model, stats = moe_stats("mixtral")
    st = load_stats(stats)
    counts = st.experts[0].count.tolist() + st.experts[1].count.tolist()
    limit = int(sorted(counts)[3]) + 1                            # four experts below it
    out = tmp_path / "out"
    r = run("prune", model, "--stats", stats, "--metric", "wanda", "--sparsity", 0.5, "--expert-min-tokens", limit,
            "-o", out)
    report = json.loads((out / "stade_report.json").read_text())
    low = report["experts"]["fallback"]["experts"]
    assert len(low) == 4 and all(n < limit for _, _, n in low)
    assert report["experts"]["fallback"]["targets"] == {"pooled": 8, "magnitude": 4}
    assert "4 expert(s) on fallback statistics" in r.stderr
    assert "4 expert(s) saw fewer than" in run("inspect", out, "--summary").stdout
    a = arch_of(model)
    before, after = tensors(model), tensors(out)
    wanda, pattern = get_metric("wanda"), parse_pattern("unstructured", 0.5)
    for b, e, _ in low:
        moe = a.experts[b]
        pooled = pooled_moments(moe, st.moments)
        assert pooled.count == 2 * 8 * 32                          # every token of the block, once per expert
        for n in moe.inputs[e]:
            w = before[f"{n}.weight"]
            assert torch.equal(after[f"{n}.weight"], apply_mask(w, pattern.mask(wanda.score(w.float(), pooled))))
        for n in moe.middles[e]:
            w = before[f"{n}.weight"]
            assert torch.equal(after[f"{n}.weight"], apply_mask(w, pattern.mask(w.float().abs())))
    for how in ([], ["--sequential", *CAL]):       # Gram methods: the pooled Gram and the identity, both producers
        every = tmp_path / f"gram{len(how)}"
        run("prune", model, "--stats", stats, "--metric", "sparsegpt", "--update", "admm", "--sparsity", 0.5,
            "--expert-min-tokens", 10**9, "--skip", r"\.w1$", "-o", every, *how)
        assert json.loads((every / "stade_report.json").read_text())["experts"]["fallback"]["targets"] == {
            "pooled": 8, "magnitude": 8}
        _check_sparsity_of(every, 0.5, lambda n: not n.endswith(".w1"))
    # with --experts the kept experts are renumbered 0, 1, ...: the fallbacks are named as the output numbers them
    fewer = tmp_path / "fewer"
    run("prune", model, "--stats", stats, "--experts", 2, "--metric", "wanda", "--sparsity", 0.5,
        "--expert-min-tokens", 10**9, "-o", fewer)
    report = json.loads((fewer / "stade_report.json").read_text())["experts"]
    assert sorted((b, e) for b, e, _ in report["fallback"]["experts"]) == [(b, e) for b in (0, 1) for e in (0, 1)]
    counts = {b: st.experts[b].count.tolist() for b in (0, 1)}
    assert [n for _, _, n in report["fallback"]["experts"]] == [
        int(counts[b][old]) for b in (0, 1) for old in report["removal"]["kept"][str(b)]]


# ------------------------------------------------------------------------------------------------ never less
def test_the_coverage_line_for_a_dense_model(tiny_llama, tmp_path):
    r = run("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "out")
    share = json.loads((tmp_path / "out" / "stade_report.json").read_text())["coverage"]["share"]
    assert 0.98 < share < 1.0                                       # norms are the rest
    assert f"targets: {share:.2%} of the decoder blocks' weights" in r.stderr


def test_an_unknown_weight_tensor_in_a_block_is_refused_before_any_work(tiny_llama, tmp_path):
    """A block tensor of ≥ 2 dimensions that is neither a target nor known to stay dense (here a custom 3-D
    parameter): prune refuses, naming it and the --skip that accepts it; with that --skip it stays as it was."""
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_llama, model)
    weights = load_file(str(model / "model.safetensors"))
    extra = {f"model.layers.{b}.mlp.mixer.weight": torch.randn(2, 3, 4) for b in (0, 1)}
    save_file({**weights, **extra}, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run("prune", model, "--metric", "magnitude", "-o", out, code=1)
    line = r.stderr.strip().splitlines()[-1]
    assert "model.layers.0.mlp.mixer.weight (3-D, 2×3×4)" in line and "(2 such tensors in all)" in line
    assert r"--skip 'mlp\.mixer'" in line and not out.exists()
    run("prune", model, "--metric", "magnitude", "--skip", r"mlp\.mixer", "-o", out)
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in extra.items())


@pytest.mark.skipif(FIVE, reason="transformers 4.x has no generic experts interface for Granite-MoE's 3-D experts")
def test_experts_of_an_unknown_layout_are_refused_not_left_dense(tiny_factory, tmp_path):
    r = run("prune", tiny_factory("granitemoe"), "--metric", "magnitude", "-o", tmp_path / "out", code=1)
    assert "block_sparse_moe.input_linear.weight (3-D" in r.stderr and "--skip" in r.stderr


# ------------------------------------------------------------------------------------------------ removal
def _data_bytes(path: Path) -> int:
    return sum(e.nbytes for f in path.glob("*.safetensors") for e in read_header(f)[0])


@pytest.mark.versions
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_expert_removal_by_hand(name, moe_stats, tmp_path):
    """--experts 2: the two best experts of each block stay (REAP: mean router weight × ‖output‖ over the expert's
    tokens; frequency under transformers 4.x), renumbered 0..1, with their router rows; the config says 2 experts;
    it reloads, generates, and is smaller by the removed experts' bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, stats = moe_stats(name)
    score = "reap" if FIVE else "frequency"
    out = tmp_path / "out"
    r = run("prune", model, "--stats", stats, "--experts", 2, "--expert-score", score, "-o", out)
    assert "removed 2 of 4 experts in each of 2 MoE blocks" in r.stderr
    st = load_stats(stats)
    a = arch_of(model)
    before, after = tensors(model), tensors(out)
    removed_bytes = 0
    for b, moe in a.experts.items():
        s = st.experts[b]
        value = s.reap / s.count if score == "reap" else s.count
        kept = sorted(sorted(range(4), key=lambda e: (-float(value[e]), e))[:2])
        report = json.loads((out / "stade_report.json").read_text())["experts"]["removal"]
        assert report["kept"][str(b)] == kept
        for key in moe.router:
            assert torch.equal(after[key], before[key][kept])
        for new, old in enumerate(kept):
            for n in moe.members(old):
                t = a.targets[n]
                if t.fused:
                    assert torch.equal(after[t.weight_key][new], before[t.weight_key][old])
                else:
                    renamed = moe.prefix + f"{new}." + n[len(moe.prefix + f"{old}."):]
                    assert torch.equal(after[renamed + ".weight"], before[n + ".weight"])
        for e in set(range(4)) - set(kept):
            removed_bytes += sum(before[a.targets[n].weight_key][e].numel() * 4 if a.targets[n].fused
                                 else before[n + ".weight"].numel() * 4 for n in moe.members(e))
            removed_bytes += sum(before[k][e].numel() * 4 for k in moe.router)
            removed_bytes += sum(before[k][e].numel() * 4 for k in moe.fused if k.endswith("bias"))
    config = json.loads((out / "config.json").read_text())
    key = {"qwen2_moe": "num_experts", "deepseek_v3": "n_routed_experts"}.get(name, "num_local_experts")
    assert config[key] == 2 and config["num_experts_per_tok"] <= 2
    assert _data_bytes(model) - _data_bytes(out) == removed_bytes
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The model", return_tensors="pt").input_ids
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    shown = run("inspect", out, "--summary").stdout
    assert "mixture of experts: 2 experts in each of 2 blocks; 2 per block removed" in shown


def test_expert_removal_then_pruning_in_one_run(moe_stats, tmp_path):
    model, stats = moe_stats("mixtral")
    out = tmp_path / "out"
    r = run("prune", model, "--stats", stats, "--experts", 3, "--expert-score", "frequency", "--metric", "wanda",
            "--sparsity", 0.5, "--expert-min-tokens", 0, "-o", out)
    assert "removed 1 of 4 experts" in r.stderr and "pruned 26 layers with wanda" in r.stderr
    _check_sparsity(out, 0.5)
    report = json.loads((out / "stade_report.json").read_text())
    assert set(report["layers"]) == set(arch_of(out).targets)      # named as the output names them: experts 0..2
    assert max(int(n.split(".")[5]) for n in report["layers"] if "experts" in n) == 2
    assert "the report agrees" in run("inspect", out, "--summary").stdout


def test_frequency_keeps_the_busiest_experts_and_random_follows_the_seed(moe_stats, tmp_path):
    model, stats = moe_stats("qwen2_moe")
    st = load_stats(stats)

    def kept(score, seed, tag):
        out = tmp_path / tag
        run("prune", model, "--stats", stats, "--experts", 2, "--expert-score", score, "--seed", seed, "-o", out)
        return json.loads((out / "stade_report.json").read_text())["experts"]["removal"]["kept"]

    busiest = {str(b): sorted(sorted(range(4), key=lambda e: (-float(s.count[e]), e))[:2]) for b, s in st.experts.items()}
    assert kept("frequency", 0, "f") == busiest
    assert kept("random", 0, "a") == kept("random", 0, "b")
    seeds = [kept("random", seed, f"r{seed}") for seed in range(6)]
    assert len({json.dumps(k, sort_keys=True) for k in seeds}) > 1     # the seed matters


def test_the_config_says_k_experts_and_grouped_routing_still_works():
    """config.json entries for K experts, found by the family's own keys (nested text configs too); DeepSeek's
    grouped routing scores a group by its best two experts, so K must leave each group two."""
    from stade_cli.arch import MoE
    from stade_cli.errors import UsageError
    from stade_cli.experts import config_entries

    moe = [MoE(0, 8, 2, (), ())]
    assert config_entries({"num_local_experts": 8, "num_experts_per_tok": 2}, moe, 4) == {"num_local_experts": 4}
    assert config_entries({"num_experts": 8, "num_experts_per_tok": 8}, moe, 4) == {"num_experts": 4,
                                                                                   "num_experts_per_tok": 4}
    assert config_entries({"text_config": {"num_local_experts": 8, "num_experts_per_tok": 2}}, moe, 2) == {
        "text_config.num_local_experts": 2}
    grouped = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}
    assert config_entries(grouped, moe, 4) == {"n_routed_experts": 4}
    for k in (2, 3, 5):
        with pytest.raises(UsageError, match="groups of experts"):
            config_entries(grouped, moe, k)
    with pytest.raises(UsageError, match="says nowhere that there are 8 experts"):
        config_entries({"num_experts_per_tok": 2}, moe, 4)


def test_expert_removal_refusals(tiny_llama, moe_stats, tmp_path):
    model, stats = moe_stats("mixtral")
    out = tmp_path / "out"
    assert "has none" in run("prune", tiny_llama, "--metric", "magnitude", "--experts", 2, "-o", out, code=2).stderr
    assert "between 1 and 4" in run("prune", model, "--stats", stats, "--experts", 5, "-o", out, code=2).stderr
    assert "--sequential" in run("prune", model, "--stats", stats, "--experts", 2, "--sequential", "-o", out,
                                 code=2).stderr
    assert "--expert-score must be one of" in run("prune", model, "--stats", stats, "--experts", 2,
                                                  "--expert-score", "often", "-o", out, code=2).stderr
    # a bias correction the experts cannot hold counts the layers the output would have: 2 experts of 4 kept
    every = run("prune", model, "--stats", stats, "--metric", "stade", "--bias-correction", "-o", out, code=1).stderr
    kept = run("prune", model, "--stats", stats, "--metric", "stade", "--bias-correction", "--experts", 2,
               "--sparsity", 0.5, "-o", out, code=1).stderr
    counts = [int(re.search(r"\((\d+) layer\(s\) in all\)", e).group(1)) for e in (every, kept)]
    experts = [t for t in arch_of(model).targets.values() if t.expert is not None]
    assert counts[0] - counts[1] == len(experts) // 2, (counts, every, kept)
    assert not out.exists()
