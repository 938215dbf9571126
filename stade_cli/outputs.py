"""Outputs that never lose a user's data: only stade's own outputs are replaced, atomically, by one writer.

The rules (the README's "Errors and exit codes" says the same for users):

* **Ownership.** Every output directory stade writes (a pruned checkpoint, a stats directory, the demo's
  model) holds ``.stade-output.json``: its kind and the size and modification time (ns) of every file and
  the name of every folder in it, recorded once everything else was written. A directory is *stade's own*
  when that record is there, names the same kind, and the directory holds exactly what it lists, unchanged.
  A stray ``stade_report.json`` or ``manifest.json`` proves nothing; a file a user added, edited or
  re-saved (``save_pretrained`` over the same names) makes the directory the user's.
* **What ``force`` replaces**: an empty directory, or stade's own output of the same kind. Nothing else,
  and never an input of the run, the current directory or the home directory (nor what contains them).
* **Atomic replacement.** The new output is written in a staging directory beside the target,
  ``.NAME.stade-new-PID``, flushed to disk (fsync), recorded, and put in place by one rename; an earlier
  output is swapped with it in one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux,
  ``renamex_np(RENAME_SWAP)`` on macOS) and only then removed. Where the file system cannot exchange, the
  old output is first renamed to ``.NAME.stade-old-PID``; a run killed between the two renames leaves it
  there and the next run puts it back. Removal deletes the record last, so a half-removed leftover is
  still recognised.
* **One writer.** ``.NAME.stade-lock`` beside the target is held with ``flock`` (released by the kernel
  when a process dies, so a crash never leaves it held) from before the first expensive step to the end.
  A second run fails at once and names the first one's pid. Leftovers of killed runs are handled while
  holding the lock (so their writers are surely gone), and the log says what was done with each.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ._version import __version__
from .errors import OutputError, UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: an O_EXCL lock file with a liveness check instead
    fcntl = None

MARKER = ".stade-output.json"
STAGING_MARKER = ".stade-staging.json"
FORMAT = "stade-output"
FORMAT_VERSION = 1
KINDS = {"checkpoint": "a pruned checkpoint", "stats": "a stats directory", "model": "a model built by stade demo",
         "sweep": "the results of stade sweep"}
_NEW, _OLD, _LOCK = "stade-new", "stade-old", "stade-lock"


def staging_name(name: str, pid: int | None = None) -> str:
    return f".{name}.{_NEW}-{os.getpid() if pid is None else pid}"


def aside_name(name: str, pid: int | None = None) -> str:
    return f".{name}.{_OLD}-{os.getpid() if pid is None else pid}"


def lock_name(name: str) -> str:
    return f".{name}.{_LOCK}"


# ------------------------------------------------------------------------------------- ownership record
def inventory(root: Path) -> tuple[dict[str, list[int]], list[str], list[str]]:
    """(regular files → [size, mtime_ns], folders, anything else) under ``root``, as relative paths.

    Symbolic links are never followed: a link (to a file or a folder) lands in the third list.
    """
    files: dict[str, list[int]] = {}
    dirs: list[str] = []
    other: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for d in list(dirnames):
            rel = (base / d).relative_to(root).as_posix()
            if (base / d).is_symlink():
                other.append(rel)
                dirnames.remove(d)
            else:
                dirs.append(rel)
        for f in filenames:
            p = base / f
            rel = p.relative_to(root).as_posix()
            if rel in (MARKER, STAGING_MARKER):
                continue
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                files[rel] = [st.st_size, st.st_mtime_ns]
            else:
                other.append(rel)
    return files, sorted(dirs), sorted(other)


def read_marker(path: Path, name: str = MARKER) -> dict | None:
    """The JSON record ``name`` inside ``path``, or None when it is absent, not a regular file or not ours."""
    p = Path(path) / name
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return None
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def is_or_holds(outer: Path, inner: Path) -> bool:
    """Whether the resolved path ``outer`` is ``inner`` or a folder above it (``inner`` resolved too)."""
    return outer == inner or outer in inner.parents


def relation(a: Path, b: Path) -> str | None:
    """How the resolved path ``a`` stands to ``b``, in words: "is", "holds", "is inside", or None (apart)."""
    return "is" if a == b else "holds" if a in b.parents else "is inside" if b in a.parents else None


def _names(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def foreign(path: Path, kind: str) -> str | None:
    """None when ``path`` is an empty directory or stade's own unchanged output of ``kind``; else why not."""
    path = Path(path)
    try:
        entries = sorted(e.name for e in path.iterdir())
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if not entries:
        return None
    record = read_marker(path)
    if record is None:
        return f"it holds {_names(entries)}, but no record that stade wrote it"
    if record.get("kind") != kind:
        what = KINDS.get(record.get("kind"), f"a stade output of kind {record.get('kind')!r}")
        return f"it is {what}, not {KINDS[kind]}"
    files, dirs, other = inventory(path)
    listed = record.get("files") or {}
    extra = sorted(set(files) - set(listed)) + other + sorted(set(dirs) - set(record.get("dirs") or []))
    if extra:
        return f"it holds {_names(extra)}, which stade did not write"
    changed = sorted(f for f, seen in files.items() if list(listed[f]) != seen)
    if changed:
        return f"{_names(changed)} changed since stade wrote it"
    return None


