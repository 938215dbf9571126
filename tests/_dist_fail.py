"""The stade command, with one rank made to fail part-way through its weight shards (for tests/test_distributed.py).

STADE_TEST_FAIL_RANK names the rank; STADE_TEST_FAIL_HOW is
  ``raise``            an error in the writer after its first shard;
  ``kill``             SIGKILL after its first shard, as the out-of-memory killer would;
  ``kill-while-busy``  the same, once every other rank is inside its first shard, where it stays (creating the
                       file STADE_TEST_READY) until signalled: what the other ranks learn then comes from the
                       launcher (torchrun stops them with SIGTERM), never from a collective;
  ``hang``             stuck after creating the file STADE_TEST_READY, until the launcher is interrupted.
"""
import os
import signal
import time

from stade_cli import writer

HOW = os.environ.get("STADE_TEST_FAIL_HOW")
FAILING = os.environ.get("RANK") == os.environ.get("STADE_TEST_FAIL_RANK")
real = writer._Stream.shard


def _stuck(ready: str):
    open(ready, "w").close()
    while True:                  # a slow disk, a deadlock: until a signal unwinds it
        time.sleep(0.05)


if FAILING:
    done = []

    def shard(self, fname, out, advance):
        if done:
            if HOW == "kill-while-busy":
                while not os.path.exists(os.environ["STADE_TEST_READY"]):
                    time.sleep(0.05)
            if HOW in ("kill", "kill-while-busy"):
                os.kill(os.getpid(), signal.SIGKILL)
            if HOW == "hang":
                _stuck(os.environ["STADE_TEST_READY"])
            raise OSError(5, "Input/output error (injected)")
        real(self, fname, out, advance)
        done.append(fname)

    writer._Stream.shard = shard
elif HOW == "kill-while-busy":
    def shard(self, fname, out, advance):
        _stuck(os.environ["STADE_TEST_READY"])

    writer._Stream.shard = shard

from stade_cli.cli.app import main  # noqa: E402

main()
