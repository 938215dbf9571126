"""Several processes: the same commands under `torchrun --nproc-per-node 2` (gloo, on the CPU) against one process.

Both sides run with one thread per process (OMP_NUM_THREADS=1, as torchrun sets it), so each window's forward
pass is the same arithmetic on both; what may differ is only the order of the float64 sums.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stade_cli.distributed import World, assign, launched, share
from stade_cli.errors import StadeError

HERE = Path(__file__).resolve().parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- pure parts
def test_shares_cover_every_item_once_and_differ_by_at_most_one():
    for n in (0, 1, 5, 7, 128):
        for size in (1, 2, 3, 8):
            parts = [share(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            lengths = [b - a for a, b in parts]
            assert max(lengths) - min(lengths) <= 1
    assert [share(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_shards_are_balanced_by_bytes():
    # largest first onto the least-loaded rank: 9 → r0, 7 → r1, 4 → r1 (7 < 9), 3 → r0 (9 < 11), 1 → r1 (11 < 12)
    assert assign([4, 9, 1, 7, 3], 2) == [1, 0, 1, 1, 0]
    assert World(0, 2).pick([4, 9, 1, 7, 3]) == [1, 4] and World(1, 2).pick([4, 9, 1, 7, 3]) == [0, 2, 3]
    assert assign([5], 3) == [0] and World(2, 3).pick([5]) == []
    loads = [0, 0, 0]
    sizes = [10, 10, 10, 1, 1, 1]
    for i, r in enumerate(assign(sizes, 3)):
        loads[r] += sizes[i]
    assert loads == [11, 11, 11]


def test_the_launchers_environment():
    assert launched({}) == World() and launched({"WORLD_SIZE": "1", "RANK": "0"}) == World()
    assert launched({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == World(2, 4, 0)
    with pytest.raises(StadeError, match="RANK is missing"):
        launched({"WORLD_SIZE": "2"})
    with pytest.raises(StadeError, match="outside WORLD_SIZE"):
        launched({"WORLD_SIZE": "2", "RANK": "2"})


def _on_a_thread(fn):
    """Run ``fn`` on another thread, as gloo writes a collective's results from its own (where no inference mode
    is set), and re-raise what it raised."""
    import threading

    failed: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def test_collectives_agree_from_inside_an_inference_pass(monkeypatch):
    """`--sequential` meets the other ranks inside a pass run under `torch.inference_mode`. Under torch 2.2 gloo
    wrote a collective's results from its own threads, into tensors made in that mode, and torch refused ("Inplace
    update to inference tensor outside InferenceMode"): every two-rank `--sequential` prune failed. The fakes below
    do what gloo did: write from another thread into the tensors the collective made (or was given)."""
    import torch.distributed as dist

    def all_reduce(tensor, op=None):
        _on_a_thread(lambda: tensor.mul_(2))                  # two ranks that hold the same values

    def all_gather_object(out, obj):
        sizes = torch.zeros(len(out), dtype=torch.long)       # as torch's own: the objects' sizes, gathered first
        _on_a_thread(lambda: sizes.add_(1))
        out[:] = [obj] * len(out)

    def broadcast_object_list(box, src=0):
        size = torch.zeros(1, dtype=torch.long)
        _on_a_thread(lambda: size.add_(1))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    w = World(0, 2)
    with torch.inference_mode():
        moments = torch.ones(3, dtype=torch.float64)          # made in the pass: an inference tensor
        assert w.sum_(moments) is moments and moments.tolist() == [2.0, 2.0, 2.0]
        assert w.gather("fine") == ["fine", "fine"]
        assert w.broadcast("y") == "y"
        w.check(None)
    normal = torch.ones(2, dtype=torch.float64)                # outside the pass: summed where it is
    assert w.sum_(normal) is normal and normal.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("gloo_said, told", [
    ("[../gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4242", "stopped without saying why"),
    ("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv", "stopped without saying why"),
    ("Inplace update to inference tensor outside InferenceMode is not allowed.", "failed on rank 0 of 2"),
])
def test_a_collective_failure_says_whether_a_peer_is_gone(monkeypatch, gloo_said, told):
    """A peer's death is told as such; a failure of this rank's own at a collective is not blamed on the others."""
    import torch.distributed as dist

    from stade_cli.distributed import RankFailed

    def all_gather_object(out, obj):
        raise RuntimeError(gloo_said)

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    with pytest.raises(RankFailed, match=told) as failed:
        World(0, 2).gather("x")
    assert "gloo/" not in str(failed.value)          # gloo's source location dropped


def test_one_process_is_one_process(tiny_llama, tmp_path):
    """Without a launcher nothing starts a process group, and the collectives are the identity."""
    import torch.distributed as dist
    from typer.testing import CliRunner

    from stade_cli.cli.app import app

    w = World()
    t = torch.arange(3.0)
    assert w.sum_(t) is t and w.gather(5) == [5] and w.broadcast("x") == "x" and w.first(lambda: 7) == 7
    with pytest.raises(ValueError):
        w.check(ValueError("mine"))
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama), "-o", str(tmp_path / "s"), "--dataset", "builtin",
                                      "--nsamples", "2", "--seqlen", "16"])
    assert result.exit_code == 0, result.stderr
    assert not dist.is_initialized()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["world_size"] == 1


# ---------------------------------------------------------------------------------------- under torchrun
def stade(*args, ranks: int = 1, script: Path | None = None, env: dict | None = None, code: int = 0):
    """Run the stade CLI in one process, or under torchrun with ``ranks`` processes (gloo)."""
    args = [str(a) for a in args]
    if ranks == 1:
        cmd = [sys.executable, "-m", "stade_cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *([str(script)] if script else ["-m", "stade_cli"]), *args]
    full_env = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if code is not None:
        assert (proc.returncode == 0) == (code == 0), f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def in_shards(src: Path, out: Path) -> Path:
    """The model at ``src`` saved again in several safetensors shards (so two ranks have shards to share)."""
    import shutil

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="60KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="module")
def sharded(tiny_factory, tmp_path_factory) -> Path:
    """A 4-block tiny Llama in several shards."""
    return in_shards(tiny_factory("llama", num_hidden_layers=4), tmp_path_factory.mktemp("sharded") / "model")


CAL = ["--dataset", "builtin", "--nsamples", 6, "--seqlen", 32, "--gram"]


@pytest.fixture(scope="module")
def stats_pair(sharded, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-stats")
    one = stade("calibrate", sharded, "-o", root / "one", *CAL)
    two = stade("calibrate", sharded, "-o", root / "two", *CAL, ranks=2)
    return root / "one", root / "two", one, two


def _stats(path: Path) -> dict:
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(path)}:{k}"] = v
    return out


def test_calibrate_on_two_ranks_equals_one_process(stats_pair):
    one, two, p1, p2 = stats_pair
    a, b = _stats(one), _stats(two)
    assert a.keys() == b.keys() and any("gram" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-12, atol=1e-12), k
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    for key in ("created", "seconds", "world_size"):
        m1.pop(key), m2.pop(key)
    assert m1 == m2
    # rank 0 alone prints the stats path; the log says how the windows were shared
    assert p2.stdout.strip().splitlines() == [str(two)]
    assert "2 ranks, windows 0-2 here" in p2.stderr


def test_calibrate_with_a_device_map_on_two_ranks(sharded, stats_pair, tmp_path):
    """Each rank loads the model with accelerate's placement (here a CPU budget, offload in a folder of its own
    inside the one --offload-dir): the same stats."""
    out = tmp_path / "placed"
    stade("calibrate", sharded, "-o", out, *CAL, "--max-memory", "cpu=1GiB", "--offload-dir", tmp_path / "off",
          ranks=2)
    a, b = _stats(stats_pair[1]), _stats(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "manifest.json").read_text())["placement"]
    assert not list((tmp_path / "off").iterdir())          # each rank's offload folder removed


def _free_port() -> str:
    """A port nothing listens on now (port 0, "any", never started under torch 2.2 with accelerate 0.30)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_accelerate_launch_is_the_same_engine(sharded, stats_pair, tmp_path):
    """`accelerate launch` starts torchrun's workers with the same environment: the same stats."""
    pytest.importorskip("accelerate")
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
           "-m", "stade_cli", "calibrate", str(sharded), "-o", str(out), *map(str, CAL)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    a, b = _stats(stats_pair[1]), _stats(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def test_prune_on_two_ranks_is_byte_identical(sharded, stats_pair, tmp_path):
    stats = ["--stats", stats_pair[0]]
    calibrating = ["--metric", "stade", "--dataset", "builtin", "--nsamples", 6, "--seqlen", 32]   # no --stats
    for i, extra in enumerate(([*stats], [*stats, "--metric", "sparsegpt"],
                               [*stats, "--metric", "wanda", "--update", "admm", "--pattern", "2:4"], calibrating)):
        one, two = tmp_path / f"one{i}", tmp_path / f"two{i}"
        stade("prune", sharded, "-o", one, *extra)
        p = stade("prune", sharded, "-o", two, *extra, ranks=2)
        a, b = _files(one), _files(two)
        assert a.keys() == b.keys() and "model.safetensors.index.json" in a
        for name in a:
            if name not in ("stade_report.json", ".stade-output.json", "README.md"):
                assert a[name] == b[name], (extra, name)
        ra, rb = (json.loads(x["stade_report.json"]) for x in (a, b))
        for r, out in ((ra, one), (rb, two)):
            r.pop("created"), r.pop("seconds")
            assert r.pop("command").endswith(f" -o {out}")        # the same command, each with its own output
            for key in ("created", "seconds", "world_size"):     # stats calibrated by this very prune
                r["stats"].pop(key, None)
        assert ra == rb
        assert "2 ranks share the" in p.stderr
        assert not list(tmp_path.glob(".*stade-*"))             # no staging or lock left beside the outputs


def test_eval_on_two_ranks_gives_the_same_number(sharded):
    args = ["eval", sharded, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 7, "--batch-size", 2, "--json"]
    one = json.loads(stade(*args).stdout)
    two = json.loads(stade(*args, ranks=2).stdout)          # rank 0 alone writes the JSON
    assert one["ppl"] == two["ppl"] and one["nll"] == two["nll"] and one["tokens"] == two["tokens"]
    assert two["world_size"] == 2 and "world_size" not in one


def by_hand(*args, ranks: int = 2, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``tests/_dist_fail.py`` as ``ranks`` processes started the way a launcher would (RANK, WORLD_SIZE, ...),
    with no launcher's agent watching them: what a rank learns of another's death comes from a collective alone."""
    import socket

    with socket.socket() as s:                      # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(HERE / "_dist_fail.py"), *map(str, args)]
    procs = []
    for r in range(ranks):
        e = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", **(env or {}), "RANK": str(r), "LOCAL_RANK": str(r),
             "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e))
    try:
        told = [p.communicate(timeout=600) for p in procs]
        return [subprocess.CompletedProcess(cmd, p.returncode, *t) for p, t in zip(procs, told)]
    finally:
        for p in procs:
            p.kill()


def test_a_rank_failing_mid_prune_leaves_no_output(sharded, stats_pair, tmp_path):
    """Rank 1's writer fails after its first shard: both ranks learn it at the collective that checks the shards,
    each says why it stopped, and nothing is left. (Started by hand: under torchrun the agent's SIGTERM may reach
    rank 0 before its line is printed, and then the line says so instead; see the test after next.)"""
    work = tmp_path / "work"
    work.mkdir()
    zero, one = by_hand("prune", sharded, "--stats", stats_pair[0], "-o", work / "out",
                        env={"STADE_TEST_FAIL_RANK": "1", "STADE_TEST_FAIL_HOW": "raise"})
    assert zero.returncode == 1 and one.returncode == 1, (zero.stderr, one.stderr)
    assert "error: rank 1: unexpected OSError: [Errno 5] Input/output error (injected)" in one.stderr
    assert "error: rank 0: rank 1 of 2 failed" in zero.stderr, zero.stderr      # rank 0 says why it stopped
    assert not list(work.iterdir())                             # neither the output nor its staging or lock


def test_a_rank_killed_mid_prune_is_told_by_the_collective(sharded, stats_pair, tmp_path):
    """Rank 1 SIGKILLed after its first shard (the out-of-memory killer) and no launcher to stop rank 0: rank 0
    learns it at its next collective, says so, and leaves nothing."""
    work = tmp_path / "work"
    work.mkdir()
    zero, one = by_hand("prune", sharded, "--stats", stats_pair[0], "-o", work / "out",
                        env={"STADE_TEST_FAIL_RANK": "1", "STADE_TEST_FAIL_HOW": "kill"})
    assert one.returncode == -9
    assert zero.returncode == 1, zero.stderr
    assert "error: rank 0: another of the 2 ranks stopped without saying why" in zero.stderr, zero.stderr
    assert "it was killed or crashed" in zero.stderr
    assert not list(work.iterdir())                             # neither the output nor its staging or lock


def test_a_rank_killed_while_the_others_work_is_told_by_the_launcher(sharded, stats_pair, tmp_path):
    """Rank 1 SIGKILLed while rank 0 is busy in its shards: torchrun stops rank 0 with SIGTERM, rank 0 unwinds
    saying where the cause is told, and the launcher's report names the killed rank."""
    work = tmp_path / "work"
    work.mkdir()
    p = stade("prune", sharded, "--stats", stats_pair[0], "-o", work / "out", ranks=2, script=HERE / "_dist_fail.py",
              env={"STADE_TEST_FAIL_RANK": "1", "STADE_TEST_FAIL_HOW": "kill-while-busy",
                   "STADE_TEST_READY": str(tmp_path / "ready")}, code=1)
    assert "error: rank 0: interrupted by SIGTERM" in p.stderr, p.stderr
    assert "a launcher stops every rank this way when one of them fails: its report names which" in p.stderr
    assert "rank      : 1" in p.stderr and "SIGKILL" in p.stderr     # torchrun's report: rank 1, signal 9
    assert not list(work.iterdir())


def test_ctrl_c_on_the_launcher_stops_every_rank_and_leaves_nothing(sharded, stats_pair, tmp_path):
    """Rank 1 is stuck in its shards, rank 0 waits for it at a collective; Ctrl-C on torchrun (SIGINT to every
    rank) unwinds both at once: each says it was interrupted, and no output, staging or lock is left."""
    import signal
    import time

    work, ready = tmp_path / "work", tmp_path / "ready"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "_dist_fail.py"), "prune", str(sharded), "--stats", str(stats_pair[0]), "-o", str(work / "out")]
    env = {**os.environ, **ONE_THREAD, "STADE_TEST_FAIL_RANK": "1", "STADE_TEST_FAIL_HOW": "hang",
           "STADE_TEST_READY": str(ready)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not ready.exists():                 # the event: rank 1 is inside its shards
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "error: rank 0: interrupted" in err and "error: rank 1: interrupted" in err, err
    assert not list(work.iterdir())


def test_sequential_shares_the_forward_passes(sharded, stats_pair, tmp_path):
    """--sequential under two ranks: each runs half the windows through every block, the block's moments (and
    Gram) are summed, every rank decides the same and rank 0 writes: the checkpoint of one process."""
    for metric, exact in (("wanda", True), ("sparsegpt", False)):
        one, two = tmp_path / f"one-{metric}", tmp_path / f"two-{metric}"
        args = ["prune", sharded, "--metric", metric, "--sequential", "--dataset", "builtin", "--nsamples", 6,
                "--seqlen", 32]
        stade(*args, "-o", one)
        p = stade(*args, "-o", two, ranks=2)
        assert "2 ranks, windows 0-2 here" in p.stderr and "rank 0 writes the checkpoint" in p.stderr
        a, b = _files(one), _files(two)
        assert a.keys() == b.keys()
        for name in (n for n in a if n.endswith(".safetensors")):
            if exact:        # a mask from moments: the float64 sums' order cannot move it
                assert a[name] == b[name], name
            else:            # sparsegpt's kept weights come from the Gram: equal up to its float64 rounding
                ta, tb = load_file(str(one / name)), load_file(str(two / name))
                assert all(torch.equal(ta[k] == 0, tb[k] == 0) for k in ta)
                assert all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6) for k in ta)


