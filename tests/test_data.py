"""Datasets: builtin split, local formats, seeded windows, evaluation windows."""
import json

import pytest
import torch

from stade_cli.data import calibration_windows, eval_windows, load_corpus
from stade_cli.errors import DataError, UsageError


class CharTokenizer:
    """One token per character: enough to test windowing exactly."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return Out()


def test_builtin_splits_are_disjoint():
    cal, held = load_corpus("builtin", "calibration"), load_corpus("builtin", "evaluation")
    assert cal.documents and held.documents
    assert not set(cal.documents) & set(held.documents)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["delta"]}), tmp_path / "c.parquet")
    assert load_corpus(str(tmp_path), "calibration").documents == ["alpha text", "beta", "gamma", "delta"]
    both = load_corpus(f"{tmp_path / 'a.txt'},{tmp_path / 'c.parquet'}", "calibration")
    assert both.text() == "alpha text\n\ndelta"


def test_bad_datasets(tmp_path):
    with pytest.raises(DataError, match="neither"):
        load_corpus(str(tmp_path / "missing.txt"), "calibration")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        load_corpus(str(tmp_path / "empty.txt"), "calibration")
    (tmp_path / "a.txt").write_text("alpha")
    for spec in (f"{tmp_path / 'a.txt'},", f",{tmp_path / 'a.txt'}", f"{tmp_path / 'a.txt'},,{tmp_path / 'a.txt'}"):
        with pytest.raises(DataError, match="empty entry"):     # never the current directory read in its place
            load_corpus(spec, "calibration")
    (tmp_path / "no-field.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r'line 3 has no "text" field \(it has body\)'):
        load_corpus(str(tmp_path / "no-field.jsonl"), "calibration")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_corpus(str(tmp_path / "broken.jsonl"), "calibration")


def test_calibration_windows_seeded():
    corpus = load_corpus("builtin", "calibration")
    tok = CharTokenizer()
    a = calibration_windows(tok, corpus, 8, 32, seed=0, max_len=1024)
    b = calibration_windows(tok, corpus, 8, 32, seed=0, max_len=1024)
    c = calibration_windows(tok, corpus, 8, 32, seed=1, max_len=1024)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(corpus.text()).input_ids[0]
    for w in a:  # every window is a contiguous slice of the text
        hits = (ids.unfold(0, 32, 1) == w).all(1)
        assert hits.any()


def test_eval_windows_non_overlapping():
    from stade_cli.data import Corpus

    tok = CharTokenizer()
    w = eval_windows(tok, Corpus(["abcdefghij"]), 3, max_len=100, max_windows=None)
    assert w.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert eval_windows(tok, Corpus(["abcdefghij"]), 3, 100, max_windows=2).shape == (2, 3)


def test_seqlen_checks():
    tok = CharTokenizer()
    from stade_cli.data import Corpus

    with pytest.raises(DataError, match="longer than"):
        eval_windows(tok, Corpus(["abc"]), 10, max_len=100, max_windows=None)
    with pytest.raises(UsageError, match="context length"):
        eval_windows(tok, Corpus(["abc" * 100]), 200, max_len=100, max_windows=None)
    with pytest.raises(UsageError, match="nsamples"):
        calibration_windows(tok, Corpus(["abc" * 100]), 0, 10, 0, 100)
    with pytest.raises(UsageError, match="--seqlen must be at least 2"):    # not "the text is too short"
        eval_windows(tok, Corpus(["abc" * 100]), 1, max_len=100, max_windows=None)
