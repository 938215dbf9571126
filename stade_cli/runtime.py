"""Devices, dtypes and progress reporting: the run-time context handed down explicitly (no globals)."""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    import torch

from .errors import DeviceError, UsageError

T = TypeVar("T")

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(spec: "str | torch.device | None" = "auto") -> "torch.device":
    """``auto`` → cuda when available (under a launcher, cuda:LOCAL_RANK), else cpu. An explicit cuda without a
    GPU is an error."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from .distributed import launched

        world = launched()      # under a launcher, each rank of a node takes its own GPU
        return torch.device("cuda", world.local_rank % torch.cuda.device_count()) if world.several else torch.device("cuda")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device '{spec}'", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("--device mps was asked for but this machine has no Apple GPU (MPS) that torch can use",
                              "use --device cpu or auto")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{spec}'", "use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(spec: str | None, checkpoint_dtype: "torch.dtype | None", device: "torch.device") -> "torch.dtype":
    """``auto`` → the checkpoint's dtype, except float16/bfloat16 on the CPU run in float32 (CPU half matmuls are slow)."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        dtype = checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else torch.float32
        if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return dtype
    if spec not in DTYPES:
        raise UsageError(f"unknown dtype '{spec}'", f"choose one of auto, {', '.join(sorted(set(DTYPES)))}")
    return getattr(torch, DTYPES[spec])


