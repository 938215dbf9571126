"""Hugging Face checkpoints on disk: resolve MODEL, read shards one tensor at a time, write shards sequentially."""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .outputs import start_writeback

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_NAME = "pytorch_model.bin"
REPORT_NAME = "stade_report.json"
# files that are weights (never copied as side files)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]
_HUB_BIN_PATTERNS = ["*.json", "*.bin", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory on disk and what it came from."""

    path: Path
    ref: str                     # what the user typed: a path or a hub id
    revision: str | None = None  # hub revision (commit) when it came from the hub

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed once per source (it reads samples of every shard)."""
        return fingerprint(self.path)

    def identity(self) -> dict:
        return {"ref": self.ref, "path": str(self.path), "revision": self.revision,
                "fingerprint": self.fingerprint}


def _looks_like_path(ref: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return not ref.strip() or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_model(ref: str, revision: str | None = None) -> ModelSource:
    """A local checkpoint directory, or a hub id downloaded (safetensors only) to the local cache.

    Every weight shard's header is checked here (cheap), so a missing or truncated shard fails before
    any expensive work.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{ref} is a file, not a checkpoint directory")
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref} has no config.json", "point MODEL at a Hugging Face checkpoint directory")
        source = ModelSource(path.resolve(), ref)
    elif _looks_like_path(ref):
        raise ModelError(f"model path {ref} does not exist",
                         "give a checkpoint directory (with config.json) or a hub id such as org/name")
    else:
        source = _from_hub(ref, revision)
    for name in weight_files(source.path):
        if name.endswith(".bin"):
            check_bin(source.path / name)
        else:
            read_header(source.path / name)
    return source


def local_path(ref: str, revision: str | None = None) -> Path:
    """Where MODEL already is on this machine, without any download: the directory itself, or a hub id's
    snapshot in the local cache (else the path as given). For checks that must run before a download."""
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): nothing there to protect yet
        return path


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download

    from . import hub

    offline = hub.offline() or not hub.reachable()   # out of reach: the local cache, at once, not retries
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                     local_files_only=offline, etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        kind = type(exc).__name__
        if "/" not in repo_id:      # a bare name is more often a local folder mistyped than a legacy hub id
            raise ModelError(f"{repo_id} is neither a local directory nor a model on the Hugging Face hub ({kind})",
                             "check the path; hub ids are org/name") from None
        hint = ("not in the local cache and HF_HUB_OFFLINE is set" if hub.offline() else
                f"not in the local cache, and the hub ({hub.endpoint()}) cannot be reached" if offline else
                "check the id, your network, or set HF_HUB_OFFLINE=1 to use the cache only")
        raise ModelError(f"cannot get '{repo_id}' from the Hugging Face hub ({kind})", hint) from None
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise ModelError(f"hub repository {repo_id} has no config.json")
    if not any(path.glob("*.safetensors")):  # an older repository with pytorch_model*.bin weights only
        try:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_BIN_PATTERNS,
                                          local_files_only=offline, etag_timeout=10))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot get the weights of '{repo_id}' from the Hugging Face hub "
                             f"({type(exc).__name__})") from None
    return ModelSource(path, repo_id, revision or path.name)


def weight_files(path: Path) -> list[str]:
    """Shard file names in index order: safetensors (``model.safetensors`` or its index), else PyTorch
    ``pytorch_model.bin`` (or its index), which older checkpoints still are."""
    for index_name, single in ((INDEX_NAME, SINGLE_NAME), (BIN_INDEX_NAME, BIN_NAME)):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{index} is not a valid weight index ({exc})") from None
            files = list(dict.fromkeys(weight_map.values()))
            break
        if (path / single).is_file():
            files = [single]
            break
    else:
        raise ModelError(f"{path} has no weights (model.safetensors, pytorch_model.bin or their index)",
                         "save the checkpoint with save_pretrained")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ModelError(f"weight shard {missing[0]} named by the index is missing from {path}")
    return files


def tensor_shapes(path: Path, files: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape by key, in shard order: from the safetensors headers (no data read), or for ``.bin``
    shards from the memory-mapped archive."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files if files is not None else weight_files(path):
        if name.endswith(".bin"):
            shapes.update({k: tuple(t.shape) for k, t in load_bin(path / name).items()})
        else:
            shapes.update({e.name: tuple(e.shape) for e in read_header(path / name)[0]})
    return shapes


def tensor_dtypes(path: Path, files: list[str] | None = None) -> dict[str, "torch.dtype"]:
    """Every tensor's stored dtype by key, read as ``tensor_shapes`` reads the shapes."""
    import torch

    dtypes: dict[str, "torch.dtype"] = {}
    for name in files if files is not None else weight_files(path):
        if name.endswith(".bin"):
            dtypes.update({k: t.dtype for k, t in load_bin(path / name).items()})
        else:
            dtypes.update({e.name: getattr(torch, _SAFETENSORS_DTYPES[e.dtype]) for e in read_header(path / name)[0]
                           if e.dtype in _SAFETENSORS_DTYPES})
    return dtypes


def output_name(shard: str) -> str:
    """The safetensors name a pruned shard is written under: the same name, or for ``pytorch_model*.bin``
    the name ``save_pretrained`` gives safetensors (``pytorch_model-00001-of-00002.bin`` →
    ``model-00001-of-00002.safetensors``)."""
    if not shard.endswith(".bin"):
        return shard
    stem = shard[: -len(".bin")]
    return ("model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem) + ".safetensors"


def fingerprint(path: Path, samples: int = 16, chunk: int = 4096) -> str:
    """sha256 over the config, the weight files' names and sizes, and a few evenly spaced 4 KiB samples
    of each file's bytes: cheap to compute, and it changes when the weights do (a fine-tuned variant of
    the same architecture has the same names and sizes)."""
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in weight_files(path):
        size = (path / name).stat().st_size
        h.update(f"{name}:{size}".encode())
        with open(path / name, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // max(samples - 1, 1)))
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def load_config(path: Path):
    """The model's config; refuses configs that are not causal language models."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .runtime import silence_transformers

    silence_transformers()      # its warnings about the config (RoPE scaling, ...) are not the user's to act on
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path} holds a '{config.model_type}' model, which is not a causal language model")
    return config


def checkpoint_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def side_files(path: Path) -> list[Path]:
    """Everything at the top level that is not weights: config, generation config, tokenizer files, ... but
    not the model card (``README.md``: the base model's card would present the pruned model as the base;
    stade writes its own, ``card.py``)."""
    return sorted(p for p in path.iterdir()
                  if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)
                  and p.name not in (INDEX_NAME, BIN_INDEX_NAME, REPORT_NAME, "README.md") and not p.name.startswith("."))


def copy_side_files(src: Path, dst: Path) -> None:
    for p in side_files(src):
        shutil.copy2(p, dst / p.name)


def read_report(path: Path) -> dict | None:
    report = Path(path) / REPORT_NAME
    return json.loads(report.read_text()) if report.is_file() else None


# ---------------------------------------------------------------- safetensors, tensor by tensor
# A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
# Reading the header ourselves lets prune copy untouched tensors as raw bytes and write each
# pruned tensor as soon as it is ready: memory stays at a few tensors, not a shard.

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str            # safetensors dtype string, e.g. "BF16"
    shape: tuple
    begin: int            # offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[list[TensorEntry], dict, int]:
    """(entries in data order, metadata, start of the data section); checks the file is complete."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header cut short")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read weight shard {path}: {exc}", "the file is truncated or corrupt") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = sorted((TensorEntry(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()),
                     key=lambda e: e.begin)
    data_len = max((e.end for e in entries), default=0)
    if 8 + n + data_len > size:
        raise ModelError(f"weight shard {path} is truncated ({size} bytes, its header needs {8 + n + data_len})",
                         "re-download or re-save the checkpoint")
    return entries, metadata, 8 + n


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, any dtype (bfloat16 included)."""
    import torch

    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Write a safetensors file sequentially: the header first (all sizes are known), then each tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple, int]], metadata: dict | None):
        import struct

        header, offset = {}, 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self._order = [(name, nbytes) for name, _, _, nbytes in entries]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._queued = 0            # bytes handed to the kernel's writeback so far

    def _writeback(self, step: int = 32 << 20) -> None:
        """Every ``step`` bytes, start writing them to the disk (the fsync before publishing then waits less)."""
        end = self._file.tell()
        if end - self._queued >= step:
            self._file.flush()
            start_writeback(self._file.fileno(), self._queued, end - self._queued)
            self._queued = end

    def write(self, name: str, data) -> None:
        """Append the next tensor's bytes (``data``: bytes-like); names must come in header order."""
        expected, nbytes = self._order[self._next]
        if name != expected or len(memoryview(data).cast("B")) != nbytes:
            raise RuntimeError(f"shard writer: got {name} ({len(memoryview(data).cast('B'))} bytes), "
                               f"expected {expected} ({nbytes} bytes)")
        self._file.write(data)
        self._next += 1
        self._writeback()

    def copy(self, name: str, src, offset: int, nbytes: int, chunk: int = 64 << 20) -> None:
        """Append the next tensor by copying ``nbytes`` raw bytes of the open file ``src`` from ``offset``."""
        expected, size = self._order[self._next]
        if name != expected or nbytes != size:
            raise RuntimeError(f"shard writer: got {name} ({nbytes} bytes), expected {expected} ({size} bytes)")
        src.seek(offset)
        left = nbytes
        while left:
            data = src.read(min(chunk, left))
            if not data:
                raise ModelError(f"weight shard {src.name} ended early while reading {name}")
            self._file.write(data)
            left -= len(data)
            self._writeback()
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order) and not self._file.closed:
            self._file.close()
            raise RuntimeError(f"shard writer closed after {self._next} of {len(self._order)} tensors")
        self._writeback(step=1)
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


# ---------------------------------------------------------------- pytorch_model*.bin, read safely
def check_bin(path: Path) -> None:
    """A PyTorch weight file is a zip archive (torch ≥ 1.6) whose pickle only names tensors; anything else
    is refused before any work."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ModelError(f"weight shard {path} is not a PyTorch zip archive (truncated, or a legacy format)",
                         "re-save the checkpoint with save_pretrained(..., safe_serialization=True)")


def load_bin(path: Path) -> dict:
    """The tensors of one ``.bin`` shard, memory-mapped: ``torch.load(weights_only=True)`` unpickles tensors
    and plain containers only, never code."""
    import pickle

    import torch

    try:
        # a str: torch 2.2 memory-maps no Path
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot read weight shard {path} safely: {first}",
                         "stade loads .bin weights with weights_only=True; convert the checkpoint to safetensors"
                         ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weight shard {path} does not hold a dictionary of tensors")
    return state


_TORCH_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class ShardReader:
    """One input shard, read one tensor at a time: ``entries`` in file order, ``get_tensor``, and ``copy``
    of an untouched tensor into a ShardWriter (raw bytes for safetensors; a .bin tensor's own bytes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.is_bin = self.path.suffix == ".bin"

    def __enter__(self) -> "ShardReader":
        if self.is_bin:
            self._state = load_bin(self.path)
            self.entries, offset = [], 0
            for name, t in self._state.items():
                dtype = _TORCH_TO_SAFETENSORS.get(str(t.dtype).replace("torch.", ""))
                if dtype is None:
                    raise ModelError(f"{name} in {self.path} has dtype {t.dtype}, which safetensors cannot hold")
                nbytes = t.numel() * t.element_size()
                self.entries.append(TensorEntry(name, dtype, tuple(t.shape), offset, offset + nbytes))
                offset += nbytes
            self.metadata = {"format": "pt"}
        else:
            from safetensors import safe_open

            self.entries, self.metadata, self._data_start = read_header(self.path)
            self._st = safe_open(str(self.path), framework="pt")
            self._raw = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        if self.is_bin:
            self._state = None
        else:
            self._raw.close()
            self._st = None

    def keys(self) -> list[str]:
        return [e.name for e in self.entries]

    def get_tensor(self, name: str):
        return self._state[name] if self.is_bin else self._st.get_tensor(name)

    def copy(self, entry: TensorEntry, writer: "ShardWriter", name: str | None = None) -> None:
        """Copy an untouched tensor into ``writer`` (under ``name``, when the output renames it)."""
        if self.is_bin:
            writer.write(name or entry.name, tensor_bytes(self._state[entry.name]))
        else:
            writer.copy(name or entry.name, self._raw, self._data_start + entry.begin, entry.nbytes)


def tensor_reader(path: Path, files):
    """A function key → that tensor of the checkpoint at ``path`` (its shards ``files``), read when asked."""
    where: dict[str, str] = {}
    for f in files:
        with ShardReader(path / f) as r:
            where.update(dict.fromkeys(r.keys(), f))

    def read(key: str):
        with ShardReader(path / where[key]) as r:
            return r.get_tensor(key)

    return read
