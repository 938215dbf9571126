"""Loading, in one place: the model and tokenizer, where they run (device, dtype, accelerate placement), and
the calibration run spec (dataset, windows, seed, batch size) with its checks and its manifest entries.

``calibration``, ``sequential``, ``evaluate`` and ``zeroshot`` all start here: resolve the model, read its
config, choose the device and dtype, tokenize the text into windows, load the model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .arch import context_length
from .checkpoint import ModelSource, checkpoint_dtype, load_config, local_path, resolve_model
from .data import calibration_windows, check_seqlen, load_corpus, local_paths
from .errors import ModelError, UsageError
from .runtime import (Reporter, available_bytes, fits, human_bytes, resolve_device, resolve_dtype,
                      silence_transformers)

SPILL_MODES = ("auto", "device", "disk")
STREAM = "stream"     # --device-map stream: the blocks read from the checkpoint's shards one at a time


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, placement=None):
    """The model in eval mode: all on ``device``, or dispatched by accelerate when ``placement`` has a
    device map (blocks on the GPU(s), the CPU or disk; run block by block with ``blockwise.BlockRunner``)."""
    from transformers import AutoModelForCausalLM

    silence_transformers()
    kwargs = {}
    offload_tmp = None
    if placement is not None and placement.dispatched:
        kwargs["device_map"] = placement.device_map
        if placement.device_map == STREAM:
            kwargs["device_map"] = streaming_map(load_config(source.path), device)
        elif placement.max_memory:
            kwargs["max_memory"] = placement.max_memory
        elif device.type == "cpu":
            kwargs["device_map"] = {"": "cpu"}
        # a new folder of our own, inside --offload-dir when given: accelerate writes fixed names
        # (index.json, NAME.dat) that must never land on a user's files
        from .outputs import scratch_dir

        kwargs["offload_folder"] = offload_tmp = str(scratch_dir("offload", placement.offload_dir))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.path, **dtype_kwarg(dtype), output_loading_info=True,
                                                           **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        if missing:     # transformers would fill them with random values, and every number after would be noise
            raise ModelError(f"cannot load the model from {source.path}: its config asks for weights its files do "
                             f"not hold ({_few(missing)}), which transformers would fill with random values",
                             "the config and the weights disagree: was the folder edited, or written by another "
                             "version of a tool?")
    except BaseException as exc:
        if isinstance(exc, ModelError):
            if offload_tmp is not None:
                import shutil

                shutil.rmtree(offload_tmp, ignore_errors=True)
            raise
        if offload_tmp is not None:
            import shutil

            shutil.rmtree(offload_tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0]   # truncated shards, bad configs, ...
        hint = None
        if "offload the whole model to the disk" in first:         # transformers 4.x: a map with nothing in memory
            hint = ("the --max-memory budgets hold none of the model's modules; raise the CPU's (e.g. cpu=2GiB), or "
                    "pass --device-map stream, which keeps only the decoder blocks on disk")
        raise ModelError(f"cannot load the model from {source.path}: {first}", hint) from None
    if offload_tmp is not None:  # whatever accelerate wrote there goes when the model does, or on release_model
        import shutil
        import weakref

        model._stade_release = weakref.finalize(model, shutil.rmtree, offload_tmp, True)
    if kwargs.get("device_map") is not None:
        return model.eval()
    return model.to(device).eval()


def _few(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def streaming_map(config, device: torch.device) -> dict:
    """``--device-map stream``: every decoder block on "disk" (accelerate reads its tensors from the checkpoint's own
    shards when it runs, one block at a time), every other module on ``device``."""
    from .arch import decoder_blocks, meta_model

    model = meta_model(config)
    blocks = [name for name, _ in decoder_blocks(model)]
    inside = tuple(b + "." for b in blocks)
    where = device.index if device.type == "cuda" and device.index is not None else (0 if device.type == "cuda"
                                                                                      else device.type)
    owners = [name for name, m in model.named_modules()
              if name and not name.startswith(inside) and name not in blocks
              and (next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None)]
    return {**{name: where for name in owners}, **{b: "disk" for b in blocks}}


def release_model(model) -> None:
    """Remove what loading ``model`` put on disk (accelerate's offload folder) now, not when it is collected."""
    release = getattr(model, "_stade_release", None)
    if release is not None:
        release()


@contextmanager
def loaded_model(source: ModelSource, device: torch.device, dtype: torch.dtype, placement=None):
    """``load_model`` for the length of a ``with`` block; its offload folder is removed at the end."""
    model = load_model(source, device, dtype, placement)
    try:
        yield model
    finally:
        release_model(model)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer from {source.path}: {type(exc).__name__}",
                         "the checkpoint needs tokenizer files") from None
    tok.model_max_length = int(1e12)  # we window the text ourselves; silence the length warning
    return tok