def test_zero_shot_is_refused_under_a_launcher(sharded):
    z = stade("eval", sharded, "--tasks", "arc_easy", ranks=2, code=2)
    assert "runs in one process" in z.stderr and "accelerate launch -m lm_eval" in z.stderr


def test_sweep_and_demo_are_refused_under_a_launcher(tiny_llama, tmp_path, monkeypatch):
    """They claim outputs of their own: every rank would claim the same one. Refused before any work (the launcher's
    environment alone decides; no process group is needed to say no)."""
    from typer.testing import CliRunner

    from stade_cli.cli.app import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for args in (["sweep", str(tiny_llama), "--metrics", "wanda", "-o", str(tmp_path / "sw"), "--dataset", "builtin"],
                 ["demo", "--workdir", str(tmp_path / "demo")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "runs in one process, not as 2 ranks" in r.stderr, r.stderr
    # the library refuses as the command line does: a script under torchrun gets the same line
    from stade_cli import zero_shot
    from stade_cli.demo import run_demo
    from stade_cli.errors import UsageError
    from stade_cli.sweep import sweep

    for call in (lambda: sweep(str(tiny_llama), tmp_path / "sw", ["wanda"], dataset="builtin"),
                 lambda: run_demo(workdir=str(tmp_path / "demo")),
                 lambda: zero_shot(str(tiny_llama), "arc_easy")):
        with pytest.raises(UsageError, match="runs in one process, not as 2 ranks"):
            call()
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- mixtures of experts
@pytest.fixture(scope="module")
def moe_sharded(tiny_factory, tmp_path_factory):
    """A tiny Qwen2-MoE (a shared expert beside four routed ones) in several shards."""
    return in_shards(tiny_factory("qwen2_moe"), tmp_path_factory.mktemp("moe-sharded") / "model")


def test_moe_on_two_ranks_is_one_process(moe_sharded, tmp_path):
    """Every expert's moments, Gram matrices and routing statistics summed over two ranks equal one process's;
    pruning its experts (and removing experts) on two ranks writes the same bytes."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("removing experts by --expert-score reap needs router weights that transformers 4.x stats lack")
    one, two = tmp_path / "s1", tmp_path / "s2"
    stade("calibrate", moe_sharded, "-o", one, *CAL)
    stade("calibrate", moe_sharded, "-o", two, *CAL, ranks=2)
    a, b = _stats(one), _stats(two)
    assert a.keys() == b.keys() and any(k.startswith("moments.safetensors:__experts__.") for k in a)
    assert any(".mlp.experts.3.down_proj" in k for k in a)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-12, atol=1e-12), k
    for i, extra in enumerate((["--metric", "wanda", "--expert-min-tokens", 0],
                               ["--metric", "sparsegpt", "--pattern", "2:4"],
                               ["--experts", 2, "--expert-score", "reap", "--metric", "wanda", "--sparsity", 0.5])):
        p1, p2 = tmp_path / f"one{i}", tmp_path / f"two{i}"
        stade("prune", moe_sharded, "--stats", one, "-o", p1, *extra)
        stade("prune", moe_sharded, "--stats", one, "-o", p2, *extra, ranks=2)
        x, y = _files(p1), _files(p2)
        assert x.keys() == y.keys()
        for name in x:
            if name not in ("stade_report.json", ".stade-output.json", "README.md"):
                assert x[name] == y[name], (extra, name)


@pytest.mark.parametrize("peer_gone", [False, True])
def test_a_rank_leaves_after_meeting_the_others(monkeypatch, peer_gone):
    """At exit a rank waits at a barrier for the others before destroying the process group (under torch 2.2 a
    destroy while another rank was still at work could hang); a barrier that fails (a rank already gone) still
    ends in the destroy."""
    import torch.distributed as dist

    from stade_cli import distributed

    calls = []

    def barrier():
        calls.append("barrier")
        if peer_gone:
            raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed._stop()
    assert calls == ["barrier", "destroy"]
    # a rank stopped by a signal does not wait: the others may be inside a collective it will not join
    from stade_cli import errors

    calls.clear()
    monkeypatch.setattr(errors, "_RECEIVED", [15])
    distributed._stop()
    assert calls == ["destroy"]


@pytest.mark.parametrize("signalled", [False, True])
def test_a_rank_leaves_with_its_code_without_destroying_the_group(monkeypatch, signalled):
    """Under torch 2.2 `destroy_process_group` could deadlock holding the interpreter's lock (2 of 40 two-rank
    calibrations, after the barrier, the output written), and so could the group's teardown at exit: a rank meets
    the others, runs what the exit would run, and ends with its code, the group left to the operating system."""
    import atexit

    import torch.distributed as dist

    from stade_cli import distributed, errors

    calls = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        calls.append(("exit", code))
        raise Exited

    def destroy():
        raise AssertionError("the process group must not be destroyed on the way out")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    if signalled:
        monkeypatch.setattr(errors, "_RECEIVED", [15])
    with pytest.raises(Exited):
        distributed.leave(3)
    assert calls == ([] if signalled else ["barrier"]) + ["atexit", ("exit", 3)]


def test_one_process_leaves_without_the_distributed_package():
    code = ("import sys; from stade_cli.distributed import leave; leave(0); "
            "print('torch.distributed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
