"""A user's data is never lost: what --force replaces, inputs never outputs, atomic replacement under real
signals, one writer per output, calibrate the same way.

Processes are real (the installed CLI in a subprocess) and so are the signals. A writer is held mid-write
by a wrapper that patches the shard and stats writers: after its Nth write it creates a "ready" file and
waits for a "go" file, so every signal lands mid-write, and no test decides anything on the clock.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stade_cli.cli.app import app
from stade_cli.outputs import MARKER, Output, aside_name, foreign, lock_name, remove_output, staging_name

runner = CliRunner()
DEADLINE = 240  # seconds; generous, only for a run that hangs

HOLD = r"""
import os, sys, time
from pathlib import Path
ready, go, after = os.environ["STADE_TEST_READY"], os.environ["STADE_TEST_GO"], int(os.environ["STADE_TEST_AFTER"])
count = 0

def hold():
    global count
    count += 1
    if count == after:
        Path(ready).write_text(str(os.getpid()))
        while not os.path.exists(go):
            time.sleep(0.01)

import stade_cli.checkpoint as checkpoint
import stade_cli.calibration.store as store
for name in ("write", "copy"):
    def patched(self, *a, _real=getattr(checkpoint.ShardWriter, name), **k):
        hold()
        return _real(self, *a, **k)
    setattr(checkpoint.ShardWriter, name, patched)
_save = store.save_file
def save_file(*a, **k):
    hold()
    return _save(*a, **k)