def parse_max_memory(text: str | None) -> dict | None:
    """``0=20GiB,cpu=64GiB`` (also ``cuda:0=...``, ``disk=...``) → accelerate's max_memory dict."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise UsageError(f"--max-memory entry '{part}' is not DEVICE=SIZE", "e.g. --max-memory 0=20GiB,cpu=64GiB")
        if key.startswith("cuda:"):
            key = key[5:]
        dev = int(key) if key.isdigit() else key
        if not isinstance(dev, int) and dev not in ("cpu", "disk", "mps", "xpu", "npu"):
            raise UsageError(f"--max-memory device '{key}' is not a GPU index, cpu or disk")
        try:
            size = int(value) if value.isdigit() else convert_file_size_to_int(value.upper().replace("IB", "iB"))
        except (ValueError, TypeError):
            raise UsageError(f"--max-memory size '{value}' is not a size", "e.g. 20GiB, 500MB or a byte count") from None
        if size <= 0:
            raise UsageError(f"--max-memory size '{value}' must be positive")
        out[dev] = size
    return out


@dataclass(frozen=True)
class Footprint:
    """Bytes of a model's weights in a run's dtype."""

    total: int
    block: int        # the largest decoder block
    rest: int         # everything outside the blocks (embeddings, head, final norm)


class Placement:
    """Where the model lives while it runs: an accelerate device map (or none: all on the device) and
    where the cached hidden states go (``spill``: auto, device or disk)."""

    def __init__(self, device_map: str | None = None, max_memory: str | dict | None = None,
                 offload_dir: str | Path | None = None, spill: str = "auto"):
        if spill not in SPILL_MODES:
            raise UsageError(f"--spill must be one of {', '.join(SPILL_MODES)} (got {spill})")
        if device_map is not None and device_map not in ("auto", "balanced", "balanced_low_0", "sequential", STREAM):
            raise UsageError(f"--device-map must be auto, balanced, balanced_low_0, sequential or stream "
                             f"(got {device_map})")
        if max_memory and device_map == STREAM:
            raise UsageError("--max-memory sets a budget for --device-map auto; stream needs none",
                             "drop one of them")
        if (max_memory or offload_dir) and device_map is None:
            device_map = "auto"                     # a memory budget or an offload dir only make sense with one
        self.device_map = device_map
        self.max_memory = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
        self.offload_dir = str(Path(offload_dir).expanduser()) if offload_dir else None
        self.spill = spill

    @property
    def dispatched(self) -> bool:
        return self.device_map is not None

    def streaming(self) -> "Placement":
        """The same, with the blocks streamed from the checkpoint (``--device-map stream``)."""
        return Placement(STREAM, None, self.offload_dir, self.spill)

    def describe(self) -> dict:
        return {"device_map": self.device_map,
                "max_memory": {str(k): v for k, v in self.max_memory.items()} if self.max_memory else None,
                "offload_dir": self.offload_dir, "spill": self.spill}


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")


@dataclass(frozen=True)
class Runtime:
    """A resolved model and where it runs: its source, config, device and dtype."""

    source: ModelSource
    config: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, model: "str | ModelSource", device: "str | torch.device" = "auto", dtype: str = "auto") -> "Runtime":
        source = model if isinstance(model, ModelSource) else resolve_model(model)
        config = load_config(source.path)
        dev = resolve_device(device)
        return cls(source, config, dev, resolve_dtype(dtype, checkpoint_dtype(config), dev))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def tokenizer(self):
        return load_tokenizer(self.source)

    def model(self, placement: "Placement | None" = None):
        """``with rt.model(placement) as net:`` the model loaded for the block; its offload folder goes after."""
        return loaded_model(self.source, self.device, self.dtype, placement)

    def footprint(self) -> "Footprint":
        """What the model's weights take in this run's dtype: in all, the largest block, the rest."""
        from .arch import decoder_blocks, meta_model
        from .checkpoint import tensor_shapes

        itemsize = torch.empty((), dtype=self.dtype).element_size()
        shapes = tensor_shapes(self.source.path)
        blocks = [name for name, _ in decoder_blocks(meta_model(self.config))]
        per_block = {b: 0 for b in blocks}
        rest = 0
        for key, shape in shapes.items():
            n = math.prod(shape) * itemsize
            owner = next((b for b in blocks if key.startswith(b + ".")), None)
            if owner is None:
                rest += n
            else:
                per_block[owner] += n
        return Footprint(sum(per_block.values()) + rest, max(per_block.values(), default=0), rest)

    def settle(self, placement: "Placement | None", reporter: Reporter | None = None) -> "Placement":
        """The placement to load with: the one given; else, when the weights would take more than half of the
        device's free memory, the blocks streamed from the checkpoint one at a time (``--device-map stream``). A
        model whose one block and other weights do not fit even so is refused before any work, with what to pass."""
        reporter = reporter or Reporter()
        placement = placement or Placement()
        if placement.dispatched and placement.device_map != STREAM:
            return placement
        need = self.footprint()
        free = available_bytes(self.device)
        where = "GPU" if self.device.type == "cuda" else "memory"
        if not placement.dispatched:
            if fits(need.total, free):
                return placement
            reporter.log(f"the weights take {human_bytes(need.total)} in {self.dtype_name} and {human_bytes(free)} of {where} are free: "
                         f"the blocks are read from the checkpoint one at a time ({human_bytes(need.block)} each; "
                         "--device-map stream; --device-map auto --max-memory ... to choose otherwise)")
            placement = placement.streaming()
        if need.block + need.rest > free:
            raise ModelError(f"one block and the embeddings take {human_bytes(need.block + need.rest)} in {self.dtype_name}, "
                             f"more than the {human_bytes(free)} of {where} that are free",
                             "pass --dtype bfloat16, or --device-map auto --max-memory to spread it over devices")
        return placement


@dataclass(frozen=True)
class CalibrationSpec:
    """What a calibration pass reads: text, window count and length, seed, batch size."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    batch_size: int = 1

    def check(self, max_len: int | None = None) -> None:
        """The options alone (and, given the model's context length, an explicit --seqlen): before any work."""
        if self.nsamples < 1:
            raise UsageError(f"--nsamples must be at least 1 (got {self.nsamples})")
        check_batch_size(self.batch_size)
        if self.seqlen is not None and max_len is not None:
            check_seqlen(self.seqlen, max_len, max_len, what="model's context")

    def windows(self, rt: Runtime) -> torch.Tensor:
        """The seeded calibration windows [nsamples, seqlen] (token ids)."""
        return calibration_windows(rt.tokenizer(), load_corpus(self.dataset, "calibration"), self.nsamples,
                                   self.seqlen, self.seed, context_length(rt.config))

    def manifest(self, windows: torch.Tensor, rt: Runtime) -> dict:
        """The run's entries in a stats or sequential manifest."""
        return {"dataset": self.dataset, "nsamples": self.nsamples, "seqlen": int(windows.shape[1]),
                "seed": self.seed, "dtype": rt.dtype_name, "device": str(rt.device)}


def run_inputs(model: str | ModelSource, dataset: str | None, placement=None, stats=None) -> list[tuple[str, Path]]:
    """What a run reads (and so must never write): the model, the stats, the local data, the offload folder."""
    path = model.path if isinstance(model, ModelSource) else local_path(model)
    inputs = [("the model directory", path), ("the stats directory", stats)]
    inputs += [("the calibration data", p) for p in local_paths(dataset)]
    from .outputs import OFFLOAD

    return inputs + [(OFFLOAD, getattr(placement, "offload_dir", None))]


def resolve_for(model: str, dest, world, dataset: str | None, placement=None, stats=None,
                then: Callable[[ModelSource], None] | None = None) -> ModelSource:
    """MODEL resolved on rank 0 first (a hub download happens once), then on the other ranks. Rank 0 checks the
    output ``dest`` (an ``outputs.Output``) against the resolved run's inputs (for a hub id, its cache snapshot)
    and runs ``then(source)``, e.g. a disk-space check, before any expensive work."""
    def resolve() -> ModelSource:
        source = resolve_model(model)
        if world.main:
            dest.check_inputs(run_inputs(source, dataset, placement, stats))
            if then is not None:
                then(source)
        return source

    return world.first(resolve)
