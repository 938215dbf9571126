"""What a run will need, said before it starts; a --gram cache that the disk cannot hold is refused first."""
from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
from typer.testing import CliRunner

from stade_cli.arch import describe, meta_model
from stade_cli.checkpoint import load_config, tensor_shapes
from stade_cli.cli.app import app
from stade_cli.estimate import gram_bytes, gram_width_bytes, input_groups, moments_bytes

runner = CliRunner()
DATA = ["--dataset", "builtin", "--nsamples", 4, "--seqlen", 32]


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def test_gram_width_bytes_by_hand():
    assert gram_width_bytes(4096) == 4096 * 4096 * 8          # float64 up to 8192
    assert gram_width_bytes(11008) == 11008 * 11008 * 4       # float32 beyond: Llama-2-7B's down_proj


@pytest.mark.parametrize("name", ["llama", "opt", "qwen2_moe", "mixtral"])
def test_the_estimate_is_what_calibrate_writes(name, tiny_factory, tmp_path):
    """Input groups as calibration finds them (q/k/v, gate/up, each expert's gate/up): the Gram bytes written,
    exactly, and the line before the work says them."""
    model = tiny_factory(name)
    arch = describe(meta_model(load_config(model)), disk=tensor_shapes(model))
    r = run("calibrate", model, "-o", tmp_path / "s", *DATA, "--gram")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert gram_bytes(arch) == manifest["gram"]["bytes"]
    assert len(input_groups(arch)) == len(manifest["gram"]["groups"])
    line = r.stderr.splitlines()[0]
    assert line.startswith("needs about ") and "of it Gram matrices" in line
    assert moments_bytes(arch) <= (tmp_path / "s" / "moments.safetensors").stat().st_size