store.save_file = save_file
from stade_cli.cli.app import main
main(sys.argv[1:])
"""


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) → sha256 of its bytes."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(*args, code=1, contains=()):
    result = invoke(*args)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


class Held:
    """A stade CLI process held after its Nth write until released."""

    def __init__(self, tmp: Path, args, after: int = 3, tag: str = "a", cwd=None):
        self.ready, self.go = tmp / f"ready-{tag}", tmp / f"go-{tag}"
        env = dict(os.environ, STADE_TEST_READY=str(self.ready), STADE_TEST_GO=str(self.go),
                   STADE_TEST_AFTER=str(after))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def wait_ready(self):
        deadline = time.monotonic() + DEADLINE
        while not self.ready.exists():
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run never reached its hold point"
            time.sleep(0.01)
        return self

    def release(self):
        self.go.write_text("go")
        return self

    def finish(self):
        out, err = self.proc.communicate(timeout=DEADLINE)
        return self.proc.returncode, out, err


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stade_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=DEADLINE, cwd=cwd)


@pytest.fixture(scope="module")
def stats(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "stats"
    assert invoke("calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", "2",
                  "--seqlen", "16").exit_code == 0
    return out


@pytest.fixture
def pruned(tiny_llama, stats, tmp_path):
    """An earlier output of stade at tmp/out (magnitude), to be replaced."""
    out = tmp_path / "out"
    assert invoke("prune", tiny_llama, "--metric", "magnitude", "-o", out).exit_code == 0
    return out


def prune_args(model, stats, out, *extra):
    return ["prune", model, "--stats", stats, "--metric", "wanda", "-o", out, *extra]


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and p.name.startswith(f".{path.name}."))


# ------------------------------------------------------------------------ 1. only its own outputs
def test_force_refuses_a_users_folder(tiny_llama, stats, tmp_path):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    before = tree(work)
    line = refused(*prune_args(tiny_llama, stats, work, "--force"), contains=("thesis.tex", "no record"))
    assert "remove it yourself" in line
    refused("calibrate", tiny_llama, "-o", work, "--force", "--dataset", "builtin", "--nsamples", "2",
            "--seqlen", "16", contains=("thesis.tex",))
    assert tree(work) == before and siblings(work) == []


def test_stray_file_names_do_not_make_a_folder_ours(tiny_llama, stats, pruned, tmp_path):
    # a user's folder with stade's file names in it (copied report, manifest, even the record itself)
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(pruned / "stade_report.json", fake)
    shutil.copy(stats / "manifest.json", fake)
    (fake / "notes.md").write_text("mine")
    refused(*prune_args(tiny_llama, stats, fake, "--force"), contains=("no record",))
    shutil.copy(pruned / MARKER, fake)
    refused(*prune_args(tiny_llama, stats, fake, "--force"), contains=("notes.md", "did not write"))
    assert (fake / "notes.md").read_text() == "mine"


def test_force_refuses_stade_outputs_the_user_changed(tiny_llama, stats, pruned):
    before = tree(pruned)
    (pruned / "extra").mkdir()
    refused(*prune_args(tiny_llama, stats, pruned, "--force"), contains=("extra", "did not write"))
    (pruned / "extra").rmdir()
    # re-saved in place (same name, same size: a fine-tune saved over it)
    weights = pruned / "model.safetensors"
    seen = weights.stat().st_mtime_ns
    weights.write_bytes(weights.read_bytes())
    if weights.stat().st_mtime_ns == seen:  # a clock coarser than the two writes: date it as a later save would be
        os.utime(weights, ns=(seen, seen + 1_000_000_000))
    refused(*prune_args(tiny_llama, stats, pruned, "--force"), contains=("model.safetensors", "changed"))
    assert tree(pruned) == before


def test_force_refuses_another_kind(tiny_llama, stats, pruned, tmp_path):
    refused(*prune_args(tiny_llama, stats, stats.parent / "stats", "--force"), code=2, contains=("stats directory",))
    other = shutil.copytree(stats, tmp_path / "stats-copy", copy_function=shutil.copy2)  # mtimes kept: still ours
    refused(*prune_args(tiny_llama, stats, other, "--force"), contains=("is a stats directory, not a pruned checkpoint",))
    refused("calibrate", tiny_llama, "-o", pruned, "--force", "--dataset", "builtin", "--nsamples", "2",
            "--seqlen", "16", contains=("is a pruned checkpoint, not a stats directory",))


def test_force_replaces_its_own_output_and_empty_dirs(tiny_llama, stats, pruned, tmp_path):
    assert json.loads((pruned / "stade_report.json").read_text())["method"] == "magnitude"
    refused(*prune_args(tiny_llama, stats, pruned), contains=("already exists", "--force"))
    result = invoke(*prune_args(tiny_llama, stats, pruned, "--force"))
    assert result.exit_code == 0, result.stderr
    assert "replaced the earlier output" in result.stderr
    assert json.loads((pruned / "stade_report.json").read_text())["method"] == "wanda"
    assert foreign(pruned, "checkpoint") is None and siblings(pruned) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(*prune_args(tiny_llama, stats, empty), contains=("already exists",))
    assert invoke(*prune_args(tiny_llama, stats, empty, "--force")).exit_code == 0
    assert (empty / "stade_report.json").is_file()
    # stats replace stats the same way
    again = tmp_path / "s"
    for force in ([], ["--force"]):
        assert invoke("calibrate", tiny_llama, "-o", again, *force, "--dataset", "builtin", "--nsamples", "2",
                      "--seqlen", "16").exit_code == 0


def test_links_home_and_cwd_are_refused(tiny_llama, stats, pruned, tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(pruned)
    refused(*prune_args(tiny_llama, stats, link, "--force"), contains=("symbolic link",))
    assert link.is_symlink() and (pruned / "stade_report.json").is_file()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    refused(*prune_args(tiny_llama, stats, tmp_path / "home", "--force"), code=2, contains=("home directory",))
    refused(*prune_args(tiny_llama, stats, tmp_path, "--force"), code=2, contains=("home directory",))
    monkeypatch.chdir(pruned)
    refused(*prune_args(tiny_llama, stats, ".", "--force"), code=2, contains=("current directory",))


# ------------------------------------------------------------------------- 2. inputs never outputs
def test_inputs_are_never_outputs(tiny_llama, stats, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "holder" / "model")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_llama / "config.json", data / "not-text.json")
    (data / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (tmp_path / "mlink").symlink_to(model)
    my_stats = shutil.copytree(stats, tmp_path / "stats", copy_function=shutil.copy2)
    before = {p: tree(p) for p in (model, data, my_stats)}
    calib = ["--dataset", data / "calib.txt", "--nsamples", "2", "--seqlen", "16"]
    cases = [
        (prune_args(model, my_stats, model, "--force"), "is the model directory"),
        (prune_args(tmp_path / "mlink", my_stats, model, "--force"), "is the model directory"),
        (prune_args(model, my_stats, tmp_path / "mlink", "--force"), "is the model directory"),
        (prune_args(model, my_stats, my_stats, "--force"), "is the stats directory"),
        (prune_args(model, my_stats, model.parent, "--force"), "holds the model directory"),
        (["calibrate", model, "-o", model, "--force", *calib], "is the model directory"),
        (["calibrate", model, "-o", model.parent, "--force", *calib], "holds the model directory"),
        (["calibrate", model, "-o", data, "--force", *calib], "holds the calibration data"),
        (["prune", model, "--metric", "wanda", "-o", data, "--force", *calib], "holds the calibration data"),
    ]
    for args, text in cases:
        refused(*args, code=2, contains=(text, "never writes over its inputs"))
    # inside an input: the output would become part of it (read with it, uploaded with it, a stranger to --force)
    inside = [
        prune_args(model, my_stats, model / "pruned"),
        ["calibrate", model, "-o", model / "stats", *calib],
        prune_args(model, my_stats, my_stats / "pruned"),
        ["calibrate", model, "-o", data / "stats", "--dataset", data, *calib[2:]],
        ["prune", model, "--metric", "wanda", "-o", data / "deeper" / "pruned", "--dataset", data, *calib[2:]],
    ]
    for args in inside:
        refused(*args, code=2, contains=("is inside", "never writes into its inputs"))
    # the same through a relative path, as a tired user types it in the model's own folder
    proc = cli("prune", ".", "--metric", "magnitude", "-o", ".", "--force", cwd=model)
    assert proc.returncode == 2 and "is the model directory" in proc.stderr, proc.stderr
    proc = cli("prune", "model", "--metric", "magnitude", "-o", ".", "--force", cwd=model.parent)
    assert proc.returncode == 2 and "holds the model directory" in proc.stderr, proc.stderr
    assert {p: tree(p) for p in (model, data, my_stats)} == before


def test_a_pruned_checkpoint_is_not_pruned_into_itself(tiny_llama, stats, pruned):
    before = tree(pruned)
    refused("prune", pruned, "--metric", "magnitude", "-o", pruned, "--force", code=2, contains=("model directory",))
    assert tree(pruned) == before


# --------------------------------------------------------------------------- 3. atomic replacement
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_interrupt_keeps_the_earlier_output(tiny_llama, stats, pruned, tmp_path, sig, code):
    before = tree(pruned)
    run = Held(tmp_path, prune_args(tiny_llama, stats, pruned, "--force")).wait_ready()
    assert (pruned.parent / staging_name(pruned.name, run.proc.pid)).is_dir()   # mid-write, in staging
    assert tree(pruned) == before
    run.proc.send_signal(sig)
    rc, out, err = run.finish()
    assert rc == code, err
    assert "Traceback" not in err and "no partial output is left" in err
    assert tree(pruned) == before and siblings(pruned) == []


def test_interrupt_with_no_earlier_output_leaves_nothing(tiny_llama, stats, tmp_path):
    out = tmp_path / "new"
    run = Held(tmp_path, prune_args(tiny_llama, stats, out)).wait_ready()
    run.proc.send_signal(signal.SIGINT)
    rc, _, err = run.finish()
    assert rc == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready-a"]


def test_kill_keeps_the_earlier_output_and_the_next_run_cleans_up(tiny_llama, stats, pruned, tmp_path):
    before = tree(pruned)
    run = Held(tmp_path, prune_args(tiny_llama, stats, pruned, "--force")).wait_ready()
    run.proc.kill()
    run.finish()
    leftover = staging_name(pruned.name, run.proc.pid)
    assert tree(pruned) == before and leftover in siblings(pruned)
    assert invoke("inspect", pruned).exit_code == 0      # what is at the path is complete and readable
    # the next run: no lock is left held, the leftover is removed and the message says so
    result = invoke(*prune_args(tiny_llama, stats, pruned, "--force"))
    assert result.exit_code == 0, result.stderr
    assert f"removed {leftover}" in result.stderr and f"pid {run.proc.pid}" in result.stderr
    assert json.loads((pruned / "stade_report.json").read_text())["method"] == "wanda"
    assert siblings(pruned) == []


def test_kill_between_the_two_renames_is_undone(tiny_llama, stats, pruned, tmp_path):
    """Where the file system cannot exchange, the old output is moved aside first: a kill right then leaves
    nothing at the path, and the next run puts the old one back."""
    before = tree(pruned)
    patch = ("import os, signal, stade_cli.outputs as o; o.exchange = lambda a, b: False; rename = os.rename\n"
             "def kill_after_first(src, dst):\n"
             "    rename(src, dst)\n"
             "    if '.stade-old-' in str(dst): os.kill(os.getpid(), signal.SIGKILL)\n"
             "os.rename = kill_after_first\n"
             "from stade_cli.cli.app import main; main()\n")
    proc = subprocess.run([sys.executable, "-c", patch, *map(str, prune_args(tiny_llama, stats, pruned, "--force"))],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not pruned.exists() and [n for n in siblings(pruned) if n.startswith(aside_name(pruned.name, 0)[:-1])]
    result = invoke("calibrate", tiny_llama, "-o", tmp_path / "elsewhere", "--dataset", "builtin", "--nsamples", "2",
                    "--seqlen", "16")   # another output: its neighbour's leftovers are not its business
    assert result.exit_code == 0 and not pruned.exists()
    result = invoke(*prune_args(tiny_llama, stats, pruned))
    assert result.exit_code == 1 and "restored" in result.stderr and "already exists" in result.stderr
    assert tree(pruned) == before and siblings(pruned) == []


def test_a_signal_between_the_two_renames_waits_for_the_second(tiny_llama, stats, pruned):
    """Ctrl-C right after the first of the two renames (no exchange) arrives once the new output is in place:
    the path never stays empty, and what is there is complete."""
    patch = ("import os, signal, stade_cli.outputs as o; o.exchange = lambda a, b: False; rename = os.rename\n"
             "def interrupt_after_first(src, dst):\n"
             "    rename(src, dst)\n"
             "    if '.stade-old-' in str(dst): os.kill(os.getpid(), signal.SIGINT)\n"
             "os.rename = interrupt_after_first\n"
             "from stade_cli.cli.app import main; main()\n")
    args = prune_args(tiny_llama, stats, pruned, "--force", "--sparsity", "0.6")
    proc = subprocess.run([sys.executable, "-c", patch, *map(str, args)], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert proc.returncode in (130, -signal.SIGINT) and "interrupted" in proc.stderr, proc.stderr
    assert json.loads((pruned / "stade_report.json").read_text())["target_sparsity"] == 0.6
    assert foreign(pruned, "checkpoint") is None and siblings(pruned) == []


def test_signals_held_run_their_handler_after_the_step(monkeypatch):
    """A signal that comes within ``_signals_held`` is handled once the step is done, by the handler that was
    in place; one that was ignored stays ignored."""
    from stade_cli.outputs import _signals_held

    seen = []

    class Stop(Exception):
        pass

    def handler(number, frame):
        seen.append(number)
        raise Stop
    old = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        steps = []
        with pytest.raises(Stop):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.05)            # a handler would have run here
                steps.append("done")
        assert steps == ["done"] and seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for n, h in old.items():
            signal.signal(n, h)


def test_a_kill_while_publishing_leaves_a_folder_the_next_run_removes(tmp_path, monkeypatch):
    """Killed after the record is written and before the staging marker goes (or while the record is written),
    the staging folder still carries a marker, so the next run knows it for its own and removes it."""
    import stade_cli.outputs as outputs

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed
    unlink = outputs.Path.unlink

    def staging_marker_kept(path, *a, **k):
        if path.name == outputs.STAGING_MARKER:
            raise Killed
        return unlink(path, *a, **k)
    target = tmp_path / "o"
    for where in ("replace", "unlink"):
        with monkeypatch.context() as m:
            if where == "replace":
                m.setattr(outputs.os, "replace", killed)      # the record half-written, under its .part name
            else:
                m.setattr(outputs.Path, "unlink", staging_marker_kept)    # the record written, the staging marker kept
            m.setattr(outputs, "remove_tree", lambda root: None)      # as SIGKILL would: no clean-up
            with pytest.raises(Killed), Output(target, "model") as dest, dest.staging() as tmp:
                (tmp / "a.bin").write_bytes(b"x")
        left = siblings(target)
        assert len(left) == 1 and left[0].startswith(".o.stade-new-"), left
        messages = []
        with Output(target, "model", log=messages.append) as dest, dest.staging() as tmp:
            (tmp / "a.bin").write_bytes(b"y")
        assert siblings(target) == [] and "left by a killed run" in messages[0], messages
        assert (target / "a.bin").read_bytes() == b"y" and foreign(target, "model") is None
        outputs.remove_tree(target)


def test_an_input_replaced_during_the_run_is_never_mixed_into_an_output(tiny_llama, stats, tmp_path, monkeypatch):
    """Another run's --force replaces the stats while this prune reads them (shards and Gram blocks are opened one
    at a time, so the rest would come from the new ones): nothing is published, and the path stays as it was."""
    import stade_cli.outputs as outputs

    mine = tmp_path / "stats"
    shutil.copytree(stats, mine)
    real_fsync = outputs.fsync_tree

    def replaced_meanwhile(path):     # as `calibrate -o mine --force` would: a whole new folder at the path
        if (mine / "manifest.json").exists() and not (tmp_path / "old").exists():
            os.rename(mine, tmp_path / "old")
            shutil.copytree(tmp_path / "old", mine)
        real_fsync(path)
    monkeypatch.setattr(outputs, "fsync_tree", replaced_meanwhile)
    result = invoke(*prune_args(tiny_llama, mine, tmp_path / "out"))
    assert result.exit_code == 1 and "the stats directory" in result.stderr and "changed while this run was " \
        "reading it (it was replaced)" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_what_counts_as_an_input_changing(tmp_path):
    """Replaced, rewritten or removed files stop the publishing; a file added beside them (the run never read
    it) and the offload directory (the run writes there) do not."""
    data, offload = tmp_path / "data", tmp_path / "offload"
    data.mkdir(), offload.mkdir()
    (data / "a.txt").write_text("one")
    (data / "b.txt").write_text("two")

    def publish(change) -> str | None:
        target = tmp_path / "o"
        try:
            with Output(target, "model") as dest:
                dest.check_inputs([("the calibration data", data), (outputs.OFFLOAD, offload)])
                with dest.staging() as tmp:
                    (tmp / "x").write_text("x")
                    (offload / "spilled.bin").write_bytes(b"0")
                    change()
            return None
        except OutputError as e:
            assert not target.exists()
            return str(e)
        finally:
            if target.exists():
                remove_output(target, "model")

    import stade_cli.outputs as outputs
    from stade_cli.errors import OutputError

    assert publish(lambda: (data / "c.txt").write_text("new")) is None
    assert "a.txt was rewritten" in publish(lambda: (data / "a.txt").write_text("changed"))
    assert "b.txt is gone" in publish(lambda: (data / "b.txt").unlink())
    assert "it was replaced" in publish(lambda: (os.rename(data, tmp_path / "d2"), shutil.copytree(tmp_path / "d2", data)))


def test_disk_space_counts_the_side_files_and_a_full_disk_says_so(tiny_llama, stats, tmp_path, monkeypatch):
    """The space check before any work counts the side files (config, tokenizer) with the weights; a disk that
    fills up while they are copied gives the disk-full line, not an unexpected error; nothing is left."""
    import errno

    import stade_cli.outputs as outputs
    import stade_cli.writer as writer
    from stade_cli.checkpoint import side_files, weight_files

    weights = sum((tiny_llama / f).stat().st_size for f in weight_files(tiny_llama))
    assert sum(p.stat().st_size for p in side_files(tiny_llama)) > 0
    usage = outputs.shutil.disk_usage
    with monkeypatch.context() as m:         # room for the weights alone
        m.setattr(outputs.shutil, "disk_usage", lambda p: usage(p)._replace(free=weights + 1))
        refused(*prune_args(tiny_llama, stats, tmp_path / "o"), contains=["not enough disk space"])
    assert not (tmp_path / "o").exists()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "copy_side_files", full)
    result = invoke(*prune_args(tiny_llama, stats, tmp_path / "o"))
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith(
        "error: the disk filled up while writing"), result.stderr
    assert not (tmp_path / "o").exists() and siblings(tmp_path / "o") == []


def test_a_mount_point_is_refused_before_any_work(tiny_llama, stats, tmp_path, monkeypatch):
    import stade_cli.outputs as outputs

    mount = tmp_path / "mnt"
    mount.mkdir()
    ismount = outputs.os.path.ismount
    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: str(p) == str(mount) or ismount(p))
    refused(*prune_args(tiny_llama, stats, mount, "--force"), contains=["is a mount point", str(mount / "out")])


def test_killed_runs_scratch_folders_are_removed_by_the_next_and_only_theirs(tmp_path):
    """SIGKILL leaves stade-hidden-/stade-refined-/stade-offload- folders behind; the next run that makes one in
    the same place removes those of dead pids of this host, and never a live run's, another host's or a user's."""
    from stade_cli.outputs import _host, scratch_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = _host()
    names = {"dead": f"stade-refined-{host}-{dead}-abc123", "live": f"stade-hidden-{host}-{os.getppid()}-def456",
             "other host": f"stade-offload-elsewhere{host}-{dead}-ghi789", "user's": f"stade-refined-{dead}-notes"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.bin").write_bytes(b"0")
    said = []
    new = scratch_dir("refined", tmp_path, said.append)
    assert new.name.startswith(f"stade-refined-{host}-{os.getpid()}-") and new.is_dir()
    assert not (tmp_path / names["dead"]).exists() and said == [
        f"removed {tmp_path / names['dead']}, left by a killed stade run (pid {dead})"]
    for kept in ("live", "other host", "user's"):
        assert (tmp_path / names[kept] / "x.bin").exists(), kept


def test_an_offload_dir_inside_an_input_is_refused(tiny_llama, stats, tmp_path):
    for offload in (stats / "off", tiny_llama):
        refused("prune", tiny_llama, "--stats", stats, "--sequential", "--offload-dir", offload, "--max-memory",
                "cpu=1GiB", "-o", tmp_path / "o", code=2, contains=["which this run reads"])
    assert not (stats / "off").exists() and not (tmp_path / "o").exists()


def test_exchange_fallback_replaces_completely(tiny_llama, stats, pruned, monkeypatch):
    import stade_cli.outputs as outputs

    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    assert invoke(*prune_args(tiny_llama, stats, pruned, "--force")).exit_code == 0
    assert json.loads((pruned / "stade_report.json").read_text())["method"] == "wanda"
    assert foreign(pruned, "checkpoint") is None and siblings(pruned) == []


def test_new_output_is_flushed_before_it_is_put_in_place(tmp_path, monkeypatch):
    import stade_cli.outputs as outputs

    events = []
    real_fsync, real_exchange, real_rename = outputs.fsync_tree, outputs.exchange, outputs.rename_noreplace
    monkeypatch.setattr(outputs, "fsync_tree", lambda p: (events.append(("fsync", sorted(tree(p)))), real_fsync(p)))
    monkeypatch.setattr(outputs, "rename_noreplace", lambda a, b: (events.append(("rename",)), real_rename(a, b)))
    monkeypatch.setattr(outputs, "exchange", lambda a, b: (events.append(("exchange",)), real_exchange(a, b))[1])
    for force in (False, True):
        with Output(tmp_path / "o", "model", force=force) as dest, dest.staging() as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 10)
    assert events == [("fsync", [MARKER, "a.bin"]), ("rename",), ("fsync", [MARKER, "a.bin"]), ("exchange",)]


