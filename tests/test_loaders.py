"""The c4 and wikitext2 loaders through the real ``datasets.load_dataset`` code path, offline, on small local
copies in the hub repositories' own layouts (allenai/c4's gzipped JSON-lines shards, wikitext's parquet
files with the README that declares its configs). Only where the files come from is overridden."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stade_cli import data
from stade_cli.cli.app import app
from stade_cli.errors import DataError, UsageError

runner = CliRunner()
WORDS = ("the quick brown fox jumps over the lazy dog while a patient owl counts the stars above an old mill "
         "and rivers carry leaves toward the distant sea").split()


def _doc(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" document {i}."


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    """allenai/c4 and wikitext as the hub lays them out, with known contents."""
    root = tmp_path_factory.mktemp("hub")
    c4 = root / "allenai" / "c4" / "en"
    c4.mkdir(parents=True)
    train = [_doc(i, 5 if i % 3 == 0 else 60) for i in range(40)]           # a third too short for windows
    valid = [f"validation {i}" for i in range(data.C4_EVAL_DOCUMENTS + 50)]
    for name, docs in ((data.C4_TRAIN, train), (data.C4_VALIDATION, valid)):
        with gzip.open(root / "allenai" / "c4" / name, "wt") as f:
            for i, text in enumerate(docs):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    wt = root / "wikitext"
    (wt / "wikitext-2-raw-v1").mkdir(parents=True)
    lines = {split: ["", f" = {split} = \n"] + [f" {_doc(i, 30)} \n" for i in range(20)] for split in
             ("train", "test", "validation")}
    for split, rows in lines.items():
        pq.write_table(pa.table({"text": rows}), wt / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (wt / "README.md").write_text("---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
                                  + "".join(f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*\n" for s in lines)
                                  + "---\n")
    return {"root": root, "c4_train": train, "c4_valid": valid, "wikitext": lines}


@pytest.fixture
def from_copies(hub_copies, monkeypatch):
    """The loaders read the local copies (their cache is the test session's own, see conftest.py)."""
    monkeypatch.setitem(data.HUB_SOURCES, "c4", str(hub_copies["root"] / "allenai" / "c4"))
    monkeypatch.setitem(data.HUB_SOURCES, "wikitext2", str(hub_copies["root"] / "wikitext"))
    return hub_copies


def test_the_tests_never_write_the_users_datasets_cache():
    import datasets

    assert str(datasets.config.HF_DATASETS_CACHE).startswith(os.environ["HF_DATASETS_CACHE"])
    assert "stade-tests-datasets-" in os.environ["HF_DATASETS_CACHE"]


def test_c4_splits(from_copies):
    cal = data.load_corpus("c4", "calibration")
    assert cal.per_document and cal.documents == from_copies["c4_train"]
    ev = data.load_corpus("c4", "evaluation")
    assert not ev.per_document and ev.joiner == " "
    assert ev.documents == from_copies["c4_valid"][:1100]                 # the validation cut
    assert ev.text() == " ".join(f"validation {i}" for i in range(1100))


def test_wikitext2_splits_and_joiners(from_copies):
    cal = data.load_corpus("wikitext2", "calibration")
    ev = data.load_corpus("wikitext2", "evaluation")
    assert cal.documents == from_copies["wikitext"]["train"] and cal.joiner == " "
    assert ev.documents == from_copies["wikitext"]["test"] and ev.joiner == "\n\n"
    assert ev.text() == "\n\n".join(from_copies["wikitext"]["test"])     # the Wanda/SparseGPT protocol


def test_c4_windows_are_per_document_and_seeded(from_copies, tiny_llama):
    from stade_cli.loading import load_tokenizer
    from stade_cli.checkpoint import resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_llama)))
    corpus = data.load_corpus("c4", "calibration")
    a = data.calibration_windows(tok, corpus, 6, 12, seed=3, max_len=256)
    b = data.calibration_windows(tok, corpus, 6, 12, seed=3, max_len=256)
    c = data.calibration_windows(tok, corpus, 6, 12, seed=4, max_len=256)
    assert a.shape == (6, 12) and torch.equal(a, b) and not torch.equal(a, c)
    docs = [data.tokenize(tok, d) for d in corpus.documents]
    for window in a:                                   # every window lies inside one (long enough) document
        assert any(len(d) > 12 and any(torch.equal(d[s:s + 12], window) for s in range(len(d) - 12))
                   for d in docs)
    longest = max(len(d) for d in docs)
    with pytest.raises(DataError, match=f"too few documents longer than {longest}"):
        data.calibration_windows(tok, corpus, 2, longest, seed=0, max_len=longest + 1)