def test_a_gram_cache_the_disk_cannot_hold_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    import stade_cli.outputs as outputs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    r = run("calibrate", tiny_llama, "-o", tmp_path / "s", *DATA, "--gram", code=1)
    assert "not enough disk space" in r.stderr and "calibrating" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_prune_says_what_it_needs_and_refuses_gram_matrices_that_memory_cannot_hold(tiny_llama, tmp_path,
                                                                                    monkeypatch):
    r = run("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "a")
    assert "needs about" in r.stderr and "of disk for the output" in r.stderr
    import stade_cli.calibration.runner as calibration

    monkeypatch.setattr(calibration, "available_bytes", lambda device: 1000)
    r = run("prune", tiny_llama, "--metric", "sparsegpt", *DATA, "-o", tmp_path / "b", code=1)
    assert "keeps every Gram matrix in memory" in r.stderr and "stade calibrate --gram" in r.stderr


def test_calibrate_holds_one_block_of_gram_matrices(tiny_factory, tmp_path, monkeypatch):
    """--gram writes each block's Gram matrices as soon as the block is done and drops them: at most one block's
    are in memory (the capture of block l + 1 starts with the files of blocks ≤ l written and none held)."""
    import stade_cli.calibration.runner as calibration

    model = tiny_factory("llama", num_hidden_layers=4)
    seen = []
    real = calibration.MomentCapture.__init__

    def init(self, *a, **k):
        seen.append(sorted(p.name for p in (tmp_path / "gram-probe").glob("*")))
        real(self, *a, **k)

    monkeypatch.setattr(calibration.MomentCapture, "__init__", init)
    real_staged = calibration.staged

    from contextlib import contextmanager

    @contextmanager
    def staged(dest, world):
        with real_staged(dest, world) as tmp:
            (tmp_path / "gram-probe").symlink_to(tmp / "gram", target_is_directory=True)
            yield tmp

    monkeypatch.setattr(calibration, "staged", staged)
    run("calibrate", model, "-o", tmp_path / "s", *DATA, "--gram")
    assert seen == [[], ["block_0000.safetensors"], ["block_0000.safetensors", "block_0001.safetensors"],
                    ["block_0000.safetensors", "block_0001.safetensors", "block_0002.safetensors"]]
    shutil.rmtree(tmp_path / "s")


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_shared_factorisations_by_hand(name, tiny_factory):
    """The update keeps, for two blocks, the factorisations of the inputs several layers read (two float32 [in, in]
    matrices each: q/k/v's and gate/up's, or every expert's gate/up), not those of o_proj and down_proj."""
    from stade_cli.estimate import PRUNE_OVERHEAD, prune_memory, shared_factor_bytes_per_block

    model = tiny_factory(name)
    config = json.loads((model / "config.json").read_text())
    arch = describe(meta_model(load_config(model)), disk=tensor_shapes(model))
    h = config["hidden_size"]
    groups = 2 if name == "llama" else 1 + config["num_local_experts"]      # attention's, then the MLP's or each expert's
    per_block = shared_factor_bytes_per_block(arch)
    assert set(per_block) == set(range(config["num_hidden_layers"]))
    assert set(per_block.values()) == {groups * 2 * h * h * 4}
    widest = max(t.in_features for t in arch.targets.values())
    working = 8 * widest * widest + 16 * widest * widest     # the Gram as read (float64 here) and the working set
    assert prune_memory(1000, arch, True, workers=2) == (2 * 1000 + PRUNE_OVERHEAD + 2 * working
                                                          + 2 * groups * 2 * h * h * 4)


def test_refine_needs_by_hand():
    """Llama-2-7B's block (202,375,168 trained weights), hidden 4096, MLP 11008, 32 heads, the recipe's 128 × 256
    windows, 4 a step: 24 bytes a weight, four float32 hidden-state tensors, and a step's activations."""
    from stade_cli.estimate import REFINE_BYTES_PER_WEIGHT, refine_needs

    r = refine_needs(202_375_168, 4096, 11008, 32, 128, 256, 4)
    assert REFINE_BYTES_PER_WEIGHT == 24
    assert r.block == 202_375_168 * 24
    assert r.hidden == 4 * 128 * 256 * 4096 * 4 == 2 * 2**30
    assert r.activations == 4 * 256 * (8 * 4096 + 4 * 11008 + 2 * 32 * 256) * 4
    assert r.total == r.block + r.hidden + r.activations


def test_prune_with_refine_says_what_the_refinement_needs(tiny_llama, tmp_path):
    """The line before the work gives the refinement's figures, part by part, those ``refine_needs`` computes from
    the tiny model's shapes (2 blocks of hidden 64) and the run's windows, and their sum."""
    from stade_cli.estimate import refine_needs
    from stade_cli.runtime import human_bytes

    arch = describe(meta_model(load_config(tiny_llama)), disk=tensor_shapes(tiny_llama))
    block = sum(t.in_features * t.out_features for t in arch.targets.values() if t.block == 0)
    config = json.loads((tiny_llama / "config.json").read_text())
    expected = refine_needs(block, config["hidden_size"], config["intermediate_size"],
                            config["num_attention_heads"], 4, 16, 2)
    r = run("prune", tiny_llama, "--metric", "magnitude", "--refine", 1, "--refine-samples", 4, "--refine-seqlen", 16,
            "--refine-batch", 2, *DATA, "-o", tmp_path / "a")
    line = next(l for l in r.stderr.splitlines() if l.startswith("needs about"))
    parts = line.split("; the refinement about ", 1)[1]
    assert f"a block's weights in float32 with Adam's state {human_bytes(expected.block)}" in parts
    assert f"a step's activations {human_bytes(expected.activations)}" in parts
    assert "the model's weights in float32 " in parts and "the refined weights until written" in parts
    r = run("prune", tiny_llama, "--metric", "magnitude", "--refine", 1, "--refine-samples", 4, "--refine-seqlen", 16,
            "--spill", "disk", *DATA, "-o", tmp_path / "b")
    line = next(l for l in r.stderr.splitlines() if l.startswith("needs about"))
    assert "the refined weights until written" not in line and "(the refined weights wait for the writer on disk: " in line


def test_the_half_of_free_memory_rule_by_hand():
    """One rule for what stays in memory (the model whole, cached hidden states, refined weights): at most half."""
    from stade_cli.runtime import fits, to_disk

    assert fits(100, 200) and not fits(100, 199)
    assert not to_disk("auto", 100, 200) and to_disk("auto", 100, 199)
    assert to_disk("disk", 1, 10**12) and not to_disk("device", 10**12, 1)


def test_refine_needs_of_a_mixture_counts_every_expert(tiny_factory):
    """The largest block's targets, all experts included; the hidden size is the width most targets read."""
    from stade_cli.estimate import hidden_width, refine_needs, refine_needs_of

    model = tiny_factory("mixtral")
    arch = describe(meta_model(load_config(model)), disk=tensor_shapes(model))
    config = json.loads((model / "config.json").read_text())
    block = sum(t.in_features * t.out_features for t in arch.targets.values() if t.block == 0)
    assert hidden_width(arch) == config["hidden_size"]
    assert refine_needs_of(arch, 4, 8, 16, 2) == refine_needs(block, config["hidden_size"],
                                                             config["intermediate_size"], 4, 8, 16, 2)
