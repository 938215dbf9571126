"""Checkpoints are byte-identical to the ones recorded before the redesign, for every method and pattern.

The fixture depends on nothing but torch's seeded CPU generator and stade's own code: the tiny Llama's
weights and the stats' moments and Gram matrices are overwritten with seeded values (the calibration run
only provides the manifest's layout), so a newer transformers cannot change a hash. Sequential pruning
runs the model forward, so its hashes are compared only under the torch version and the transformers generation
(major version) they were recorded with, to within 1e-5 (a CPU rounds the forward pass its own way).

    python tests/test_identity.py --record     # rewrite tests/identity_hashes.json (only on purpose)
    python tests/test_identity.py --record --values-only   # add the tolerant fingerprints, keep the hashes
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HASHES = Path(__file__).with_name("identity_hashes.json")

ONE_SHOT = {  # name → prune keyword arguments
    **{f"{m} {p}": dict(metric=m, pattern=p, sparsity=None if ":" in p else 0.5)
       for m in ("magnitude", "wanda", "stade", "stadew", "ria", "stochria", "sparsegpt", "dsnot", "r2dsnot")
       for p in ("unstructured", "2:4")},
    "wanda 4:8": dict(metric="wanda", pattern="4:8", sparsity=None),
    "stade 60% layer": dict(metric="stade", sparsity=0.6, group="layer"),
    "wanda 60% layer": dict(metric="wanda", sparsity=0.6, group="layer"),
    "stade no bias correction": dict(metric="stade", bias_correction=False),
    "wanda bias correction": dict(metric="wanda", bias_correction=True),
    "wanda owl": dict(metric="wanda", layer_sparsity="owl", owl_lambda=0.1),
    "stade owl": dict(metric="stade", layer_sparsity="owl", owl_m=3.0),
    "ria alpha 1": dict(metric="ria", options=dict(ria_alpha=1.0)),
    "stochria beta 0.5 seed 3": dict(metric="stochria", options=dict(stoch_beta=0.5, seed=3)),
    "sparsegpt blocksize 16 percdamp 0.05": dict(metric="sparsegpt", options=dict(blocksize=16, percdamp=0.05)),
    "sparsegpt 2:4 blocksize 8": dict(metric="sparsegpt", pattern="2:4", sparsity=None, options=dict(blocksize=8)),
    "dsnot init stade": dict(metric="dsnot", options=dict(init="stade")),
    "dsnot init sparsegpt 2:4": dict(metric="dsnot", pattern="2:4", sparsity=None, options=dict(init="sparsegpt")),
    "dsnot pow 2 threshold 0": dict(metric="dsnot", options=dict(dsnot_pow=2.0, dsnot_threshold=0.0)),
    "r2dsnot gammas": dict(metric="r2dsnot", options=dict(r2_gamma1=0.2, r2_gamma2=0.3, dsnot_cycles=5)),
    "wanda only mlp skip down": dict(metric="wanda", only="mlp", skip="down"),
}
SEQUENTIAL = {f"sequential {m} {p}": dict(metric=m, pattern=p, sparsity=None if ":" in p else 0.5, sequential=True)
              for m in ("wanda", "stade", "sparsegpt") for p in ("unstructured", "2:4")}


def versions() -> dict:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _seeded_model(src: Path, out: Path) -> Path:
    """A copy of the tiny model whose every tensor comes from a seeded generator."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(1234)
    for name in sorted(tensors):
        t = tensors[name]
        if "norm" in name:
            tensors[name] = 1 + 0.5 * torch.rand(t.shape, generator=g, dtype=torch.float32)
        else:
            tensors[name] = 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _seeded_stats(model: Path, out: Path) -> Path:
    """Stats for ``model`` (manifest from a real calibration), moments and Gram matrices from seeded data."""
    from safetensors.torch import save_file

    from stade_cli.calibration.runner import calibrate
    from stade_cli.calibration.store import GRAM_DIR, MOMENTS_FILE, gram_file

    calibrate(str(model), out, dataset="builtin", nsamples=2, seqlen=16, gram=True)
    manifest = json.loads((out / "manifest.json").read_text())
    g = torch.Generator().manual_seed(99)
    moments, grams = {}, {}
    for leader, members in sorted(manifest["shared_inputs"].items()):
        width = manifest["modules"][leader]["in_features"]
        x = torch.randn(64, width, generator=g, dtype=torch.float64) + torch.rand(width, generator=g, dtype=torch.float64)
        for name in members:
            moments[f"{name}.count"] = torch.tensor([64], dtype=torch.int64)
            moments[f"{name}.sum"] = x.sum(0)
            moments[f"{name}.sumsq"] = x.square().sum(0)
        grams.setdefault(manifest["gram"]["blocks"][leader], {})[leader] = x.T @ x
    save_file(moments, out / MOMENTS_FILE, metadata={"format": "stade-stats"})
    for block, tensors in grams.items():
        save_file(tensors, out / GRAM_DIR / gram_file(block), metadata={"format": "stade-stats"})
    return out