@pytest.mark.parametrize("dataset", ["c4", "wikitext2", "builtin"])
def test_seqlen_is_checked_the_same_for_every_dataset(from_copies, tiny_llama, dataset):
    from stade_cli.loading import load_tokenizer
    from stade_cli.checkpoint import resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_llama)))
    corpus = data.load_corpus(dataset, "calibration")
    with pytest.raises(UsageError, match="at least 2"):
        data.calibration_windows(tok, corpus, 2, 0, seed=0, max_len=256)      # it used to mean "the default"
    with pytest.raises(UsageError, match="context length 256"):
        data.calibration_windows(tok, corpus, 2, 300, seed=0, max_len=256)


def test_the_cli_calibrates_on_c4_and_evaluates_on_wikitext2(from_copies, tiny_llama, tmp_path):
    out = tmp_path / "stats"
    r = runner.invoke(app, ["calibrate", str(tiny_llama), "-o", str(out), "--dataset", "c4", "--nsamples", "3",
                            "--seqlen", "12"])
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "c4" and manifest["nsamples"] == 3 and manifest["seqlen"] == 12
    r = runner.invoke(app, ["--json", "eval", str(tiny_llama), "--dataset", "wikitext2", "--seqlen", "32"])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["dataset"] == "wikitext2" and result["windows"] >= 1 and result["ppl"] > 1
    r = runner.invoke(app, ["calibrate", str(tiny_llama), "-o", str(tmp_path / "s0"), "--dataset", "c4",
                            "--seqlen", "0"])
    assert r.exit_code == 2 and "--seqlen must be at least 2" in r.stderr


def test_a_missing_hub_dataset_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(data.HUB_SOURCES, "c4", str(tmp_path / "nowhere" / "c4"))
    with pytest.raises(DataError, match="cannot load dataset"):
        data.load_corpus("c4", "calibration")


# ------------------------------------------------------------------------------------ hub ids, from the cache
def _hub_cache(model_dir: Path, home: Path, repo: str = "tiny-org/tiny-llama", commit: str = "a" * 40) -> Path:
    """A Hugging Face cache as snapshot_download leaves it: blobs by hash, a snapshot of symlinks, refs/main."""
    import hashlib
    import os

    repo_dir = home / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_id_resolves_from_the_cache(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys

    snap = _hub_cache(tiny_llama, tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)

    def stade(*args):
        proc = subprocess.run([sys.executable, "-m", "stade_cli", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc

    stade("calibrate", "tiny-org/tiny-llama", "-o", tmp_path / "s", "--dataset", "builtin", "--nsamples", "2",
          "--seqlen", "16")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["model"]["ref"] == "tiny-org/tiny-llama" and manifest["model"]["revision"] == "a" * 40
    stade("prune", "tiny-org/tiny-llama", "--stats", tmp_path / "s", "--metric", "wanda", "-o", tmp_path / "p")
    report = json.loads((tmp_path / "p" / "stade_report.json").read_text())
    assert report["model"]["ref"] == "tiny-org/tiny-llama" and report["model"]["revision"] == "a" * 40
    assert report["model"]["path"] == str(snap)
    assert not any(p.is_symlink() for p in (tmp_path / "p").iterdir())   # the output holds files, not links
    out = json.loads(stade("--json", "eval", "tiny-org/tiny-llama", "--dataset", "builtin", "--seqlen", "32").stdout)
    assert out["model"] == "tiny-org/tiny-llama" and out["ppl"] > 1
    # the cache is an input: writing over it is refused, and it is left as it was
    before = sorted((p.name, p.stat().st_size) for p in snap.iterdir())
    proc = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "tiny-org/tiny-llama", "--metric",
                           "magnitude", "-o", snap, "--force"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "is the model directory" in proc.stderr
    assert sorted((p.name, p.stat().st_size) for p in snap.iterdir()) == before


def test_a_hub_id_with_bin_weights_resolves_from_the_cache(tiny_llama, tmp_path):
    """Older hub repositories hold pytorch_model.bin only: found in the cache, pruned into safetensors."""
    import os
    import subprocess
    import sys

    from test_checkpoints import as_bin

    snap = _hub_cache(as_bin(tiny_llama, tmp_path / "bin"), tmp_path / "hf", repo="old-org/bin-llama")
    assert (snap / "pytorch_model.bin").exists() and not list(snap.glob("*.safetensors"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "old-org/bin-llama", "--metric", "magnitude",
                           "-o", tmp_path / "p"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "p" / "stade_report.json").read_text())["model"]["ref"] == "old-org/bin-llama"


def test_an_unreachable_hub_fails_at_once_or_uses_the_cache(tiny_llama, tmp_path):
    """No offline switch, and the hub out of reach (a port where nothing listens): a hub dataset fails with
    one line naming the local ways out (no stream of retries); a hub model in the cache is used from it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "stade_cli", "eval", str(tiny_llama)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "cannot reach the Hugging Face hub" in lines[0] and "HF_DATASETS_OFFLINE=1" in lines[0]
    _hub_cache(tiny_llama, tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-m", "stade_cli", "prune", "tiny-org/tiny-llama", "--metric", "magnitude",
                           "-o", tmp_path / "p"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Retrying" not in proc.stderr