def test_leftovers_that_are_not_stade_s_are_left_alone(tiny_llama, stats, tmp_path):
    out = tmp_path / "o"
    mine = tmp_path / staging_name("o", 999999)
    mine.mkdir()
    (mine / "my.txt").write_text("not stade's")
    stale = tmp_path / staging_name("o", 999998)
    stale.mkdir()
    (stale / ".stade-staging.json").write_text(json.dumps({"format": "stade-output", "pid": 999998}))
    (stale / "half.safetensors").write_text("x")
    result = invoke(*prune_args(tiny_llama, stats, out))
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", mine.name])
    assert (mine / "my.txt").read_text() == "not stade's"
    assert "999998" in result.stderr


def test_remove_output_removes_only_its_own(pruned, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "x").write_text("x")
    assert remove_output(user, "checkpoint") is False and (user / "x").exists()
    assert remove_output(pruned, "stats") is False and pruned.exists()
    assert remove_output(pruned, "checkpoint") is True and not pruned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


# ------------------------------------------------------------------------- 4. concurrent runs
def test_two_runs_on_one_output(tiny_llama, stats, tmp_path):
    out = tmp_path / "o"
    first = Held(tmp_path, prune_args(tiny_llama, stats, out, "--force")).wait_ready()
    second = cli(*prune_args(tiny_llama, stats, out, "--force"))
    third = cli("calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", "2", "--seqlen", "16")
    for proc in (second, third):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert f"another stade run (pid {first.proc.pid}) is writing" in lines[0]
    rc, out_text, err = first.release().finish()
    assert rc == 0, err
    assert out_text.strip() == str(out)
    report = json.loads((out / "stade_report.json").read_text())
    assert report["method"] == "wanda" and foreign(out, "checkpoint") is None
    assert siblings(out) == []                                   # the lock file is gone too
    assert invoke("inspect", out).exit_code == 0


