"""CUDA against the CPU on tiny models (run on a GPU machine: `pytest -m cuda`; skipped elsewhere).

The same stats (made on the CPU) pruned on each device: scorers choose identical masks; sparsegpt and ADMM, whose
arithmetic runs in other kernels, give the same weights to a tolerance; calibration and perplexity agree to
1e-3 relative.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.cli.app import app

pytestmark = pytest.mark.cuda
runner = CliRunner()
DATA = ["--dataset", "builtin", "--nsamples", 8, "--seqlen", 64]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\nstderr: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def cpu_stats(tiny_factory, tmp_path_factory):
    model = tiny_factory("llama")
    out = tmp_path_factory.mktemp("cuda") / "stats"
    run("calibrate", model, "-o", out, *DATA, "--gram", "--device", "cpu")
    return model, out


def test_calibration_on_cuda_equals_the_cpu(cpu_stats, tmp_path):
    model, stats = cpu_stats
    run("calibrate", model, "-o", tmp_path / "gpu", *DATA, "--gram", "--device", "cuda", "--dtype", "float32")
    a, b = load_file(str(stats / "moments.safetensors")), load_file(str(tmp_path / "gpu" / "moments.safetensors"))
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-3, atol=1e-6), k


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "stade", "ria", "stadew"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_scorers_choose_identical_masks(cpu_stats, tmp_path, metric, pattern):
    model, stats = cpu_stats
    args = ["--metric", metric, "--stats", stats, "--pattern", pattern, "--no-bias-correction"]
    run("prune", model, *args, "--device", "cpu", "-o", tmp_path / "cpu")
    run("prune", model, *args, "--device", "cuda", "-o", tmp_path / "gpu")
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k
        assert torch.equal(a[k], b[k]), k                    # kept weights keep their bits


@pytest.mark.parametrize("how", [["--metric", "sparsegpt"], ["--metric", "wanda", "--update", "admm"],
                                 ["--metric", "wanda", "--update", "admm", "--admm-gradual"]])
def test_solvers_agree_to_tolerance(cpu_stats, tmp_path, how):
    model, stats = cpu_stats
    # the same products on both devices: ADMM's `auto` is bfloat16 on CUDA and on a CPU with fast bfloat16 only
    # (float32 on the others), and float32 against bfloat16 alone differs by more than the tolerance
    how = how + (["--admm-precision", "float32"] if "admm" in how else [])
    run("prune", model, *how, "--stats", stats, "--device", "cpu", "-o", tmp_path / "cpu")
    run("prune", model, *how, "--stats", stats, "--device", "cuda", "-o", tmp_path / "gpu")
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "gpu" / "model.safetensors"))
    for k in a:
        if k.endswith("proj.weight"):
            assert (a[k] - b[k]).norm() <= 1e-3 * a[k].norm(), k
            assert ((a[k] == 0) != (b[k] == 0)).float().mean() < 0.01, k    # a mask flips only at near-ties


def test_perplexity_on_cuda_equals_the_cpu(cpu_stats):
    model, _ = cpu_stats
    args = ["eval", model, "--dataset", "builtin", "--seqlen", 64, "--max-windows", 4, "--json", "--dtype", "float32"]
    cpu = json.loads(run(*args, "--device", "cpu").stdout)["ppl"]
    gpu = json.loads(run(*args, "--device", "cuda").stdout)["ppl"]
    assert gpu == pytest.approx(cpu, rel=1e-3)


def test_refinement_on_cuda_keeps_the_mask_and_lowers_the_error(cpu_stats, tmp_path):
    """--refine on the GPU (bfloat16 model, float32 training copies, bfloat16 products under auto): the layer-wise
    zeros, exactly, and every block's output error lowered."""
    model, stats = cpu_stats
    flags = ["--stats", stats, "--update", "admm", "--sparsity", 0.6, "--refine-samples", 8, "--refine-seqlen", 32]
    run("prune", model, *flags, "--device", "cuda", "-o", tmp_path / "layerwise")
    run("prune", model, *flags, "--device", "cuda", "--dtype", "bfloat16", "--refine", 20, "-o", tmp_path / "refined")
    a = load_file(str(tmp_path / "layerwise" / "model.safetensors"))
    b = load_file(str(tmp_path / "refined" / "model.safetensors"))
    report = json.loads((tmp_path / "refined" / "stade_report.json").read_text())
    for name in report["layers"]:
        assert torch.equal(a[f"{name}.weight"] == 0, b[f"{name}.weight"] == 0), name
    assert all(e["after"] < e["before"] for e in report["refine"]["blocks"])
    assert report["refine"]["precision"] == "bfloat16"          # auto: the GPU is fast at bfloat16 products
