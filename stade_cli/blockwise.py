"""Run a decoder block by block over all calibration (or evaluation) windows.

The inputs of the first block are captured once, with every block's own keyword arguments (stand-ins take the
blocks' places and record what the model hands each one: models that alternate sliding-window and full attention,
Gemma 2 and 3 among them, give each block the mask and rotary embeddings of its kind; no block runs, and the
forward pass is stopped at the last stand-in; ``BlockRunner._arguments``); then every block in turn is brought onto
its execution device, runs on all the cached hidden states, and its outputs become the next block's inputs. Only
the current block and the cached hidden states need to be on the device, which is what lets calibrate,
``prune --sequential`` and eval handle models larger than the device: the model is loaded with an accelerate
device map (``--device-map``, ``--max-memory``, ``--offload-dir``), and ``onloaded`` takes one block at a time off
accelerate's hooks and onto its device, then hands it back.

The cached hidden states (windows × seqlen × hidden) stay on the device when they fit, else they are
memory-mapped files on disk (``HiddenCache``); the log says which.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .arch import Architecture
from .loading import Placement, check_batch_size
from .runtime import Reporter, available_bytes, human_bytes, to_disk



# ------------------------------------------------------------------------------------------- devices
def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def _own_tensors(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]


def execution_device(modules: list[nn.Module], default: torch.device) -> torch.device:
    """Where accelerate runs these modules (the first hooked one that says), else ``default``."""
    for m in modules:
        hook = _hook(m)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for m in modules:
        for _, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t.device.type != "meta":
                return t.device
    return default


@contextmanager
def onloaded(modules: list[nn.Module], device: torch.device):
    """Take ``modules`` off accelerate's hooks, with all their tensors on ``device``; restore on exit.

    Offloaded tensors (on the meta device, their values in the hook's weights map on the CPU or on disk)
    are loaded from the weights map; on exit they go back to meta and the hooks are re-attached, so an
    offloaded module is back to its offloaded state and any change made to its weights inside is dropped.
    Modules without hooks (a model loaded without a device map) are left where they are.
    """
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    saved = []
    try:
        for m in modules:
            hook = _hook(m)
            names = _own_tensors(m)
            if hook is None or not names:
                continue
            values = {}
            for n in names:
                current = getattr(m, n)
                if current is not None and current.device.type == "meta":
                    wmap = getattr(hook, "weights_map", None)
                    if wmap is None or n not in wmap:
                        raise RuntimeError(f"offloaded tensor {n} of {type(m).__name__} has no stored value")
                    values[n] = wmap[n]
            remove_hook_from_module(m)
            saved.append((m, hook, names, set(values)))
            for n in names:
                if getattr(m, n) is not None:
                    set_module_tensor_to_device(m, n, device, value=values.get(n))
        yield
    finally:
        for m, hook, names, offloaded in reversed(saved):
            for n in offloaded:
                set_module_tensor_to_device(m, n, "meta")
            add_hook_to_module(m, hook)


def move(obj, device: torch.device):
    """Tensors inside tuples/lists/dicts moved to ``device`` (the keyword arguments of a block call)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def for_windows(obj, n: int):
    """A block call's keyword arguments recorded for one window, for a batch of ``n``: every tensor of two or more
    dimensions whose first (the batch) is 1 expanded to ``n`` (a view, no copy), inside tuples/lists/dicts. Masks,
    position ids and rotary tables broadcast in most attentions, but some check that the mask's batch is the
    hidden states' (OPT's in transformers 4.x: "Attention mask should be of size (4, 1, 32, 32)")."""
    if isinstance(obj, torch.Tensor):
        return obj.expand(n, *obj.shape[1:]) if obj.dim() >= 2 and obj.shape[0] == 1 and n != 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(for_windows(o, n) for o in obj)
    if isinstance(obj, dict):
        return {k: for_windows(v, n) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------- hidden states
class HiddenCache:
    """Hidden states [windows, seqlen, hidden] for a block's inputs and outputs, on the device or on disk.

    Two buffers (read and write) swap after every block. On disk they are files memory-mapped with
    ``torch.from_file`` in a temp dir (under ``spill_dir``), removed by ``close``.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, on_disk: bool,
                 spill_dir: str | Path | None = None):
        self.shape, self.dtype, self.device, self.on_disk = shape, dtype, device, on_disk
        self.dir: Path | None = None
        if on_disk:
            from .outputs import scratch_dir

            self.dir = scratch_dir("hidden", spill_dir or None)
            n = math.prod(shape)
            self._bufs = [torch.from_file(str(self.dir / f"hidden{i}.bin"), shared=True, size=n,
                                          dtype=dtype).view(shape) for i in (0, 1)]
        else:
            self._bufs = [torch.empty(shape, dtype=dtype, device=device) for _ in (0, 1)]
        self._read = 0

    @staticmethod
    def nbytes(shape, dtype: torch.dtype) -> int:
        return 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def get(self, start: int, stop: int) -> torch.Tensor:
        return self._bufs[self._read][start:stop].to(self.device, non_blocking=False)

    def put(self, start: int, stop: int, value: torch.Tensor, into_next: bool = True) -> None:
        self._bufs[1 - self._read if into_next else self._read][start:stop].copy_(value)

    def swap(self) -> None:
        self._read = 1 - self._read

    def close(self) -> None:
        self._bufs = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ------------------------------------------------------------------------------------------- the runner
def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Captured(Exception):
    """Raised by the last stand-in once every block's arguments are recorded: the rest of the forward pass (the
    final norm, the head) has nothing to give."""


class _StandIn(nn.Module):
    """Takes a block's place while the inputs are captured: returns its input, so no block runs (or, for the
    head, replays the last hidden states).

    Attribute lookups it cannot answer go to the real block (models read e.g. ``layer.attention_type``).
    """

    def __init__(self, real: nn.Module, replay: Callable[[], torch.Tensor] | None = None, as_tuple: bool = False):
        super().__init__()
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_replay", replay)
        object.__setattr__(self, "_as_tuple", as_tuple)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, hidden_states, *args, **kwargs):
        out = self._replay() if self._replay is not None else _hidden(hidden_states)
        return (out,) if self._as_tuple else out


@contextmanager
def _blocks_replaced(model: nn.Module, arch: Architecture, *stand_ins: nn.Module):
    """The decoder's block list temporarily replaced by ``stand_ins``."""
    modules = dict(model.named_modules())
    list_name = arch.blocks[0].rsplit(".", 1)[0]                 # e.g. "model.layers"
    owner_name, _, attr = list_name.rpartition(".")
    owner = modules[owner_name] if owner_name else model
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(stand_ins))
    try:
        yield
    finally:
        setattr(owner, attr, full)


