"""Checkpoints in the shapes users have: pytorch_model*.bin (single and sharded), multi-shard safetensors with new
bias tensors in the index, tied embeddings; each pruned, then reloaded with from_pretrained."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.loading import dtype_kwarg

runner = CliRunner()
DATA = ["--dataset", "builtin", "--nsamples", "2", "--seqlen", "16"]


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stderr}"
    return result


def copy_side(src: Path, dst: Path) -> Path:
    import shutil

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    return dst


def as_bin(src: Path, dst: Path, shard_bytes: int | None = None) -> Path:
    """The checkpoint as older tools saved it: pytorch_model.bin, or shards with pytorch_model.bin.index.json."""
    copy_side(src, dst)
    state = tensors(src)
    if shard_bytes is None:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    shards, size = [{}], 0
    for key, t in state.items():
        if size and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, dst / name)
        weight_map.update({k: name for k in shard})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
         "weight_map": weight_map}))
    return dst


def as_shards(src: Path, dst: Path, shard_bytes: int) -> Path:
    """The checkpoint as several safetensors shards with model.safetensors.index.json."""
    from safetensors.torch import save_file

    copy_side(src, dst)
    state = tensors(src)
    shards, size = [{}], 0
    for key, t in state.items():
        if size and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
         "weight_map": weight_map}))
    return dst


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reload_equals(out: Path, expected: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, **dtype_kwarg(torch.float32))
    state = model.state_dict()
    for key, t in expected.items():
        assert torch.equal(state[key], t), key


def test_bin_checkpoints_prune_like_safetensors(tiny_llama, tmp_path):
    single = as_bin(tiny_llama, tmp_path / "bin")
    sharded = as_bin(tiny_llama, tmp_path / "bin-sharded", shard_bytes=20_000)
    assert (single / "pytorch_model.bin").is_file() and not list(single.glob("*.safetensors"))
    assert (sharded / "pytorch_model.bin.index.json").is_file() and len(list(sharded.glob("*.bin"))) > 2
    ref = tmp_path / "ref"
    run("prune", tiny_llama, "--metric", "stade", *DATA, "-o", ref)
    expected = tensors(ref)
    for model in (single, sharded):
        out = tmp_path / f"out-{model.name}"
        run("prune", model, "--metric", "stade", *DATA, "-o", out)
        assert not list(out.glob("*.bin")) and not (out / "pytorch_model.bin.index.json").exists()
        got = tensors(out)
        assert got.keys() >= expected.keys() - {"lm_head.weight"}
        for key in expected.keys() & got.keys():
            assert torch.equal(got[key], expected[key]), key      # same pruned weights, biases and all
        if model is sharded:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            names = set(index["weight_map"].values())
            assert names == {p.name for p in out.glob("*.safetensors")} and all(n.startswith("model-") for n in names)
            assert any(k.endswith("o_proj.bias") for k in index["weight_map"])     # the new biases are listed
        reload_equals(out, expected)
        run("inspect", model)                                     # reading .bin for inspect works too


def test_a_bin_shard_is_memory_mapped_from_a_string_path(tmp_path, monkeypatch):
    """torch 2.2, the oldest torch supported, memory-maps only a file named by a str (a Path fails with "f must be
    a string filename in order to use mmap argument"): ``load_bin`` hands it one, and gets the tensors back."""
    from stade_cli.checkpoint import load_bin

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, path)
    seen = []
    real = torch.load

    def load(f, *args, **kwargs):
        seen.append((type(f), kwargs.get("mmap"), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    state = load_bin(path)
    assert seen == [(str, True, True)]
    assert torch.equal(state["w"], torch.arange(6.0).view(2, 3))


def test_a_bin_that_runs_code_is_refused(tiny_llama, tmp_path):
    import shutil

    model = as_bin(tiny_llama, tmp_path / "evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = torch.load(model / "pytorch_model.bin", weights_only=True)
    state["payload"] = Evil()
    torch.save(state, model / "pytorch_model.bin", pickle_module=pickle)
    result = runner.invoke(app, ["prune", str(model), "--metric", "magnitude", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "safely" in result.stderr and "weights_only" in result.stderr, result.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()
    shutil.rmtree(model)


def test_multi_shard_safetensors_with_new_biases_reload(tiny_llama, tmp_path):
    model = as_shards(tiny_llama, tmp_path / "sharded", shard_bytes=20_000)
    assert len(list(model.glob("*.safetensors"))) > 2
    out = tmp_path / "out"
    run("prune", model, "--metric", "stade", *DATA, "-o", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in model.glob("*.safetensors")}
    new = [k for k in index["weight_map"] if k.endswith(".bias")]
    assert new and all(k in tensors(out) for k in new)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    reload_equals(out, tensors(out))


def test_tied_embeddings_stay_tied(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    tied = tiny_factory("llama", tie_word_embeddings=True)
    out = tmp_path / "out"
    run("prune", tied, "--metric", "wanda", *DATA, "-o", out)
    model = AutoModelForCausalLM.from_pretrained(out, **dtype_kwarg(torch.float32))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    dense = AutoModelForCausalLM.from_pretrained(tied, **dtype_kwarg(torch.float32))
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)  # not a target
    run("eval", out, "--dataset", "builtin", "--seqlen", "32", "--max-windows", "2")
