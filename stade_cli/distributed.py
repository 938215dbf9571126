"""Several processes: what each rank does when stade runs under ``torchrun`` or ``accelerate launch``.

A launcher starts N copies of the same command and says so in the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). With ``WORLD_SIZE`` absent or 1 nothing here imports
``torch.distributed`` or starts anything: one process is one process.

The work splits where the math is a sum or a set of independent pieces:

* calibrate: the windows (sampled once, from the seed, identically on every rank) are cut into N contiguous
  shares; each rank accumulates its moments and Gram matrices; they are summed in float64 (``sum_``) and
  rank 0 writes the stats.
* prune from stats: each rank decides and writes its weight shards (``pick``: balanced by bytes) into rank 0's
  staging directory; rank 0 writes the index, config, tokenizer files and report and makes the one rename.
* eval: each rank scores its share of the windows; rank 0 sums the per-window NLLs in window order.

Every collective runs on CPU tensors over gloo, so the same code runs with or without GPUs. A failure on any
rank is told to all (``together``): every rank stops with the same error and no output is published.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .errors import Interrupted, StadeError, UsageError

T = TypeVar("T")
TIMEOUT = timedelta(hours=1)      # a rank waits this long for the others at a collective


class RankFailed(StadeError):
    """Another rank of the same run failed (its own error is on its stderr)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run; the default is a run of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ------------------------------------------------------------------ dividing the work (pure)
    def share(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of n items: sizes differ by at most one."""
        return share(n, self.rank, self.size)

    def windows(self, n: int) -> tuple[int, int]:
        """``share`` of n calibration windows, refused when some rank would get none."""
        if n < self.size:
            raise UsageError(f"{n} calibration windows cannot be shared by {self.size} ranks",
                             "ask for at least one window per rank (--nsamples), or launch fewer ranks")
        return self.share(n)

    def pick(self, sizes: Sequence[int]) -> list[int]:
        """Indices of the items (e.g. weight shards by bytes) this rank takes, in their original order."""
        return [i for i, r in enumerate(assign(sizes, self.size)) if r == self.rank]

    # ------------------------------------------------------------------ collectives (no-ops for one process)
    def sum_(self, tensor):
        """Sum ``tensor`` over the ranks in place (a CPU tensor; float64 for exact-enough sums)."""
        if self.several:
            import torch
            import torch.distributed as dist

            with _collective(self):
                buf = tensor.clone() if tensor.is_inference() else tensor
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not tensor:
                with torch.inference_mode():
                    tensor.copy_(buf)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (on every rank)."""
        if not self.several:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        with _collective(self):
            dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.several:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        with _collective(self):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None = None) -> None:
        """All ranks say whether their part failed; a rank whose part failed re-raises its own error, the others
        raise ``RankFailed`` naming the first rank that failed and why. Call it on every rank at the same point."""
        if not self.several:
            if error is not None:
                raise error
            return
        said = None if error is None else _one_line(error)
        failed = [(r, msg) for r, msg in enumerate(self.gather(said)) if msg is not None]
        if error is not None:
            raise error
        if failed:
            r, msg = failed[0]
            raise RankFailed(f"rank {r} of {self.size} failed: {msg}",
                             "its stderr has the details; nothing was written")

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run a part on every rank, then agree that every rank's part succeeded (``check``). No collective may
        run inside: a rank that fails early would meet the others at a different one."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted):
            raise            # the launcher signals every rank: each unwinds at once, no collective to meet at
        except BaseException as exc:
            self.check(exc)
            raise
        self.check(None)


    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others once it succeeded there (a download the others then find in
        the cache); a failure anywhere stops every rank."""
        result = None
        with self.together():
            if self.main:
                result = fn()
        if self.several:
            with self.together():
                if not self.main:
                    result = fn()
        return result


@contextmanager
def claimed(dest, world: World, inputs) -> Iterator[None]:
    """``with dest`` (an ``outputs.Output``: checked, locked, leftovers recovered) on rank 0 alone, with every
    rank learning whether it could: the other ranks never touch the output path."""
    with ExitStack() as stack:
        with world.together():
            if world.main:
                dest.check_inputs(inputs)
                stack.enter_context(dest)
        yield


@contextmanager
def staged(dest, world: World):
    """``dest.staging()`` (an ``outputs.Output``) on rank 0, its path told to every rank; it is published (rank 0) only when every rank's
    part succeeded, and all ranks learn whether publishing did."""
    if not world.several:
        with dest.staging() as tmp:
            yield tmp
        return
    stack = ExitStack()
    tmp = None
    with world.together():
        if world.main:
            tmp = stack.enter_context(dest.staging())
    try:
        yield Path(world.broadcast(str(tmp) if tmp is not None else None))
    except BaseException:
        if not stack.__exit__(*sys.exc_info()):
            raise
        return
    with world.together():
        stack.close()                            # rank 0: record, flush, rename


@contextmanager
def _collective(world: World) -> Iterator[None]:
    """Where a collective runs: outside inference mode, whose tensors gloo's own threads may not write into (torch
    2.2 refused with "Inplace update to inference tensor outside InferenceMode": a rank inside a pass decorated
    with ``torch.inference_mode`` could not agree with the others); a peer that died (killed, out of memory, a
    crash before it could say why) is a RankFailed that says so, and any other failure one that says it was here."""
    import torch

    try:
        with torch.inference_mode(False):
            yield
    except RuntimeError as exc:      # gloo: "Connection closed by peer", "Timed out waiting ..."
        said = re.sub(r"^\[[^\]]*\]\s*", "", _one_line(exc))[:100]      # gloo's source location dropped
        if _PEER_GONE.search(said):
            raise RankFailed(f"another of the {world.size} ranks stopped without saying why ({said})",
                             "it was killed or crashed: its stderr, or the launcher's log, tells which") from None
        # not a peer's death: this rank's own failure at the collective (e.g. torch 2.2's inference tensors)
        raise RankFailed(f"a collective with the other ranks failed on {world}: {said}",
                         "--debug shows where; if another rank was killed, its stderr or the launcher's log says so"
                         ) from exc


_PEER_GONE = re.compile(r"closed by peer|reset by peer|broken pipe|connection refused|timed out|timeout|"
                        r"end of file|\beof\b", re.IGNORECASE)


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign(sizes: Sequence[int], size: int) -> list[int]:
    """The rank of each item: largest first onto the least-loaded rank (ties: the lower rank), deterministic."""
    load = [0] * size
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text and text[0] else type(error).__name__


def one_process(what: str, hint: str = "run it without torchrun/accelerate launch, or launch calibrate, prune and "
                                         "eval themselves") -> None:
    """``what`` runs in one process: refused under a launcher, before any work (every rank would claim the same
    output, or run the same whole job)."""
    world = launched()
    if world.several:
        raise UsageError(f"{what} runs in one process, not as {world.size} ranks", hint)


def launched(env: dict | None = None) -> World:
    """The World a launcher described in the environment (``WORLD_SIZE`` > 1), else a run of one."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return World()
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise StadeError("WORLD_SIZE is set but RANK is missing or not a number",
                         "launch with torchrun or accelerate launch, or unset WORLD_SIZE") from None
    if not 0 <= rank < size:
        raise StadeError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank, size, local)