def values(path: Path) -> dict:
    """A fingerprint that float32 rounding cannot move but any real change does: the hash of where the zeros
    are, and Σw, Σ|w|, Σw², Σw·r (r seeded) over every tensor in name order, in float64."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    flat = torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])
    r = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zeros = hashlib.sha256((flat == 0).numpy().tobytes()).hexdigest()
    return {"zeros": zeros, "sums": [float(flat.sum()), float(flat.abs().sum()), float(flat.square().sum()),
                                     float(flat @ r)]}


def same_values(a: dict, b: dict, rtol: float = 1e-6) -> bool:
    l1, l2 = a["sums"][1], a["sums"][2]
    scale = [l1, l1, l2, l1]
    return a["zeros"] == b["zeros"] and all(abs(x - y) <= rtol * s for x, y, s in zip(a["sums"], b["sums"], scale))


def _prune(model: Path, stats: Path, out: Path, kwargs: dict) -> Path:
    from stade_cli.pruning import prune

    kwargs = dict(kwargs)
    options = kwargs.pop("options", {})
    prune(str(model), out, stats=stats, device="cpu", options=options, **kwargs)
    return out / "model.safetensors"


def compute(tiny_model: Path, work: Path, cases: dict) -> dict[str, tuple[str, dict]]:
    """name → (sha256 of the checkpoint's weights, values())."""
    model = _seeded_model(tiny_model, work / "model")
    stats = _seeded_stats(model, work / "stats")
    out = {}
    for i, (name, kwargs) in enumerate(cases.items()):
        path = _prune(model, stats, work / f"out-{i}", kwargs)
        out[name] = (hashlib.sha256(path.read_bytes()).hexdigest(), values(path))
    return out


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(HASHES.read_text())


def test_one_shot_checkpoints_are_byte_identical(tiny_llama, tmp_path, recorded):
    """Byte-identical; where a solver's float32 products round differently on this CPU (MKL picks its kernels
    by instruction set: measured, sparsegpt 2:4 with blocksize 8 moves by one ulp between AVX2 and AVX-512), the
    same zeros and the same sums to 1e-6 instead."""
    got = compute(tiny_llama, tmp_path, ONE_SHOT)
    assert set(got) == set(recorded["one_shot"]) == set(recorded["one_shot_values"])
    differ = [name for name, (sha, vals) in got.items() if sha != recorded["one_shot"][name]
              and not same_values(recorded["one_shot_values"][name], vals)]
    assert not differ, f"checkpoints changed: {differ}"
    assert len({sha for sha, _ in got.values()}) > len(got) // 2     # the cases really differ from one another


def test_the_value_fingerprint_sees_a_real_change(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    w[w.abs() < 0.5] = 0
    save_file({"w": w}, tmp_path / "a.safetensors")
    ulp = w.clone()
    ulp[ulp != 0] = torch.nextafter(ulp[ulp != 0], torch.tensor(torch.inf))
    save_file({"w": ulp}, tmp_path / "b.safetensors")
    moved = w.clone()
    moved[3, w[3] != 0] *= 1.001                         # one row's kept weights, 0.1% off
    save_file({"w": moved}, tmp_path / "c.safetensors")
    flipped = w.clone()
    flipped[0, (w[0] != 0).nonzero()[0]] = 0             # one more zero
    save_file({"w": flipped}, tmp_path / "d.safetensors")
    a = values(tmp_path / "a.safetensors")
    assert same_values(a, values(tmp_path / "b.safetensors"))
    assert not same_values(a, values(tmp_path / "c.safetensors"))
    assert not same_values(a, values(tmp_path / "d.safetensors"))


def test_sequential_checkpoints_are_byte_identical(tiny_llama, tmp_path, recorded):
    """As the one-shot ones; the forward pass's float32 rounding differs by CPU too, so the tolerant fingerprint
    allows 1e-5."""
    then, now = recorded["sequential_versions"], versions()
    if now["torch"] != then["torch"] or now["transformers"].split(".")[0] != then["transformers"].split(".")[0]:
        pytest.skip(f"recorded under {then}; another torch or transformers generation computes the forward pass "
                    "otherwise")
    got = compute(tiny_llama, tmp_path, SEQUENTIAL)
    differ = [name for name, (sha, vals) in got.items() if sha != recorded["sequential"][name]
              and not same_values(recorded["sequential_values"][name], vals, rtol=1e-5)]
    assert not differ, (f"checkpoints changed: {differ} (recorded under {then}, run under {now}: where a release of "
                        "a library changed the forward pass's rounding, not stade, re-record with --record)")


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from pydoc_data.topics import topics
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
            vocab_size=384, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp / "tok")
        tiny = build_tiny("llama", tmp / "tiny", tmp / "tok")
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        one_shot, sequential = compute(tiny, tmp / "a", ONE_SHOT), compute(tiny, tmp / "b", SEQUENTIAL)
        record = json.loads(HASHES.read_text()) if HASHES.exists() else {}
        if "--values-only" in sys.argv:      # the tolerant fingerprints, beside hashes recorded before
            record["one_shot_values"] = {name: vals for name, (_, vals) in one_shot.items()}
            record["sequential_values"] = {name: vals for name, (_, vals) in sequential.items()}
        else:
            record = {"one_shot": {name: sha for name, (sha, _) in one_shot.items()},
                      "one_shot_values": {name: vals for name, (_, vals) in one_shot.items()},
                      "sequential": {name: sha for name, (sha, _) in sequential.items()},
                      "sequential_values": {name: vals for name, (_, vals) in sequential.items()},
                      "sequential_versions": versions()}
    HASHES.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"recorded {HASHES}")