def _write_marker(root: Path, kind: str) -> None:
    files, dirs, other = inventory(root)
    if other:  # stade itself never writes links or special files
        raise OutputError(f"the new output holds {_names(other)}, which is not a regular file")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "tool": "stade",
              "tool_version": __version__,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "pid": os.getpid(), "dirs": dirs, "files": files}
    part = root / (MARKER + ".part")       # written whole, then renamed: a kill leaves no torn record
    part.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(part, root / MARKER)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Within it, SIGINT, SIGTERM and SIGHUP wait: each one that comes is noted and its handler runs when it ends,
    for steps that must not be split, such as the two renames of a swap. The handlers are swapped rather than the
    signals masked: in a process with other threads (torch's) the OS may hand a signal to any of them, while
    Python always runs its handlers in the main thread. Outside the main thread, as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    before = {n: signal.getsignal(n) for n in numbers}
    came: list[int] = []
    for n in numbers:
        if before[n] not in (signal.SIG_IGN, None):        # what was ignored stays ignored
            signal.signal(n, lambda number, frame: came.append(number))
    try:
        yield
    finally:
        for n in numbers:
            if before[n] is not None:
                signal.signal(n, before[n])
        if came:                    # the first that came, as it would have been handled
            handler = before[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(came[0])


# ------------------------------------------------------------------------------------ inputs unchanged
OFFLOAD = "the offload directory"       # a run input (``check_inputs``) that the run itself writes in


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    if stat.S_ISDIR(st.st_mode):            # a folder is the same folder while its inode is
        return st.st_dev, st.st_ino, 0, 0
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def snapshot(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """What says that ``path`` (a file, or a folder and every file under it, links followed to what they name, as a
    hub cache's are) is the same later: each one's device, inode, size and modification time, by relative path
    ("." for ``path`` itself: a folder replaced by another run's ``--force`` is another folder)."""
    seen = {".": _identity(os.stat(path))}
    if path.is_dir():
        for dirpath, _, filenames in os.walk(path):
            for f in filenames:
                p = Path(dirpath) / f
                try:
                    seen[p.relative_to(path).as_posix()] = _identity(os.stat(p))
                except OSError:         # a dangling link, a file gone already: nothing a run could read
                    continue
    return seen


def changed_since(path: Path, before: dict[str, tuple[int, int, int, int]]) -> str | None:
    """How ``path`` differs from its ``snapshot`` ``before`` (files added since do not count: the run did not read
    them), or None."""
    for rel, was in before.items():
        try:
            now = _identity(os.stat(path if rel == "." else path / rel))
        except OSError:
            return f"{rel} is gone" if rel != "." else "it is gone"
        if now != was:
            return "it was replaced" if rel == "." else f"{rel} was rewritten"
    return None


# ------------------------------------------------------------------------------------------ scratch
def _host() -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname()) or "host"


def scratch_dir(what: str, base: str | Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """A new temp folder of this run's (``stade-WHAT-HOST-PID-xxxxxxxx``, in ``base`` or the system's temp dir),
    after removing those that killed runs of this host left in the same place (SIGKILL, the OOM killer: no
    ``finally`` ran; at 70B such a folder holds hundreds of GB). A folder is removed only when its host is this one
    and its pid is no longer alive, so a live run's, or another host's on a shared disk, is never touched."""
    base = Path(base).expanduser() if base is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    host = _host()
    pattern = re.compile(rf"^stade-[a-z]+-{re.escape(host)}-(\d+)-[^-]+$")
    for entry in sorted(base.iterdir()):
        found = pattern.match(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(found.group(1))
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            if log is not None:
                log(f"removed {entry}, left by a killed stade run (pid {pid})")
    return Path(tempfile.mkdtemp(prefix=f"stade-{what}-{host}-{os.getpid()}-", dir=base))


# -------------------------------------------------------------------------------------- file system
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory; the data files still were
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


_WRITEBACK = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written byte range to the disk, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere). The fsync before the output is put in
    place then finds most of the data already on the disk, so the flush overlaps the work instead of
    following it."""
    global _WRITEBACK
    if _WRITEBACK is None:
        libc = _libc() if sys.platform.startswith("linux") else None
        fn = getattr(libc, "sync_file_range", None) if libc is not None else None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _WRITEBACK = fn or False
    if _WRITEBACK:
        _WRITEBACK(fd, offset, nbytes, 2)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to the disk (so a rename after it survives power loss)."""
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            _fsync(Path(dirpath) / f)
    for dirpath, _, _ in os.walk(root, topdown=False):
        _fsync(Path(dirpath))


def remove_tree(root: Path) -> None:
    """Remove ``root`` (a stade output or staging dir) with its ownership records last.

    Interrupted half-way, what is left still carries its record, so the next run recognises it.
    """
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        base = Path(dirpath)
        for f in filenames:
            if base == root and f in (MARKER, STAGING_MARKER):
                continue
            (base / f).unlink(missing_ok=True)
        for d in dirnames:
            p = base / d
            p.unlink() if p.is_symlink() else p.rmdir()
    for m in (MARKER, STAGING_MARKER):
        (root / m).unlink(missing_ok=True)
    root.rmdir()


_AT_FDCWD = -100


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def _rename_flags(src: Path, dst: Path, linux_flag: int, mac_flag: int) -> bool | None:
    """A rename with flags: True done, None when this system or file system cannot do it (errors raise)."""
    libc = _libc()
    if libc is None:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), linux_flag)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), mac_flag)
    else:
        return None
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step; False where the system or file system cannot."""
    return _rename_flags(a, b, 2, 0x2) is True          # RENAME_EXCHANGE / RENAME_SWAP


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing (FileExistsError) if ``dst`` exists, even if created just now."""
    if _rename_flags(src, dst, 1, 0x4) is None:          # RENAME_NOREPLACE / RENAME_EXCL
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _missing_parents(path: Path) -> tuple[Path, list[Path]]:
    """(the nearest folder of ``path`` that exists, the folders below it that do not, nearest first)."""
    missing = []
    probe = path.parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    return probe, missing


