"""Models larger than the device: accelerate device maps with disk offload, block-by-block runs, spilled
block inputs. On the CPU a small --max-memory budget forces accelerate to put part of the model on disk;
every result must equal the in-memory run's exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stade_cli.arch import describe
from stade_cli.blockwise import BlockRunner, HiddenCache, onloaded
from stade_cli.loading import Placement, load_model, parse_max_memory
from stade_cli.checkpoint import resolve_model
from stade_cli.cli.app import app
from stade_cli.errors import UsageError
from stade_cli.evaluation import blockwise_perplexity, perplexity

runner = CliRunner()
DATA = ["--dataset", "builtin", "--nsamples", 4, "--seqlen", 32]


def run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def budget(model_dir: Path) -> str:
    """A CPU budget of about half the weights: accelerate must put the rest on disk."""
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return f"cpu={size // 2}"


@pytest.fixture(scope="module")
def deep_llama(tiny_factory):
    """Four blocks (so a device map can split them) and tied embeddings (as SmolLM2 has)."""
    return tiny_factory("llama", num_hidden_layers=4, tie_word_embeddings=True)


def test_budget_puts_blocks_on_disk(deep_llama, tmp_path):
    model = load_model(resolve_model(str(deep_llama)), torch.device("cpu"), torch.float32,
                       Placement(max_memory=budget(deep_llama), offload_dir=tmp_path / "off"))
    where = set(model.hf_device_map.values())
    assert "disk" in where and "cpu" in where, model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())     # really offloaded


@pytest.mark.versions
def test_calibrate_offloaded_equals_in_memory(deep_llama, tmp_path):
    run("calibrate", deep_llama, "-o", tmp_path / "mem", *DATA)
    r = run("calibrate", deep_llama, "-o", tmp_path / "off", *DATA, "--max-memory", budget(deep_llama),
            "--offload-dir", tmp_path / "od")
    assert "on disk" in r.stderr                                         # the log says where the blocks went
    a, b = load_file(tmp_path / "mem" / "moments.safetensors"), load_file(tmp_path / "off" / "moments.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert manifest["placement"]["device_map"] == "auto"
    assert not list((tmp_path / "od").glob("stade-hidden-*"))          # spilled inputs cleaned up


@pytest.mark.versions
@pytest.mark.parametrize("metric", ["wanda", "stade", "sparsegpt"])
def test_sequential_offloaded_equals_in_memory(deep_llama, tmp_path, metric):
    run("prune", deep_llama, "--metric", metric, "--sequential", *DATA, "-o", tmp_path / "mem")
    run("prune", deep_llama, "--metric", metric, "--sequential", *DATA, "-o", tmp_path / "off",
        "--max-memory", budget(deep_llama), "--offload-dir", tmp_path / "od", "--spill", "disk")
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "off" / "stade_report.json").read_text())
    assert report["mode"] == "sequential" and report["stats"]["sequential"]["placement"]["spill"] == "disk"


@pytest.mark.versions
def test_eval_offloaded_equals_in_memory(deep_llama, tmp_path):
    args = ["eval", deep_llama, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 6, "--json"]
    mem = json.loads(run(*args).stdout)
    off = json.loads(run(*args, "--max-memory", budget(deep_llama), "--offload-dir", tmp_path / "od").stdout)
    assert off["nll"] == pytest.approx(mem["nll"], rel=1e-6)
    assert off["placement"]["device_map"] == "auto" and "placement" not in mem


@pytest.mark.versions
def test_streamed_blocks_equal_in_memory(deep_llama, tmp_path):
    """--device-map stream: every block read from the checkpoint's own shards when it runs (nothing copied to the
    offload folder); calibrate, sequential prune and eval give the in-memory results exactly."""
    off = tmp_path / "od"
    run("calibrate", deep_llama, "-o", tmp_path / "mem", *DATA)
    r = run("calibrate", deep_llama, "-o", tmp_path / "st", *DATA, "--device-map", "stream", "--offload-dir", off)
    assert "0 modules on cpu" not in r.stderr and "4 modules on disk" in r.stderr
    a, b = load_file(tmp_path / "mem" / "moments.safetensors"), load_file(tmp_path / "st" / "moments.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["placement"]["device_map"] == "stream"
    run("prune", deep_llama, "--metric", "wanda", "--sequential", *DATA, "-o", tmp_path / "p-mem")
    run("prune", deep_llama, "--metric", "wanda", "--sequential", *DATA, "-o", tmp_path / "p-st", "--device-map",
        "stream")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("p-mem", "p-st"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    args = ["eval", deep_llama, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 4, "--json"]
    assert json.loads(run(*args, "--device-map", "stream").stdout)["nll"] == pytest.approx(
        json.loads(run(*args).stdout)["nll"], rel=1e-6)
    model = load_model(resolve_model(str(deep_llama)), torch.device("cpu"), torch.float32,
                       Placement("stream", offload_dir=off))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert not any(f.is_file() for f in off.rglob("*"))              # the shards are read where they are


def test_a_model_that_does_not_fit_is_streamed_or_refused(deep_llama, tmp_path, monkeypatch):
    """Weights above half the free memory: the blocks are streamed, and the log says so and what to pass instead;
    one block and the embeddings above the free memory: refused before any work, with what to pass."""
    import stade_cli.loading as loading

    weights = sum(f.stat().st_size for f in deep_llama.glob("*.safetensors"))
    monkeypatch.setattr(loading, "available_bytes", lambda device: weights)         # the model needs it all
    r = run("calibrate", deep_llama, "-o", tmp_path / "s", *DATA)
    assert "the blocks are read from the checkpoint one at a time" in r.stderr and "--device-map stream" in r.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["placement"]["device_map"] == "stream"
    monkeypatch.setattr(loading, "available_bytes", lambda device: 1000)
    r = run("eval", deep_llama, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 2, code=1)
    assert "one block and the embeddings take" in r.stderr and "--dtype bfloat16" in r.stderr


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "mistral", "gemma", "gemma3", "gpt_oss", "mixtral",
                                  "deepseek_v3"])
def test_blockwise_perplexity_equals_plain_forward(tiny_factory, arch):
    """The head replay (final hidden states through the model's own norm and LM head) is exact per architecture,
    and so is every block's input: Gemma 3 and gpt-oss alternate sliding-window and full attention (windows of 16
    tokens here, shorter than the 24-token windows), each kind with its own mask (and rotary embeddings, Gemma 3)."""
    source = resolve_model(str(tiny_factory(arch)))
    model = load_model(source, torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 384, (5, 24), generator=torch.Generator().manual_seed(0))
    plain = perplexity(model, windows, torch.device("cpu"), batch_size=2)
    blocks = blockwise_perplexity(model, describe(model), windows, torch.device("cpu"), batch_size=2)
    assert blocks[1] == plain[1]
    assert blocks[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("fails,used,logged", [((), "tensor", False), (("tensor",), "tuple", False),
                                                 (("tensor", "tuple"), "first", True)])
def test_block_arguments_are_captured_whichever_way_the_models_loop_passes_hidden_states_on(tiny_factory,
                                                                                            monkeypatch, fails,
                                                                                            used, logged):
    """A loop that cannot take a stand-in's output as it is (``h = layer(h)[0]``, older transformers) gets it as a
    1-tuple; one that takes neither gets block 0's arguments for every block, and the log says so. Gemma 3's
    blocks differ in kind, so only the first two ways are exact there: the perplexity of the first is checked."""
    from stade_cli.runtime import Reporter

    model = load_model(resolve_model(str(tiny_factory("gemma3"))), torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 384, (3, 24), generator=torch.Generator().manual_seed(0))
    original = BlockRunner._arguments
    tried = []

    def arguments(self, ids, dev, way):
        tried.append(way)
        if way in fails:
            raise TypeError("this loop cannot pass that on")
        return original(self, ids, dev, way)

    monkeypatch.setattr(BlockRunner, "_arguments", arguments)
    lines = []

    class Log(Reporter):
        def log(self, message):
            lines.append(message)

    with BlockRunner(model, describe(model), windows, torch.device("cpu"), 1, reporter=Log()) as runner:
        assert len(runner.block_kwargs) == 4 and all(len(k) == 3 for k in runner.block_kwargs)
        first_sliding, first_full = runner.block_kwargs[0][0], runner.block_kwargs[1][0]
        same = all(first_full[k] is first_sliding[k] for k in first_full)
    assert tried == [*fails, used] + [used] * 2         # a way that failed is not tried again for the next windows
    assert same == (used == "first")                     # the first way gives every block block 0's arguments
    assert any("every block gets the first block's arguments" in line for line in lines) == logged
    if used != "first":
        plain = perplexity(model, windows, torch.device("cpu"), batch_size=1)
        blocks = blockwise_perplexity(model, describe(model), windows, torch.device("cpu"), batch_size=1)
        assert blocks[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-7)


def test_stats_from_before_each_block_had_its_own_arguments_are_refused_for_alternating_attention(tiny_factory,
                                                                                                   tmp_path):
    """Stats written before the fix above (no ``block_arguments`` in the manifest) are refused for a model whose
    blocks alternate kinds of attention (Gemma 3), with the way out; a model with one kind still takes them."""
    for arch, alternates in (("gemma3", True), ("llama", False)):
        model, stats = tiny_factory(arch), tmp_path / f"stats-{arch}"
        run("calibrate", model, "-o", stats, "--dataset", "builtin", "--nsamples", 4, "--seqlen", 24)
        manifest = json.loads((stats / "manifest.json").read_text())
        assert manifest["block_arguments"] == "each block its own"
        run("prune", model, "--stats", stats, "--metric", "wanda", "-o", tmp_path / f"new-{arch}")
        del manifest["block_arguments"]
        (stats / "manifest.json").write_text(json.dumps(manifest))
        out = tmp_path / f"old-{arch}"
        r = run("prune", model, "--stats", stats, "--metric", "wanda", "-o", out, code=1 if alternates else 0)
        if alternates:
            assert "alternate sliding_attention and full_attention attention" in r.stderr
            assert "re-run `stade calibrate` with this version" in r.stderr and not out.exists()


def test_spilled_inputs_equal_device_inputs(tiny_llama, tmp_path):
    model = load_model(resolve_model(str(tiny_llama)), torch.device("cpu"), torch.float32)
    arch = describe(model)
    windows = torch.randint(0, 384, (3, 16), generator=torch.Generator().manual_seed(1))
    finals = []
    for spill in ("device", "disk"):
        logs: list[str] = []

        class Log:
            def log(self, m):
                logs.append(m)

            def track(self, it, *a, **k):
                return it

        with BlockRunner(model, arch, windows, torch.device("cpu"), 2, Placement(offload_dir=tmp_path, spill=spill),
                         Log()) as r:
            for _, block, dev in r.blocks():
                r.run(block, dev)
            finals.append(r.cache.get(0, 3).clone())
            files = list(tmp_path.glob("stade-hidden-*/*.bin"))
            assert bool(files) == (spill == "disk")
        assert ("memory-mapped on disk" in logs[-1]) == (spill == "disk"), logs
    assert torch.equal(finals[0], finals[1])
    assert not list(tmp_path.glob("stade-hidden-*"))                    # closed: files removed


def test_onloaded_restores_offloaded_modules(deep_llama, tmp_path):
    model = load_model(resolve_model(str(deep_llama)), torch.device("cpu"), torch.float32,
                       Placement(max_memory=budget(deep_llama), offload_dir=tmp_path / "off"))
    block = next(b for n, b in model.named_modules()
                 if n.endswith(".3") and any(p.device.type == "meta" for p in b.parameters()))
    with onloaded(list(block.modules()), torch.device("cpu")):
        assert all(p.device.type == "cpu" for p in block.parameters())
        assert not any(hasattr(m, "_hf_hook") and m._hf_hook.offload for m in block.modules() if list(m.parameters(recurse=False)))
    assert all(p.device.type == "meta" for p in block.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]]))                           # the hooks work again


def test_hidden_cache_size():
    assert HiddenCache.nbytes((4, 8, 16), torch.bfloat16) == 2 * 4 * 8 * 16 * 2


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: 20 * 2**30, "cpu": 64 * 2**30}
    assert parse_max_memory("cuda:1=1000,disk=2GB") == {1: 1000, "disk": 2 * 10**9}
    assert parse_max_memory(None) is None
    for bad in ("cpu", "gpu=1GB", "cpu=lots", "cpu=0"):
        with pytest.raises(UsageError):
            parse_max_memory(bad)


@pytest.mark.parametrize("args,needle", [
    (["--max-memory", "cpu=lots"], "--max-memory size 'lots'"),
    (["--max-memory", "vram=1GB"], "--max-memory device 'vram'"),
    (["--device-map", "everywhere"], "--device-map must be"),
    (["--spill", "tape"], "--spill must be"),
])
def test_bad_placement_is_one_line(tiny_llama, tmp_path, args, needle):
    r = run("calibrate", tiny_llama, "-o", tmp_path / "s", *DATA, *args, code=2)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.cuda
def test_device_map_on_gpu_equals_cpu(deep_llama, tmp_path):
    run("calibrate", deep_llama, "-o", tmp_path / "cpu", *DATA, "--device", "cpu")
    size = sum(f.stat().st_size for f in deep_llama.glob("*.safetensors"))
    # four fifths of the weights on the GPU: the embeddings and a block or two there, the other blocks on the CPU
    r = run("calibrate", deep_llama, "-o", tmp_path / "gpu", *DATA, "--device", "cuda", "--device-map", "auto",
            "--max-memory", f"0={size * 4 // 5},cpu=1GB")
    split = r.stderr.split("device map: ", 1)[-1].splitlines()[0]
    assert "on cuda:0" in split and "on cpu" in split, r.stderr             # really split between the two
    a, b = load_file(tmp_path / "cpu" / "moments.safetensors"), load_file(tmp_path / "gpu" / "moments.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("arch", ["opt", "gemma", "qwen2"])
def test_offloaded_eval_other_architectures(tiny_factory, tmp_path, arch):
    """Disk offload + block-by-block eval on architectures with other heads (OPT's final norm and
    projections, Gemma's scaled embeddings, Qwen2's biases)."""
    model = tiny_factory(arch, num_hidden_layers=4)
    args = ["eval", model, "--dataset", "builtin", "--seqlen", 32, "--max-windows", 4, "--json"]
    mem = json.loads(run(*args).stdout)
    r = run(*args, "--max-memory", budget(model), "--offload-dir", tmp_path / "od")
    assert "on disk" in r.stderr
    assert json.loads(r.stdout)["nll"] == pytest.approx(mem["nll"], rel=1e-6)


def test_offload_dir_keeps_a_users_files(deep_llama, tmp_path):
    """accelerate writes fixed names (index.json, NAME.dat): they go to a new folder of stade's own."""
    od = tmp_path / "od"
    od.mkdir()
    (od / "index.json").write_text('{"mine": true}')
    r = run("calibrate", deep_llama, "-o", tmp_path / "s", *DATA, "--max-memory", budget(deep_llama),
            "--offload-dir", od, "--spill", "disk")
    assert "on disk" in r.stderr
    assert sorted(p.name for p in od.iterdir()) == ["index.json"]
    assert (od / "index.json").read_text() == '{"mine": true}'
    run("calibrate", deep_llama, "-o", od, "--force", *DATA, "--offload-dir", od, code=2)   # an input, not an output
    assert sorted(p.name for p in od.iterdir()) == ["index.json"]


def test_a_budget_that_holds_nothing_says_what_to_pass(tiny_llama, monkeypatch):
    """transformers 4.x refuses a device map with every module on disk ("use the `disk_offload` function", which a
    stade user cannot call): the error says which flags would do."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("You are trying to offload the whole model to the disk. Please use the `disk_offload` "
                         "function instead.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    from stade_cli.errors import ModelError

    with pytest.raises(ModelError) as caught:
        load_model(resolve_model(str(tiny_llama)), torch.device("cpu"), torch.float32,
                   Placement(max_memory="cpu=100KB"))
    assert "offload the whole model to the disk" in caught.value.message
    assert "--device-map stream" in caught.value.hint and "cpu=" in caught.value.hint
