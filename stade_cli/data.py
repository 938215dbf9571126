"""Calibration and evaluation text: c4, wikitext2, local files, and a builtin corpus; seeded sampling.

A dataset spec is a string: ``c4``, ``wikitext2``, ``builtin``, or a local ``.txt``/``.jsonl``/``.parquet``
file, a directory of them, or several of these separated by commas. ``builtin`` is the prose of Python's own ``pydoc_data.topics`` (present in
every Python install): its calibration part and held-out part never overlap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, UsageError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
HUB_DATASETS = ("c4", "wikitext2")
# Where the named datasets come from: a hub repository id, or a local copy in the repository's own layout
# (the tests point these at such copies; ``datasets.load_dataset`` reads either the same way).
HUB_SOURCES = {"c4": "allenai/c4", "wikitext2": "wikitext"}
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100         # the SparseGPT/Wanda protocol: the first 1100 validation documents


@dataclass(frozen=True)
class Corpus:
    """Documents of one split; ``joiner`` glues them into one text (the Wanda/SparseGPT protocol)."""

    documents: list[str]
    joiner: str = "\n\n"
    per_document: bool = False   # c4 calibration samples one window from one random document

    def text(self) -> str:
        return self.joiner.join(self.documents)


def local_paths(spec: str | None) -> list[Path]:
    """The local files and folders a dataset spec names (none for builtin, c4, wikitext2)."""
    if spec is None or spec.strip() in ("builtin",) + HUB_DATASETS:
        return []
    parts = [Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    return [p for p in parts if p.exists()]


def load_corpus(spec: str, split: str) -> Corpus:
    """``split`` is "calibration" or "evaluation"."""
    name = spec.strip()
    if name == "builtin":
        return _builtin(split)
    if name == "wikitext2":
        return _wikitext2(split)
    if name == "c4":
        return _c4(split)
    parts = [p.strip() for p in name.split(",")]
    if not all(parts):  # "a.txt," would read "" (the current directory) too
        raise DataError(f"dataset {spec!r} has an empty entry in its comma-separated list",
                        "name each file or folder once, without a stray comma")
    if len(parts) > 1:  # several local files or directories, joined in the order given
        return Corpus([doc for part in parts for doc in load_corpus(part, split).documents])
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"dataset {spec} is neither a known name ({', '.join(('builtin',) + HUB_DATASETS)}) "
                        f"nor an existing file")
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"dataset file {path} must end in {', '.join(LOCAL_SUFFIXES)}")
    docs = [doc for f in files for doc in _read_local(f)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"dataset {spec} holds no text")
    return Corpus(docs)


def _read_local(path: Path) -> list[str]:
    try:
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8", errors="replace")]
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        import pyarrow.parquet as pq

        return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read dataset file {path}: {exc}") from None


def _read_jsonl(path: Path) -> list[str]:
    """The ``text`` field of every line (a line that is a bare JSON string is its own text)."""
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"cannot read dataset file {path}: line {number} is not JSON ({exc})") from None
        if isinstance(row, dict) and "text" not in row:
            raise DataError(f"cannot read dataset file {path}: line {number} has no \"text\" field "
                            f"(it has {', '.join(map(str, list(row)[:5])) or 'none'})",
                            "each line must be an object with the text under \"text\"")
        docs.append(row["text"] if isinstance(row, dict) else str(row))
    return docs


def _builtin(split: str) -> Corpus:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    cut = len(docs) * 3 // 4  # the last quarter of the topics (alphabetically) is held out
    return Corpus(docs[:cut] if split == "calibration" else docs[cut:])


def _hub_dataset(*args, **kwargs):
    from . import hub

    local = Path(str(args[0])).expanduser().is_dir()          # a local copy in the hub's layout
    if not local and not hub.offline("HF_DATASETS_OFFLINE") and not hub.reachable():
        raise DataError(f"cannot reach the Hugging Face hub ({hub.endpoint()}) for dataset {args[0]}",
                        "set HF_DATASETS_OFFLINE=1 to use a copy in your datasets cache, or give --dataset a local "
                        ".txt/.jsonl/.parquet file or directory (or builtin)")
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, cache and format errors
        raise DataError(f"cannot load dataset {args[0]} from the Hugging Face hub ({type(exc).__name__})",
                        "check your network or use a local file with --dataset PATH") from None


def _wikitext2(split: str) -> Corpus:
    if split == "calibration":  # Wanda: the train split joined with spaces
        data = _hub_dataset(HUB_SOURCES["wikitext2"], "wikitext-2-raw-v1", split="train")
        return Corpus(list(data["text"]), joiner=" ")
    data = _hub_dataset(HUB_SOURCES["wikitext2"], "wikitext-2-raw-v1", split="test")
    return Corpus(list(data["text"]), joiner="\n\n")


def _c4(split: str) -> Corpus:
    if split == "calibration":  # Wanda: en shard 0 of the train split, one window per random document
        data = _hub_dataset(HUB_SOURCES["c4"], data_files={"train": C4_TRAIN}, split="train")
        return Corpus(list(data["text"]), per_document=True)
    data = _hub_dataset(HUB_SOURCES["c4"], data_files={"validation": C4_VALIDATION}, split="validation")
    return Corpus(list(data["text"][:C4_EVAL_DOCUMENTS]), joiner=" ")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (the text tokenized whole)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids


def calibration_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int | None,
                        seed: int, max_len: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens: [nsamples, seqlen], reproducible from ``seed``."""
    if nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1 (got {nsamples})")
    g = torch.Generator().manual_seed(seed)
    if corpus.per_document:   # each window from one document: the length is checked against the model only
        seqlen = check_seqlen(seqlen, max_len, max_len, what="model's context")
        return _per_document_windows(tokenizer, corpus, nsamples, seqlen, g)
    ids = tokenize(tokenizer, corpus.text())
    seqlen = check_seqlen(seqlen, len(ids), max_len, what="calibration text")
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def _per_document_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, g) -> torch.Tensor:
    windows, tries = [], 0
    while len(windows) < nsamples:
        tries += 1
        if tries > 100 * nsamples:
            raise DataError(f"too few documents longer than {seqlen} tokens", "lower --seqlen")
        doc = corpus.documents[int(torch.randint(0, len(corpus.documents), (1,), generator=g))]
        ids = tokenize(tokenizer, doc)
        if len(ids) <= seqlen:
            continue
        start = int(torch.randint(0, len(ids) - seqlen, (1,), generator=g))
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def check_seqlen(seqlen: int | None, ntokens: int, max_len: int, what: str) -> int:
    """Default: the model's context length, capped by the text. Explicit values must fit both."""
    if seqlen is None:
        seqlen = min(max_len, ntokens)
    elif seqlen < 2:        # a window predicts its tokens from the ones before: one token predicts nothing
        raise UsageError(f"--seqlen must be at least 2 (got {seqlen})")
    elif seqlen > max_len:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context length {max_len}")
    elif seqlen > ntokens:
        raise DataError(f"--seqlen {seqlen} is longer than the {what} ({ntokens} tokens)",
                        "lower --seqlen or use more text")
    if seqlen < 2:
        raise DataError(f"the {what} is too short ({ntokens} tokens)")
    return seqlen


def eval_windows(tokenizer, corpus: Corpus, seqlen: int | None, max_len: int,
                 max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of the text tokenized whole, the remainder dropped: [n, seqlen]."""
    ids = tokenize(tokenizer, corpus.text())
    seqlen = check_seqlen(seqlen, len(ids), max_len, what="evaluation text")
    n = len(ids) // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise UsageError(f"--max-windows must be at least 1 (got {max_windows})")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