class BlockRunner:
    """Block-by-block forward of ``windows`` [n, seqlen] through ``model`` (see the module docstring).

    ``model`` may be a plain model on ``device`` or one dispatched by accelerate with a device map.
    """

    def __init__(self, model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device,
                 batch_size: int = 1, placement: "Placement | None" = None, reporter: Reporter | None = None):
        check_batch_size(batch_size)
        placement = placement or Placement()
        self.model, self.arch, self.device, self.reporter = model, arch, device, reporter or Reporter()
        self.windows = windows
        self.modules = dict(model.named_modules())
        self.blocks_list = [self.modules[b] for b in arch.blocks]
        inside = {id(m) for b in self.blocks_list for m in b.modules()}
        self.outer = [m for m in model.modules() if id(m) not in inside and _own_tensors(m)]
        self.slices = [(s, min(s + batch_size, len(windows))) for s in range(0, len(windows), batch_size)]
        self.block_kwargs: list[list[dict]] = [[] for _ in self.blocks_list]   # [block][window slice]
        self.as_tuple = False
        self.cache: HiddenCache | None = None
        if (where := device_map_summary(model)) is not None:
            self.reporter.log(f"device map: {where}; each block runs on its execution device in turn")
        self._capture(placement.spill, placement.offload_dir)

    # -- phase 1: the first block's inputs
    @torch.inference_mode()
    def _capture(self, spill: str, spill_dir) -> None:
        dev = execution_device(self.outer, self.device)
        ways = ["tensor", "tuple", "first"]
        for s, e in self.slices:
            ids = self.windows[s:e].to(dev)
            for way in list(ways):
                try:
                    hidden, calls = self._arguments(ids, dev, way)
                except Exception:
                    if way == "first":
                        raise
                    ways.remove(way)            # this model's loop cannot pass that on: the next way, from now on
                    continue
                break
            if way == "first" and s == 0:
                self.reporter.log("the model's forward pass could not be followed through stand-ins for every "
                                  "block: every block gets the first block's arguments (exact unless its blocks "
                                  "differ in kind of attention)")
            for index, kwargs in enumerate(calls):
                self.block_kwargs[index].append(kwargs)
            if self.cache is None:  # sized from the first batch
                self.cache = self._make_cache((len(self.windows), *hidden.shape[1:]), hidden.dtype, spill, spill_dir)
            self.cache.put(s, e, hidden, into_next=False)

    def _arguments(self, ids: torch.Tensor, dev: torch.device, way: str) -> tuple[torch.Tensor, list[dict]]:
        """(block 0's hidden input, every block's keyword arguments) for the windows ``ids``.

        Stand-ins take the blocks' places and record what the model hands each; none runs a block, and the last one
        stops the pass (``_Captured``). Each passes its input on to the next as is (``way`` "tensor": the loops of
        ``h = layer(h)``) or as a 1-tuple (``"tuple"``: those of ``h = layer(h)[0]``, older transformers; the next
        stand-in unpacks it); ``"first"``: one stand-in for block 0 whose arguments every block gets (the pass goes
        on to the end with its input)."""
        records: list[tuple[torch.Tensor, dict]] = []
        last = len(self.blocks_list) - 1 if way != "first" else None

        def recorder(index: int):
            def record(module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                records.append((hidden, kwargs))
                if index == last:
                    raise _Captured
            return record

        blocks = self.blocks_list if way != "first" else self.blocks_list[:1]
        stand_ins = [_StandIn(b, as_tuple=way == "tuple") for b in blocks]
        handles = [s.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, s in enumerate(stand_ins)]
        try:
            with onloaded(self.outer, dev), _blocks_replaced(self.model, self.arch, *stand_ins):
                try:
                    self.model.base_model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
        finally:
            for h in handles:
                h.remove()
        if way == "first":
            return records[0][0], [records[0][1]] * len(self.blocks_list)
        if len(records) != len(self.blocks_list):
            raise RuntimeError(f"the model's forward pass reached {len(records)} of {len(self.blocks_list)} blocks")
        return records[0][0], [kwargs for _, kwargs in records]

    def _make_cache(self, shape, dtype, spill: str, spill_dir) -> HiddenCache:
        dev = execution_device(list(self.blocks_list[0].modules()), self.device)
        need = HiddenCache.nbytes(shape, dtype)
        free = available_bytes(dev)
        on_disk = to_disk(spill, need, free)
        where = (f"memory-mapped on disk ({spill_dir or tempfile.gettempdir()})" if on_disk
                 else f"kept on {dev}")
        self.reporter.log(f"cached block inputs: {human_bytes(need)} ({shape[0]} × {shape[1]} × {shape[2]}, in and out) "
                          f"{where}" + ("" if spill != "auto" else f"; {human_bytes(free)} free"))
        return HiddenCache(shape, dtype, dev if not on_disk else torch.device("cpu"), on_disk, spill_dir)

    def index(self, block: nn.Module) -> int:
        """The position of ``block`` among the model's blocks."""
        for i, b in enumerate(self.blocks_list):
            if b is block:
                return i
        raise ValueError("not one of this model's blocks")

    # -- phase 2: the blocks
    def blocks(self, label: str = "blocks") -> Iterator[tuple[int, nn.Module, torch.device]]:
        """(index, block, its device) for every block, the block onloaded while the loop body runs."""
        for index, block in enumerate(self.reporter.track(self.blocks_list, label, total=len(self.blocks_list))):
            dev = execution_device(list(block.modules()), self.device)
            with onloaded(list(block.modules()), dev):
                yield index, block, dev

    @torch.inference_mode()
    def run(self, block: nn.Module, device: torch.device, keep: bool = True,
            after_batch: Callable[[], None] | None = None,
            on_output: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """All cached hidden states through ``block``; with ``keep`` its outputs become the next inputs.
        ``on_output(inputs, outputs)`` sees each batch's hidden states before and after the block."""
        calls = self.block_kwargs[self.index(block)]
        same = calls and device == _kw_device(calls[0], device)
        for (s, e), kwargs in zip(self.slices, calls):
            x = self.cache.get(s, e).to(device)
            out = block(x, **(kwargs if same else move(kwargs, device)))
            if isinstance(out, (tuple, list)):
                self.as_tuple = True
            if on_output is not None:
                on_output(x, _hidden(out))
            if keep:
                self.cache.put(s, e, _hidden(out))
            if after_batch is not None:
                after_batch()
        if keep:
            self.cache.swap()

    # -- phase 3: the model's head on the last hidden states
    @contextmanager
    def head(self) -> Iterator[Callable[[int], torch.Tensor]]:
        """A function window-slice index → the model's output (logits) from the final hidden states."""
        current = {"i": 0}
        dev = execution_device(self.outer, self.device)
        stand_in = _StandIn(self.blocks_list[0],
                            replay=lambda: self.cache.get(*self.slices[current["i"]]).to(dev), as_tuple=self.as_tuple)

        def output(i: int):
            current["i"] = i
            s, e = self.slices[i]
            return self.model(input_ids=self.windows[s:e].to(dev), use_cache=False)

        with onloaded(self.outer, dev), _blocks_replaced(self.model, self.arch, stand_in):
            yield output

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _kw_device(kwargs: dict, default: torch.device) -> torch.device:
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
            return v[0].device
    return default


def device_map_summary(model: nn.Module) -> str | None:
    """``"3 modules on disk, 2 on cpu"`` for a model dispatched by accelerate, else None."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return None
    counts: dict[str, int] = {}
    for dev in placed.values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} module{'s' if n > 1 else ''} on {d}" for d, n in sorted(counts.items()))


# ------------------------------------------------------------------------------------------- loading
