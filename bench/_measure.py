"""Run a command as a child and measure it: wall seconds, CPU seconds (user + system), peak RSS, and the peak of
its anonymous memory (RssAnon, sampled every 0.1 s: RSS without the pages of files it maps, such as checkpoint
shards, which the kernel can drop at any time).

A fresh, small process runs the command and reports exactly its child's figures. Measuring the child directly
from a (large) benchmark process would be wrong: on Linux, a child's ru_maxrss starts from the parent's
high-water RSS, which fork/vfork + exec carries over (a 1 GB parent makes `python -c pass` report 1 GB). The
wrapper's own RSS (~10 MB) is far below anything measured here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WRAPPER = r"""
import json, os, signal, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))    # passed on: the command ends itself
anon = 0                    # the peak of RssAnon: memory of the process's own, without the files it maps
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.1)
with open(out, "w") as f:
    json.dump({"maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime, "anon_kb": anon}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_child(cmd: list[str], env: dict | None = None, stop_after: float | None = None, grace: float = 30.0,
              ready: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, CPU time, exit code, peak RSS in bytes and the tail of its stderr.

    ``stop_after`` seconds: the command is sent SIGTERM then (as a batch scheduler sends it at the end of a job's
    time) and killed ``grace`` seconds later if it has not ended; the figures then carry ``stopped``: the seconds
    at which it was told to stop. ``ready``: a file the command writes once it is set up; the ``stop_after``
    seconds count from when it appears (or the command ends first)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r", suffix=".usage") as usage:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WRAPPER, usage.name, *cmd],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
        stopped = None
        while ready is not None and not ready.exists() and proc.poll() is None:
            time.sleep(0.01)
        try:
            proc.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            stopped = time.perf_counter() - t0
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)     # the wrapper and the command: their own session
                proc.wait()
        seconds = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
        text = Path(usage.name).read_text().strip()
    got = json.loads(text) if text else {"maxrss_kb": 0, "cpu": 0.0}
    figures = {"seconds": seconds, "cpu": got["cpu"], "rc": proc.returncode, "maxrss": int(got["maxrss_kb"]) * 1024,
               "anon": int(got.get("anon_kb", 0)) * 1024, "stderr": tail}
    return figures if stopped is None else {**figures, "stopped": round(stopped, 1)}


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env
