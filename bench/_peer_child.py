"""Child of bench/peer.py: one llm-compressor oneshot run, in llm-compressor's own virtual environment.

    VENV/bin/python bench/_peer_child.py SPEC.json

SPEC.json: {"model", "calib" (a torch file of input_ids [nsamples, seqlen]), "method" (wanda | sparsegpt),
"sparsity", "mask_structure" ("0:0" unstructured, or "N:M"), "out" (the checkpoint folder to write),
"result" (where this JSON report goes)}. It loads the model in float32 on the CPU, prunes it with
``oneshot`` and ``WandaPruningModifier`` / ``SparseGPTModifier`` on exactly those windows, checks that the
embeddings and lm_head gained no zeros, and saves a dense checkpoint (``save_pretrained``) with the
tokenizer. It imports nothing of stade (stade is not installed here).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# lm_head is a Linear, so the default targets (["Linear"]) include it. In llm-compressor 0.14 each target's
# prunable submodules are named f"{target}.{sub}", which for a Linear target itself is "lm_head." (a trailing
# dot): ignore=["lm_head"] then matches nothing and the head, tied to the input embeddings in many models,
# is pruned. A regex matches the name whatever its suffix.
IGNORE = ["re:.*lm_head.*"]
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def embedding_zeros(model) -> dict:
    """Zero counts of the input embeddings and the output head (one entry when they are tied)."""
    out = {}
    inp, head = model.get_input_embeddings(), model.get_output_embeddings()
    for name, mod in (("embed_tokens", inp), ("lm_head", head)):
        if mod is None:
            continue
        w = mod.weight
        if name == "lm_head" and inp is not None and w.data_ptr() == inp.weight.data_ptr():
            out["lm_head"] = "tied"
            continue
        out[name] = int((w == 0).sum())
    return out


def linear_zeros(model) -> dict:
    import torch

    return {n: int((m.weight == 0).sum()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    versions = {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__}
    for mod in ("transformers", "compressed_tensors", "datasets"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    t_imported = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ids = torch.load(spec["calib"])
    nsamples, seqlen = (int(d) for d in ids.shape)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    emb_before, lin_before = embedding_zeros(model), linear_zeros(model)
    modifier = getattr(pruning, MODIFIERS[spec["method"]])(
        sparsity=spec["sparsity"], mask_structure=spec["mask_structure"], targets=["Linear"], ignore=IGNORE)
    t0, c0 = time.perf_counter(), time.process_time()
    model = oneshot(model=model, processor=tokenizer, dataset=data, recipe=modifier,
                    num_calibration_samples=nsamples, max_seq_length=seqlen, shuffle_calibration_samples=False)
    oneshot_wall, oneshot_cpu = time.perf_counter() - t0, time.process_time() - c0

    emb_after, lin_after = embedding_zeros(model), linear_zeros(model)
    changed = sorted(n for n in lin_after if lin_after[n] != lin_before.get(n))
    grew = {k: [emb_before.get(k), v] for k, v in emb_after.items() if v != emb_before.get(k)}
    if grew:
        raise SystemExit(f"the embeddings gained zeros (before, after): {grew}; the lm_head ignore did not match")
    if not changed:
        raise SystemExit("oneshot pruned no Linear layer")

    out = Path(spec["out"])
    # the class's own save_pretrained: oneshot wraps the instance's to write compressed-tensors configs, which a
    # plain transformers install (stade's) cannot load; this writes ordinary dense safetensors
    type(model).save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    result = {"versions": versions, "nsamples": nsamples, "seqlen": seqlen, "ignore": IGNORE,
              "embedding_zeros": emb_after, "pruned_linears": len(changed),
              "unpruned_linears": sorted(set(lin_after) - set(changed)),
              "oneshot_wall_seconds": round(oneshot_wall, 2), "oneshot_cpu_seconds": round(oneshot_cpu, 2),
              "import_seconds": round(t_imported - t_start, 2),
              "child_wall_seconds": round(time.perf_counter() - t_start, 2)}
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
