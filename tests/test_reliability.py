"""Every bad input: one line on stderr naming the problem, exit 2 (usage) or 1, no traceback, nothing written."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.loading import dtype_kwarg

runner = CliRunner()


def fails(*args, code=1, contains=(), cwd_out=None):
    """Run the CLI, expect failure with exactly one stderr line mentioning every string in `contains`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


def cli(*args, env=None, timeout=300):
    """The installed entry point in a subprocess (what a shell user sees)."""
    return subprocess.run([sys.executable, "-c", "from stade_cli.cli.app import main; main()", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def stats(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "stats"
    result = runner.invoke(app, ["calibrate", str(tiny_llama), "-o", str(out), "--dataset", "builtin",
                                 "--nsamples", "2", "--seqlen", "16"])
    assert result.exit_code == 0, result.stderr
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- MODEL
def test_model_path_missing(tmp_path):
    fails("prune", tmp_path / "nope", "-o", tmp_path / "o", contains=("does not exist",))
    fails("calibrate", "./nope", "-o", tmp_path / "o", contains=("does not exist",))
    fails("eval", tmp_path / "nope", contains=("does not exist",))
    assert not (tmp_path / "o").exists()


def test_model_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    fails("prune", tmp_path / "m", "-o", tmp_path / "o", contains=("no config.json",))


def test_config_not_causal_lm(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    save_file({"x": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    fails("prune", tmp_path / "m", "-o", tmp_path / "o", contains=("not a causal language model",))


def test_hub_id_offline_fails_fast(tmp_path):
    """Offline, a hub id not in the cache is a cache miss, not a network attempt: the endpoint points at a
    port where nothing listens, and the error is the cache lookup's, with nothing written anywhere."""
    proc = cli("prune", "someone/some-model-that-is-not-cached", "-o", tmp_path / "o",
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 1 and "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LocalEntryNotFoundError" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_index_names_missing_shard(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    fails("prune", m, "--metric", "magnitude", "-o", tmp_path / "o", contains=("missing", "00001"))


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated_shard(tiny_llama, tmp_path, cut):
    m = copy_model(tiny_llama, tmp_path / "m")
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:cut])
    for cmd in (["prune", m, "--metric", "magnitude", "-o", tmp_path / "o"], ["eval", m, "--dataset", "builtin"],
                ["calibrate", m, "-o", tmp_path / "o", "--dataset", "builtin"]):
        fails(*cmd, contains=("truncated",))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- STATS
def test_stats_missing_and_malformed(tiny_llama, stats, tmp_path):
    args = ["prune", tiny_llama, "--metric", "wanda", "-o", tmp_path / "o", "--stats"]
    fails(*args, tmp_path / "none", contains=("does not exist", "stade calibrate"))
    (tmp_path / "empty").mkdir()
    fails(*args, tmp_path / "empty", contains=("no manifest.json",))
    bad = shutil.copytree(stats, tmp_path / "v9")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 9}))
    fails(*args, bad, contains=("version 9",))
    assert not (tmp_path / "o").exists()


def test_stats_for_another_model(tiny_factory, stats, tmp_path):
    fails("prune", tiny_factory("llama", seed=1), "--stats", stats, "-o", tmp_path / "o",
          contains=("another model", "stade calibrate"))


def _edit_moments(stats: Path, dst: Path, edit) -> Path:
    out = shutil.copytree(stats, dst)
    tensors = load_file(out / "moments.safetensors")
    edit(tensors)
    save_file(tensors, out / "moments.safetensors")
    return out


def test_stats_missing_module_wrong_shape_nan(tiny_llama, stats, tmp_path):
    layer = "model.layers.1.mlp.down_proj"
    args = ["prune", tiny_llama, "--metric", "wanda", "-o", tmp_path / "o", "--stats"]
    missing = _edit_moments(stats, tmp_path / "a", lambda t: t.pop(f"{layer}.sumsq"))
    fails(*args, missing, contains=(layer,))
    shape = _edit_moments(stats, tmp_path / "b", lambda t: t.update({f"{layer}.sum": torch.zeros(3, dtype=torch.float64)}))
    fails(*args, shape, contains=(layer, "shape"))
    nan = _edit_moments(stats, tmp_path / "c", lambda t: t[f"{layer}.sumsq"].__setitem__(0, float("nan")))
    fails(*args, nan, contains=(layer, "NaN"))
    inf = _edit_moments(stats, tmp_path / "d", lambda t: t[f"{layer}.sum"].__setitem__(1, float("inf")))
    fails(*args, inf, contains=(layer, "Inf"))
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("args,code,text", [
    (["--sparsity", "1.0"], 2, "[0, 1)"),
    (["--sparsity", "-0.2"], 2, "[0, 1)"),
    (["--pattern", "4:4"], 2, "N < M"),
    (["--pattern", "2:0"], 2, "0 < N < M"),
    (["--pattern", "0:4"], 2, "0 < N < M"),
    (["--pattern", "5:6"], 2, "divisible by 6"),
    (["--pattern", "2:4", "--sparsity", "0.7"], 2, "contradicts"),
    (["--metric", "sparsegpt2"], 2, "stochria"),
    (["--nsamples", "0", "--dataset", "builtin"], 2, "nsamples"),
    (["--seqlen", "100000", "--dataset", "builtin"], 2, "context length"),
    (["--device", "cuda"], 1, "no CUDA GPU"),
    (["--device", "tpu"], 2, "device"),
    (["--device", "mps"], 1, "no Apple GPU"),
])
def test_bad_options(tiny_llama, tmp_path, args, code, text):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if args[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("an Apple GPU is present")
    fails("prune", tiny_llama, "--metric", args[args.index("--metric") + 1] if "--metric" in args else "wanda",
          *[a for i, a in enumerate(args) if "--metric" not in args[max(i - 1, 0):i + 1]],
          "-o", tmp_path / "o", code=code, contains=(text,))
    assert not (tmp_path / "o").exists()


def test_seqlen_longer_than_text(tiny_llama, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    fails("calibrate", tiny_llama, "-o", tmp_path / "o", "--dataset", small, "--seqlen", 64,
          contains=("longer than",))


def test_empty_or_missing_dataset(tiny_llama, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    fails("calibrate", tiny_llama, "-o", tmp_path / "o", "--dataset", tmp_path / "empty.txt", contains=("no text",))
    fails("calibrate", tiny_llama, "-o", tmp_path / "o", "--dataset", tmp_path / "gone.txt",
          contains=("gone.txt",))
    fails("eval", tiny_llama, "--dataset", tmp_path / "gone.txt", contains=("gone.txt",))
    assert not (tmp_path / "o").exists()


def test_usage_errors_from_the_parser_are_one_line(tiny_llama, tmp_path):
    for args in (["prune", tiny_llama], ["prune", tiny_llama, "-o", tmp_path / "o", "--bogus"],
                 ["prune", tiny_llama, "-o", tmp_path / "o", "--sparsity", "abc"], ["frobnicate"]):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], proc.stderr


# --------------------------------------------------------------------------------------------- OUTPUT
def test_output_exists_is_file_not_writable(tiny_llama, tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    fails("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "exists", contains=("--force",))
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    fails("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "file", contains=("is a file",))
    fails("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "file" / "sub", contains=("file",))
    fails("prune", tiny_llama, "--metric", "magnitude", "-o", "/proc/stade-out", contains=("/proc",))


def test_disk_full_removes_partial_output(tiny_llama, tmp_path, monkeypatch):
    from stade_cli import checkpoint

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.ShardWriter, "write", full)
    monkeypatch.setattr(checkpoint.ShardWriter, "copy", full)
    line = fails("--quiet", "prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "o",   # the error alone
                 contains=("disk", "bytes"))
    size = (tiny_llama / "model.safetensors").stat().st_size
    assert f"{size:,}" in line
    assert list(tmp_path.iterdir()) == []                        # no output, no temp dir


def test_not_enough_space_fails_before_writing(tiny_llama, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=10))
    fails("prune", tiny_llama, "--metric", "magnitude", "-o", tmp_path / "o", contains=("disk space", "10 free"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_keep_dtype_and_kept_bits(tiny_factory, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    src = tiny_factory("llama")
    m = copy_model(src, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(src, **dtype_kwarg(dtype))
    (m / "model.safetensors").unlink()
    model.save_pretrained(m)
    out = tmp_path / "o"
    assert runner.invoke(app, ["prune", str(m), "--metric", "stade", "-o", str(out), "--dataset", "builtin",
                               "--nsamples", "2", "--seqlen", "16"]).exit_code == 0
    before, after = load_file(m / "model.safetensors"), load_file(out / "model.safetensors")
    for key, t in before.items():
        assert after[key].dtype == dtype
        kept = after[key] != 0
        assert torch.equal(after[key][kept].view(torch.int16), t[kept].view(torch.int16)), key
    assert all(after[k].dtype == dtype for k in after if k.endswith(".bias"))
    AutoModelForCausalLM.from_pretrained(out)


def test_same_inputs_give_identical_bytes(tiny_llama, tmp_path):
    for i in (1, 2):
        assert runner.invoke(app, ["calibrate", str(tiny_llama), "-o", str(tmp_path / f"s{i}"), "--dataset", "builtin",
                                   "--nsamples", "3", "--seqlen", "16", "--seed", "7"]).exit_code == 0
        assert runner.invoke(app, ["prune", str(tiny_llama), "--metric", "stochria", "--stats", str(tmp_path / f"s{i}"),
                                   "-o", str(tmp_path / f"o{i}")]).exit_code == 0
    assert (tmp_path / "s1/moments.safetensors").read_bytes() == (tmp_path / "s2/moments.safetensors").read_bytes()
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o2/model.safetensors").read_bytes()


def test_refusals_say_what_was_wrong(tiny_factory, tiny_llama, tmp_path, monkeypatch):
    """A --sparsity that was given is not called missing; a bare name that is no folder is not sent to the hub as
    if it were an id; --bias-correction that the model cannot hold is what the hint names."""
    fails("prune", tiny_llama, "--structure", "channels", "--sparsity", 0, "--dataset", "builtin", "-o",
          tmp_path / "o", code=2, contains=("must be in (0, 1) (got 0)",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    fails("eval", "no-such-folder", "--dataset", "builtin",
          contains=("no-such-folder is neither a local directory nor a model on the Hugging Face hub", "org/name"))
    qwen2 = tiny_factory("qwen2")          # no config switch gives its down projections a bias
    line = fails("prune", qwen2, "--structure", "channels", "--sparsity", 0.5, "--metric", "wanda",
                 "--bias-correction", "--dataset", "builtin", "--nsamples", 2, "--seqlen", 16, "-o", tmp_path / "q")
    assert "drop --bias-correction" in line and "use --metric wanda" not in line
