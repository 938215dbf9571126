"""The stade command, with one rank made to fail part-way through its weight shards (for tests/test_distributed.py).

STADE_TEST_FAIL_RANK names the rank; STADE_TEST_FAIL_HOW is ``raise`` (an error in the writer after its first
shard), ``kill`` (SIGKILL, as the out-of-memory killer would) or ``hang`` (stuck after creating the file
STADE_TEST_READY, until the launcher is interrupted).
"""
import os
import signal
import time

from stade_cli import writer

if os.environ.get("RANK") == os.environ.get("STADE_TEST_FAIL_RANK"):
    real = writer._Stream.shard
    done = []

    def shard(self, fname, out, advance):
        if done:
            how = os.environ.get("STADE_TEST_FAIL_HOW")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":      # stuck (a slow disk, a deadlock) until the launcher is interrupted
                open(os.environ["STADE_TEST_READY"], "w").close()
                while True:
                    time.sleep(0.05)
            raise OSError(5, "Input/output error (injected)")
        real(self, fname, out, advance)
        done.append(fname)

    writer._Stream.shard = shard

from stade_cli.cli.app import main  # noqa: E402

main()
