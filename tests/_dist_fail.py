"""The stade command, with one rank made to fail part-way through its weight shards (for tests/test_distributed.py).

STADE_TEST_FAIL_RANK names the rank; STADE_TEST_FAIL_HOW is ``raise`` (an error in the writer after its first
shard) or ``kill`` (SIGKILL, as the out-of-memory killer would).
"""
import os
import signal

from stade_cli import writer

if os.environ.get("RANK") == os.environ.get("STADE_TEST_FAIL_RANK"):
    real = writer._Stream.shard
    done = []

    def shard(self, fname, out, advance):
        if done:
            if os.environ.get("STADE_TEST_FAIL_HOW") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(5, "Input/output error (injected)")
        real(self, fname, out, advance)
        done.append(fname)

    writer._Stream.shard = shard

from stade_cli.cli.app import main  # noqa: E402

main()