def test_a_killed_writer_leaves_no_lock_held(tiny_llama, stats, tmp_path):
    out = tmp_path / "o"
    run = Held(tmp_path, prune_args(tiny_llama, stats, out)).wait_ready()
    run.proc.kill()
    run.finish()
    assert lock_name("o") in siblings(out)                       # the file stays; the kernel dropped the lock
    result = invoke(*prune_args(tiny_llama, stats, out))
    assert result.exit_code == 0, result.stderr
    assert siblings(out) == []


# ----------------------------------------------------------------------------- 5. calibrate
@pytest.mark.parametrize("how", ["kill", "int"])
def test_killed_calibrate_leaves_nothing_and_needs_no_force(tiny_llama, tmp_path, how):
    out = tmp_path / "stats"
    args = ["calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", "2", "--seqlen", "16"]
    run = Held(tmp_path, args, after=1).wait_ready()
    run.proc.kill() if how == "kill" else run.proc.send_signal(signal.SIGINT)
    rc, _, err = run.finish()
    assert rc == (-signal.SIGKILL if how == "kill" else 130), err
    assert not out.exists()
    result = invoke(*args)                                        # no --force needed
    assert result.exit_code == 0, result.stderr
    assert (out / "manifest.json").is_file() and siblings(out) == []
    if how == "kill":
        assert "removed" in result.stderr and "killed run" in result.stderr