def check_space(out: Path, needed: int) -> None:
    """Fail before writing when the disk that will hold ``out`` has less than ``needed`` bytes free."""
    probe, _ = _missing_parents(Path(out).expanduser().absolute())
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OutputError(f"not enough disk space for {out}: {needed:,} bytes needed, {free:,} free")


# ------------------------------------------------------------------------------------------ Output
class Output:
    """One output directory of one run.

    ``with Output(path, kind, force) as out:`` checks the path, takes the lock and recovers what killed
    runs left (before any expensive work); ``out.check_inputs({...})`` refuses the run's inputs as the
    output; ``with out.staging() as tmp:`` yields the directory to write into and, when the block
    succeeds, records, flushes and puts it in place. Anything else (an error, Ctrl-C, SIGTERM) removes
    the staging directory, and the earlier output at the path stays as it was.
    """

    def __init__(self, path: str | Path, kind: str, force: bool = False, log: Callable[[str], None] | None = None,
                 says_replaced: bool = True):
        if kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.given = str(path)
        self.path = Path(os.path.abspath(Path(path).expanduser()))   # absolute; the leaf itself not resolved
        self.kind, self.force = kind, force
        self.log = log or (lambda message: None)
        self.says_replaced = says_replaced      # False: the caller says what changed (eval --record amends it)
        self.published = False
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._made: list[Path] = []
        self._trash: Path | None = None
        self._inputs: list[tuple[str, str, Path, dict]] = []    # (label, as given, resolved, ``snapshot``)

    # ---------------------------------------------------------------- claim
    def __enter__(self) -> "Output":
        self._check_path()
        try:
            self._lock()
            self._recover()
            self._check_existing()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _check_path(self) -> None:
        p, given = self.path, self.given
        if p.is_symlink():
            raise OutputError(f"output {given} is a symbolic link (to {os.readlink(p)})",
                              "give a real directory path; stade does not write through links")
        if p.exists() and not p.is_dir():
            raise OutputError(f"output {given} is a file", "choose a directory path")
        real = p.resolve()
        for place, what in ((Path.cwd(), "the current directory"), (Path.home(), "your home directory")):
            place = place.resolve()
            if is_or_holds(real, place):
                raise UsageError(f"output {given} is {'' if place == real else 'a folder holding '}{what}",
                                 "choose a new directory for the output")
        probe, _ = _missing_parents(p)
        if not probe.is_dir():
            raise OutputError(f"{probe} is a file, not a directory")
        try:  # the real test (permission bits do not bind root, read-only mounts do not show in them)
            os.rmdir(tempfile.mkdtemp(prefix=".stade-probe-", dir=probe))
        except OSError as exc:
            raise OutputError(f"cannot write to {probe}: {exc.strerror or exc}") from None

    def _lock(self) -> None:
        parent = self.path.parent
        _, missing = _missing_parents(self.path)
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"cannot create {d}: {exc.strerror}") from None
            self._made.append(d)
        lock = parent / lock_name(self.path.name)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:  # no fcntl (Windows): a lock file whose writer may be dead
                holder = _read_pid(lock)
                if holder is not None and not _alive(holder):
                    lock.unlink(missing_ok=True)
                    continue
                self._busy(holder)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {lock}: {exc.strerror}") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _read_pid(lock)
                    os.close(fd)
                    self._busy(holder)
                try:  # its last holder may have removed the file between our open and our lock
                    same = os.fstat(fd).st_ino == os.stat(lock).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._lock_fd, self._lock_path = fd, lock
            return

    def _busy(self, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "another process"
        raise OutputError(f"another stade run ({who}) is writing {self.given}",
                          "wait for it to finish, or choose another output path")

    def _recover(self) -> None:
        """Deal with what killed runs left beside the target (we hold the lock: their writers are gone)."""
        parent, name = self.path.parent, self.path.name
        prefixes = {f".{name}.{_NEW}-": "new", f".{name}.{_OLD}-": "old"}
        for entry in sorted(parent.iterdir()):
            role = next((r for pre, r in prefixes.items() if entry.name.startswith(pre)), None)
            if role is None or entry.is_symlink() or not entry.is_dir():
                continue
            pid = entry.name.rsplit("-", 1)[-1]
            record, staging = read_marker(entry), read_marker(entry, STAGING_MARKER)
            if record is None and staging is None and any(entry.iterdir()):
                continue  # not something stade made: leave it
            if role == "old" and record is not None and not os.path.lexists(self.path):
                os.rename(entry, self.path)
                self.log(f"restored {self.given}: a killed run (pid {pid}) had moved the earlier output aside")
                continue
            remove_tree(entry)
            # a complete record written by another pid than the folder's: the earlier output, swapped out
            earlier = record is not None and (role == "old" or str(record.get("pid")) != pid)
            what = "the earlier output, which it had replaced" if earlier else "an output it did not finish"
            self.log(f"removed {entry.name} beside {self.given}, left by a killed run (pid {pid}): {what}")

    def _check_existing(self) -> None:
        if not os.path.lexists(self.path):
            return
        if os.path.ismount(self.path):      # an output is replaced by a rename, which a mount point refuses
            raise OutputError(f"output {self.given} is a mount point, which stade cannot replace (it puts an output "
                              "in place by renaming a folder)", f"choose a folder inside it, such as "
                              f"{self.path / 'out'}")
        reason = foreign(self.path, self.kind)
        if reason is None and self.force:
            return
        if reason is None:
            raise OutputError(f"output directory {self.given} already exists",
                              "pass --force (force=True from Python) to replace it")
        raise OutputError(f"{'refusing to replace' if self.force else 'output directory'} {self.given}"
                          f"{'' if self.force else ' already exists and'}: {reason}; --force replaces only an "
                          f"empty directory or {KINDS[self.kind]} that stade wrote",
                          "choose another path, or move or remove it yourself")

    def check_inputs(self, inputs: Iterable[tuple[str, "str | Path | None"]]) -> None:
        """Refuse when the output is, holds, or lies inside one of the run's inputs ((label, path) pairs; paths
        compared resolved, so a symbolic link or a relative path such as ``.`` is seen for what it names). Inside a
        model, stats or data folder, an output would become part of that input: read by the next run that reads
        the folder, uploaded with the model, and counted as a stranger's file by ``--force`` on the folder."""
        out = self.path.resolve()
        inputs = list(inputs)
        for label, value in inputs:
            if value is None or not str(value):
                continue
            real = Path(value).expanduser().resolve()
            if label != OFFLOAD and real.exists():
                self._inputs.append((label, str(value), real, snapshot(real)))
            if is_or_holds(out, real):
                how = "is" if real == out else "holds"
                raise UsageError(f"output {self.given} {how} {label} ({value}), an input of this run",
                                 "choose another output path: stade never writes over its inputs")
            if real.is_dir() and is_or_holds(real, out):
                raise UsageError(f"output {self.given} is inside {label} ({value}), an input of this run",
                                 f"choose a path outside it, such as {real.parent / (real.name + '-' + out.name)}: stade "
                                 "never writes into its inputs")
        offload = [Path(v).expanduser().resolve() for label, v in inputs if label == OFFLOAD and v]
        for place in offload:       # the run writes its temp folders there: never into what it reads
            for label, value in inputs:
                if label == OFFLOAD or value is None or not str(value):
                    continue
                how = relation(place, Path(value).expanduser().resolve())
                if how is not None:
                    raise UsageError(f"--offload-dir {place} {how} {label} ({value}), which this run reads",
                                     "choose an offload directory apart from the model, the stats and the data")

    def release(self) -> None:
        if self._trash is not None:
            remove_tree(self._trash)
            self._trash = None
        if self._lock_fd is not None:
            if self._lock_path is not None:
                self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.published:
            for d in reversed(self._made):  # folders made for the output, when nothing was put in them
                try:
                    d.rmdir()
                except OSError:
                    break
        self._made = []

    # ---------------------------------------------------------------- write
    @contextmanager
    def staging(self) -> Iterator[Path]:
        if self._lock_fd is None:
            raise RuntimeError("Output.staging() outside `with Output(...)`")
        tmp = self.path.parent / staging_name(self.path.name)
        try:
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {tmp}: {exc.strerror}") from None
        self._trash = tmp
        (tmp / STAGING_MARKER).write_text(json.dumps(
            {"format": FORMAT, "kind": self.kind, "pid": os.getpid(), "host": socket.gethostname(),
             "target": str(self.path)}) + "\n")
        try:
            yield tmp
            self._publish(tmp)
        finally:
            if self._trash is not None:     # the unfinished output, or the earlier one once swapped out
                remove_tree(self._trash)
                self._trash = None

    def _said_replaced(self) -> None:
        if self.says_replaced:
            self.log(f"replaced the earlier output at {self.given}")

    def _check_inputs_unchanged(self) -> None:
        """Refuse to publish what was made from an input that changed while the run read it (another run's
        ``--force`` replaced it, or its files were rewritten): the output would mix the two."""
        for label, given, real, before in self._inputs:
            what = changed_since(real, before)
            if what:
                raise OutputError(f"{label} ({given}) changed while this run was reading it ({what}), so its output "
                                  f"could mix the old and the new; nothing was written to {self.given}",
                                  "run again once whatever changed it has finished")

    def _publish(self, tmp: Path) -> None:
        _write_marker(tmp, self.kind)       # the record before the staging marker goes: a killed run's folder
        (tmp / STAGING_MARKER).unlink()     # always holds one of the two, so the next run knows it for stade's
        fsync_tree(tmp)
        self._check_inputs_unchanged()      # last, before the output is put in place
        if os.path.lexists(self.path):
            reason = foreign(self.path, self.kind) if not self.path.is_symlink() else "it became a link"
            if reason is not None or not self.force:
                raise OutputError(f"{self.given} changed while this run was writing"
                                  f"{': ' + reason if reason else ''}; it was left as it is",
                                  "choose another path, or move it yourself and run again")
            if exchange(tmp, self.path):
                self._said_replaced()
            else:  # two renames, which a signal cannot split; a kill between them is undone by the next run
                aside = self.path.parent / aside_name(self.path.name)      # (see _recover)
                with _signals_held():
                    os.rename(self.path, aside)
                    try:
                        os.rename(tmp, self.path)
                    except BaseException:
                        os.rename(aside, self.path)
                        raise
                    self._trash = aside
                    self.published = True
                self._said_replaced()
        else:
            try:
                rename_noreplace(tmp, self.path)
            except FileExistsError:
                raise OutputError(f"{self.given} appeared while this run was writing; it was left as it is",
                                  "choose another path") from None
            self._trash = None
        self.published = True
        _fsync(self.path.parent)


def _read_pid(path: Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def remove_output(path: str | Path, kind: str) -> bool:
    """Remove ``path`` if it is stade's own output of ``kind`` (True); leave anything else (False)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or read_marker(path) is None or foreign(path, kind) is not None:
        return False
    with Output(path, kind, force=True):
        trash = path.parent / staging_name(path.name)   # interrupted, the next run removes the rest
        os.rename(path, trash)
        remove_tree(trash)
    return True


def check_file(path: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse a path that exists and is not a regular file for which ``ours`` holds."""
    if path.is_symlink() or (path.exists() and not (path.is_file() and ours(path))):
        raise OutputError(f"{path} exists and is not {what}", "choose another path, or move it yourself")


def replace_file(path: str | Path, data: str | bytes, ours: Callable[[Path], bool], what: str) -> None:
    """Write one results file atomically (a temp file beside it, flushed, then renamed over it), and only
    over a file for which ``ours(path)`` holds (e.g. a JSON with the writer's own structure)."""
    path = Path(path).expanduser()
    check_file(path, ours, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """``ours`` for replace_file: the file is a JSON object that has all of ``keys``."""
    def ours(path: Path) -> bool:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)
    return ours


def amend(out: Output, changes: dict[str, str]) -> None:
    """Replace some top-level files of ``out``'s existing output (held: ``with Output(path, kind, force=True)``)
    in one atomic step: a staging copy (hard links: no data is copied where the file system has them) with the
    ``changes`` (file name → new text) written fresh, recorded and exchanged with the output. Interrupted, the
    output stays as it was; completed, it is still stade's own."""
    src = out.path
    with out.staging() as tmp:
        for entry in sorted(src.iterdir()):
            if entry.name in (MARKER, STAGING_MARKER) or entry.name in changes:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, tmp / entry.name)
        for name, text in changes.items():      # new files: a hard-linked one would change the output too
            (tmp / name).write_text(text, encoding="utf-8")


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