_CURRENT: World | None = None


def current() -> World:
    """This process's World; under a launcher the process group is started (gloo) on first use."""
    global _CURRENT
    if _CURRENT is None:
        world = launched()
        if world.several:
            _start(world)
        _CURRENT = world
    return _CURRENT


def _start(world: World) -> None:
    import atexit

    import torch.distributed as dist

    import torch

    if torch.cuda.is_available():     # libraries that use "the current device" use this rank's GPU
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=world.rank, world_size=world.size,
                                timeout=TIMEOUT)
        atexit.register(_stop)


def _stop() -> None:  # pragma: no cover - at interpreter exit
    """The process group of a run that did not leave through ``leave`` (the library under a launcher)."""
    import torch.distributed as dist

    if dist.is_initialized():
        _meet(dist)
        dist.destroy_process_group()


def leave(code: int) -> None:
    """Under a launcher, end this process with ``code`` once every rank is done, without destroying the process
    group: under torch 2.2 ``destroy_process_group`` could deadlock in gloo, holding the interpreter's lock, after
    the work was done and the output written (3 of 6 two-rank prunes without a barrier before it, still 2 of 40
    two-rank calibrations with one), and so could the group's teardown at the interpreter's exit. What that exit
    would run (``atexit``: e.g. an offload folder's removal) runs first, then the process ends at once. One process
    returns: the normal exit follows."""
    dist = sys.modules.get("torch.distributed")     # one process never imports it for this
    if dist is None or not dist.is_initialized():
        return
    import atexit

    _meet(dist)
    atexit.unregister(_stop)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _meet(dist) -> None:
    """Every rank at its exit waits for the others, so that none leaves while another still needs it; a rank
    stopped by a signal does not (the others may be inside a collective it will not join), and a rank already
    gone makes the barrier fail at once."""
    from .errors import signal_received

    if signal_received() is None:
        try:
            dist.barrier()
        except Exception:       # noqa: BLE001 - leaving anyway
            pass