def test_calibrate_force_over_earlier_stats_survives_a_kill(tiny_llama, tmp_path):
    out = tmp_path / "stats"
    args = ["calibrate", tiny_llama, "-o", out, "--dataset", "builtin", "--nsamples", "2", "--seqlen", "16"]
    assert invoke(*args).exit_code == 0
    before = tree(out)
    run = Held(tmp_path, [*args, "--force", "--seed", "3"], after=1).wait_ready()
    run.proc.kill()
    run.finish()
    assert tree(out) == before


# ------------------------------------------------------------------------------- demo and bench
def test_demo_workdir_keeps_a_users_files(tiny_llama, tmp_path):
    work = tmp_path / "work"
    (work / "stats").mkdir(parents=True)
    (work / "stats" / "mine.txt").write_text("mine")
    result = invoke("demo", "--model", tiny_llama, "--workdir", work, "--nsamples", "2", "--seqlen", "16",
                    "--max-windows", "2")
    assert result.exit_code == 1 and "mine.txt" in result.stderr
    assert tree(work) == {"stats/mine.txt": hashlib.sha256(b"mine").hexdigest()}
    (work / "stats" / "mine.txt").unlink()
    for _ in range(2):   # its own outputs are replaced on the next run
        result = invoke("demo", "--model", tiny_llama, "--workdir", work, "--nsamples", "2", "--seqlen", "16",
                        "--max-windows", "2")
        assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["pruned-stade", "stats"]
    # its own pruned checkpoint as the model (or the workdir itself) is refused before the stats are replaced
    before = tree(work)
    for model, metric in ((work / "pruned-stade", "stade"), (work, "wanda")):
        refused("demo", "--model", model, "--metric", metric, "--workdir", work, "--nsamples", "2", "--seqlen", "16",
                "--max-windows", "2", code=2, contains=["which this demo writes"])
    assert tree(work) == before