def fast_bfloat16(device: "torch.device") -> bool:
    """Whether bfloat16 matrix products are faster than float32 ones on ``device``: CUDA with bfloat16 support,
    or a CPU with AMX tiles or AVX512-BF16 (elsewhere the CPU converts to float32 and it is slower)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(bool(p()) for p in probes if p is not None)
    return False


PRODUCTS = ("auto", "float32", "bfloat16")      # the precisions of --admm-precision and --refine-precision


def product_name(spec: str) -> str:
    """A matrix-product precision as one of ``PRODUCTS`` (--dtype's spellings bf16 and fp32 accepted); anything else
    is returned as given, for the caller's check to refuse."""
    name = spec.strip().lower()
    return DTYPES.get(name, name)


def product_dtype(spec: str, device: "torch.device") -> "torch.dtype":
    """The dtype of matrix products for the precision ``spec`` (one of ``PRODUCTS``, checked by the caller):
    ``auto`` is bfloat16 where ``fast_bfloat16(device)``, else float32."""
    import torch

    name = product_name(spec)
    if name == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    return getattr(torch, name)


def decision_workers(device: "torch.device") -> int:
    """How many layers are decided at once: one per core on the CPU (up to 4; each with one intra-op thread, see
    ``one_thread_per_worker``), two on an accelerator (one prepares while the other computes)."""
    import torch

    return 2 if device.type != "cpu" else max(1, min(4, torch.get_num_threads()))


@contextmanager
def worker_pool(workers: int):
    """A pool of ``workers`` threads for deciding layers. On success it is shut down as usual; on any failure or
    interrupt the queued layers are cancelled and nobody waits for the ones being solved (a layer of sparsegpt at
    70B width takes minutes): the caller's cleanup runs at once, and the CLI ends the process without joining the
    workers (``cli.app.main``)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="stade-prune")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextmanager
def one_thread_per_worker(device: "torch.device", workers: int):
    """On the CPU a pool of ``workers`` already keeps every core busy: torch's own intra-op threads would
    oversubscribe them, so within this context they are one per worker (and as many as before after it)."""
    if device.type != "cpu" or workers < 2:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fits(need: int, free: int) -> bool:
    """The rule of every memory-or-elsewhere choice (loading the model whole, keeping hidden states or refined
    weights in memory): ``need`` bytes stay when they take at most half of the ``free`` ones."""
    return need <= free // 2


def to_disk(spill: str, need: int, free: int) -> bool:
    """``--spill``: ``disk`` always, ``device`` never, ``auto`` where ``need`` does not ``fits`` in ``free``."""
    return spill == "disk" or (spill == "auto" and not fits(need, free))


def available_bytes(device: "torch.device") -> int:
    """Free memory on ``device``: CUDA's free memory, or the RAM the kernel reports as available."""
    import os

    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


def human_bytes(n: float) -> str:
    """A size as people read it: 640.0 KiB, 1.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


class Reporter:
    """Logs and progress for long runs. The base class is silent; the CLI passes one that draws on stderr."""

    def log(self, message: str) -> None:  # pragma: no cover - trivial
        pass

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    @contextmanager
    def task(self, description: str, total: float | None = None):
        """A manually advanced task: ``with r.task("writing", total=nbytes) as advance: advance(n)``."""
        yield lambda n=1: None


class Heartbeat:
    """Progress as plain lines where there are no bars (stderr is a file or a pipe): at most one line every
    ``interval`` seconds, "pruning: 45% (12 s elapsed, about 15 s left)", and one when the work is done."""

    def __init__(self, log, description: str, total: float | None, interval: float):
        import time

        self.log, self.description, self.total, self.interval = log, description, total, interval
        self.clock = time.monotonic
        self.start = self.last = self.clock()
        self.done = 0.0
        self.said: float | None = None          # how much was done at the last line said

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last, self.said = now, self.done
            self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if not self.total:
            return f"{self.description}: {self.done:g} done ({elapsed:.0f} s elapsed)"
        frac = min(self.done / self.total, 1.0)
        left = f", about {elapsed * (1 - frac) / frac:.0f} s left" if 0 < frac < 1 else ""
        return f"{self.description}: {frac:.0%} ({elapsed:.0f} s elapsed{left})"

    def finish(self) -> None:
        # short steps stay silent (their log line says enough), and the last line is not said twice
        if self.clock() - self.start >= self.interval and self.said != self.done:
            self.log(self.line(self.clock()))


class StderrReporter(Reporter):
    """Rich progress bars with ETA on stderr when it is a terminal; elsewhere (a log file, CI, a pipe) a calm
    heartbeat line every ``heartbeat`` seconds. ``quiet`` silences both."""

    def __init__(self, quiet: bool = False, heartbeat: float = 30.0):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)
        self.bars = not quiet and sys.stderr.isatty()
        self.heartbeat = heartbeat
        self._live = None           # the bars on screen: a task started within another joins them (``_bars``)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)

    @contextmanager
    def _bars(self, description: str, total: float | None):
        """A bar for ``description`` (yields its advance function): on the bars already on screen where a task or
        a loop is running (a block's steps within the loop over blocks; rich before 14 allows one live display at
        a time), removed when it ends; else on a new display of its own."""
        owner = self._live is None
        with self._progress() if owner else nullcontext(self._live) as progress:
            self._live = progress
            task_id = progress.add_task(description, total=total)
            try:
                yield lambda n=1: progress.advance(task_id, n)
            finally:
                if owner:
                    self._live = None
                else:
                    progress.remove_task(task_id)

    def track(self, items, description, total=None):
        if not self.bars:
            if self.quiet:
                yield from items
                return
            beat = Heartbeat(self.log, description, total, self.heartbeat)
            for item in items:
                yield item
                beat.advance()
            beat.finish()
            return
        if total is None:
            try:
                total = len(items)
            except TypeError:
                pass
        with self._bars(description, total) as advance:
            for item in items:
                yield item
                advance()

    @contextmanager
    def task(self, description, total=None):
        if not self.bars:
            if self.quiet:
                yield lambda n=1: None
                return
            beat = Heartbeat(self.log, description, total, self.heartbeat)
            yield beat.advance
            beat.finish()
            return
        with self._bars(description, total) as advance:
            yield advance


def silence_transformers() -> None:
    """transformers' own progress bars and warnings would clutter stderr; our Reporter speaks for us."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # accelerate's "Some parameters are on the meta device because they were offloaded": the log says where
    # the blocks went in stade's own words (``blockwise.device_map_summary``)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
