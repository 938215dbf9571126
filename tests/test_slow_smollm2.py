"""On the real SmolLM2-135M checkpoint (../shared/assets/smollm2.sh): Wanda must beat magnitude by far."""
import json

import pytest
from typer.testing import CliRunner

from stade_cli.cli.app import app
from conftest import AUSTEN, ROOT, SMOLLM2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(), reason="SmolLM2 asset absent (shared/assets/smollm2.sh)"),
    pytest.mark.skipif(not (AUSTEN / "prideprejudice.txt").is_file(), reason="Austen texts absent"),
]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_wanda_far_better_than_magnitude(tmp_path):
    calib = ",".join(str(AUSTEN / f) for f in ("emma.txt", "mansfieldpark.txt", "sensesensibility.txt"))
    stats = tmp_path / "stats"
    run("calibrate", SMOLLM2, "-o", stats, "--dataset", calib, "--nsamples", 32, "--seqlen", 512)
    ppl = {}
    for metric in ("magnitude", "wanda"):
        out = tmp_path / metric
        run("prune", SMOLLM2, "--metric", metric, "--sparsity", 0.5, "--stats", stats, "-o", out)
        ppl[metric] = json.loads(run("eval", out, "--dataset", AUSTEN / "prideprejudice.txt", "--seqlen", 512,
                                     "--max-windows", 8, "--json"))["ppl"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl
    assert ppl["wanda"] < 80, ppl


def test_the_moe_built_from_smollm2_is_smollm2_with_every_expert_and_shrinks_by_expert_removal(tmp_path):
    """assets/smollm2_moe.py: with every expert active and a flat router the MoE computes SmolLM2's logits; with
    top-2 routing it is a usable language model; --experts 4 makes it smaller and still usable."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    moe = tmp_path / "moe"
    subprocess.run([sys.executable, str(ROOT / "assets" / "smollm2_moe.py"), str(moe), "--dense", str(SMOLLM2),
                    "--windows", "4"], check=True, capture_output=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in moe.iterdir():
        if f.name != "model.safetensors":
            (flat / f.name).write_bytes(f.read_bytes())
    config = json.loads((moe / "config.json").read_text())
    k, n = config["num_experts_per_tok"], config["num_experts"]
    weights = load_file(str(moe / "model.safetensors"))
    for key in weights:
        if key.endswith("mlp.gate.weight"):
            weights[key] = torch.zeros_like(weights[key])             # every expert weighted 1/E
        elif ".experts." in key and key.endswith("down_proj.weight"):
            weights[key] = weights[key] * (n / k)
    save_file(weights, str(flat / "model.safetensors"), metadata={"format": "pt"})
    (flat / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": n}))
    ids = torch.arange(1, 65)[None]
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(SMOLLM2)(input_ids=ids).logits
        every = AutoModelForCausalLM.from_pretrained(flat)(input_ids=ids).logits
    assert torch.allclose(dense, every, atol=1e-3, rtol=1e-3)
    calib = ",".join(str(AUSTEN / f) for f in ("emma.txt", "mansfieldpark.txt", "sensesensibility.txt"))
    stats = tmp_path / "stats"
    run("calibrate", moe, "-o", stats, "--dataset", calib, "--nsamples", 8, "--seqlen", 256)
    out = tmp_path / "four"
    run("prune", moe, "--stats", stats, "--experts", 4, "-o", out)
    sizes = [sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in (moe, out)]
    assert sizes[1] < 0.9 * sizes[0]
    ppl = [json.loads(run("eval", p, "--dataset", AUSTEN / "prideprejudice.txt", "--seqlen", 512, "--max-windows", 4,
                          "--json"))["ppl"] for p in (moe, out)]
    assert ppl[0] < 80 and ppl[1] < 1.5 * ppl[0], ppl