def test_bench_outputs_keep_a_users_files(tmp_path):
    root = Path(__file__).resolve().parents[1]
    q = tmp_path / "q"
    q.mkdir()
    (q / "quality.md").write_text("my notes")
    speed = tmp_path / "speed.json"
    speed.write_text('{"mine": true}')
    for script, out in (("bench/quality.py", q), ("bench/speed.py", speed)):
        proc = subprocess.run([sys.executable, script, "--model", "nope", "--calib", "nope", "--eval", "nope",
                               "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=DEADLINE)
        assert proc.returncode != 0, proc.stderr
        assert "did not write" in proc.stderr or "is not results" in proc.stderr, proc.stderr
    assert (q / "quality.md").read_text() == "my notes" and speed.read_text() == '{"mine": true}'


def test_lock_without_flock_uses_an_exclusive_file(tmp_path, monkeypatch):
    """Where fcntl is missing (Windows), the lock is an O_EXCL file naming its pid; a dead pid's is stale."""
    import stade_cli.outputs as outputs
    from stade_cli.errors import OutputError

    monkeypatch.setattr(outputs, "fcntl", None)
    lock = tmp_path / lock_name("o")
    lock.write_text("999999\n")                                   # left by a process that is gone
    with Output(tmp_path / "o", "model") as dest, dest.staging() as tmp:
        assert lock.read_text().strip() == str(os.getpid())
        (tmp / "x").write_text("x")
    assert not lock.exists() and (tmp_path / "o" / "x").is_file()
    lock.write_text(f"{os.getppid()}\n")                          # a live process holds it
    with pytest.raises(OutputError, match=f"another stade run \\(pid {os.getppid()}\\) is writing"):
        with Output(tmp_path / "o", "model", force=True):
            pass
    assert lock.read_text().strip() == str(os.getppid())         # the holder's lock is left alone
