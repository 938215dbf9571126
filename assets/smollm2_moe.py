#!/usr/bin/env python
"""A small mixture of experts whose numbers mean something: SmolLM2-135M-Instruct split into experts (MoEfication).

No trained MoE is small enough to fetch here, so this builds one from the dense SmolLM2 checkpoint that
``../shared/assets/smollm2.sh`` writes (MoEfication, Zhang et al. 2022: an FFN's intermediate neurons split into
experts; with every expert active the layer is the dense one), in the layout of Qwen2-MoE / DeepSeek (a shared
expert beside routed ones):

1. Calibration text (by default the Austen calibration novels) runs through the dense model; each block's MLP
   input X [tokens, hidden] and neuron activations A = silu(X W_gateᵀ) ⊙ (X W_upᵀ) [tokens, intermediate] are kept.
2. The ``--shared`` fraction of neurons that contribute most on average (mean |A_j| · ‖W_down[:, j]‖) becomes the
   shared expert, used by every token. A SwiGLU MLP is not sparse at the granularity of experts (measured here:
   the best 4 of 8 equal groups per token still miss about half of the layer's output), and the shared expert
   keeps the model a usable language model.
3. The other neurons are split into E equal routed experts by balanced spherical k-means on their |activation|
   profiles over the tokens (neurons that fire together go together).
4. The router is linear, as in the model (softmax over the E logits, top-k, renormalised): its logits are a
   ridge regression, on X, of each routed expert's output norm ‖A_e W_down,eᵀ‖ (as good as choosing by the true
   norms to within a few percent of the layer's output, measured), scaled so that the 99th percentile of their
   spread is ``--router-spread`` (small: the renormalised top-k weights stay near 1/k). Each routed expert's down
   projection is multiplied by k and the shared expert's by 2 (its gate is sigmoid(0) = 1/2), so a token's MLP
   output is about the shared part plus the sum of its k experts' outputs; with k = E and a flat router it is
   exactly the dense MLP's.

Written as a Qwen2-MoE checkpoint (per-expert ``mlp.experts.N.{gate,up,down}_proj`` tensors, router ``mlp.gate``,
``mlp.shared_expert``, zero q/k/v biases), with SmolLM2's tokenizer: it loads with ``AutoModelForCausalLM`` under
transformers 4.x and 5.x.

    python assets/smollm2_moe.py [--experts 8] [--top-k 2] [--shared 0.5] [OUT]
        default OUT: ${STADE_ASSETS:-~/.cache/stade-assets}/smollm2-moe; prints OUT when done.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ASSETS = Path(os.environ.get("STADE_ASSETS", Path.home() / ".cache" / "stade-assets"))
AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"


def balanced_kmeans(features, groups: int, iters: int = 25, seed: int = 0):
    """Cluster the rows of ``features`` [n, d] (unit norm) into ``groups`` clusters of n / groups rows each:
    spherical k-means whose assignment fills each cluster greedily by similarity, up to its capacity."""
    import torch

    n = features.shape[0]
    size = n // groups
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=g)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = features @ centroids.T                                   # [n, groups]
        order = torch.argsort(sim.reshape(-1), descending=True)
        taken = torch.zeros(n, dtype=torch.bool)
        load = [0] * groups
        new = torch.empty(n, dtype=torch.long)
        for flat in order.tolist():
            i, c = divmod(flat, groups)
            if taken[i] or load[c] >= size:
                continue
            taken[i] = True
            new[i] = c
            load[c] += 1
            if load == [size] * groups:
                break
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(groups):
            centroids[c] = torch.nn.functional.normalize(features[assign == c].mean(0), dim=0)
    return [torch.nonzero(assign == c).squeeze(1) for c in range(groups)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None)
    p.add_argument("--dense", default=str(ASSETS / "smollm2-135m"), help="the dense SmolLM2 checkpoint")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared", type=float, default=0.5, help="fraction of the neurons in the shared expert")
    p.add_argument("--router-spread", type=float, default=0.2,
                   help="99th percentile of |logit − the token's mean logit| on the calibration tokens")
    p.add_argument("--calib", nargs="+", default=[str(AUSTEN / f) for f in
                                                  ("emma.txt", "mansfieldpark.txt", "sensesensibility.txt")])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = Path(args.dense).expanduser()
    out = Path(args.out or ASSETS / "smollm2-moe").expanduser()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        print(out)
        return 0
    if not (dense / "model.safetensors").is_file():
        raise SystemExit(f"error: no dense SmolLM2 at {dense} (build it with ../shared/assets/smollm2.sh)")
    config = json.loads((dense / "config.json").read_text())
    n_layers, hidden, inter = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    E, k = args.experts, args.top_k
    n_shared = round(inter * args.shared)
    if (inter - n_shared) % E or not 1 <= k <= E:
        raise SystemExit(f"error: {inter - n_shared} routed neurons do not split into {E} experts with top-{k}")

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(dense)
    text = "\n\n".join(Path(f).read_text() for f in args.calib)
    ids = tok(text, return_tensors="pt").input_ids[0]
    starts = torch.randint(0, len(ids) - args.seqlen, (args.windows,), generator=torch.Generator().manual_seed(args.seed))
    windows = torch.stack([ids[s:s + args.seqlen] for s in starts.tolist()])
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    inputs = {i: [] for i in range(n_layers)}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, hidden).clone())) for i in range(n_layers)]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    del model

    weights = load_file(str(dense / "model.safetensors"))
    tensors = {}
    for key, value in weights.items():
        if ".mlp." not in key:
            tensors[key] = value
    for i in range(n_layers):
        x = torch.cat(inputs.pop(i)).double()                               # [tokens, hidden]
        wg, wu, wd = (weights[f"model.layers.{i}.mlp.{p}_proj.weight"].double() for p in ("gate", "up", "down"))
        acts = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)              # [tokens, inter]
        order = (acts.abs().mean(0) * wd.norm(dim=0)).argsort(descending=True)
        shared, routed = order[:n_shared].sort().values, order[n_shared:]
        profile = torch.nn.functional.normalize(acts[:, routed].abs().T.float(), dim=1)   # [routed, tokens]
        groups = [routed[g].sort().values for g in balanced_kmeans(profile, E, seed=args.seed + i)]
        norms = torch.stack([(acts[:, g] @ wd[:, g].T).norm(dim=1) for g in groups], dim=1)   # [tokens, E]
        lam = 1e-3 * float((x * x).sum(0).mean())                           # ridge: a stable fit on few tokens
        router = torch.linalg.solve(x.T @ x + lam * torch.eye(hidden, dtype=x.dtype), x.T @ norms)   # [hidden, E]
        logits = x @ router
        spread = torch.quantile((logits - logits.mean(1, keepdim=True)).abs().reshape(-1).float(), 0.99)
        router = router / float(spread) * args.router_spread
        p = f"model.layers.{i}.mlp"
        tensors[f"{p}.gate.weight"] = router.T.float().contiguous()
        tensors[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, hidden)
        tensors[f"{p}.shared_expert.gate_proj.weight"] = wg[shared].float().contiguous()
        tensors[f"{p}.shared_expert.up_proj.weight"] = wu[shared].float().contiguous()
        tensors[f"{p}.shared_expert.down_proj.weight"] = (wd[:, shared] * 2).float().contiguous()
        for e, g in enumerate(groups):
            tensors[f"{p}.experts.{e}.gate_proj.weight"] = wg[g].float().contiguous()
            tensors[f"{p}.experts.{e}.up_proj.weight"] = wu[g].float().contiguous()
            tensors[f"{p}.experts.{e}.down_proj.weight"] = (wd[:, g] * k).float().contiguous()
        for proj in ("q", "k", "v"):                                        # Qwen2-MoE's q/k/v have biases
            w = weights[f"model.layers.{i}.self_attn.{proj}_proj.weight"]
            tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.zeros(w.shape[0])
        print(f"block {i}: a shared expert of {n_shared} neurons, {E} experts of {len(groups[0])}", file=sys.stderr,
              flush=True)

    moe = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": config["vocab_size"],
           "hidden_size": hidden, "intermediate_size": inter, "moe_intermediate_size": (inter - n_shared) // E,
           "shared_expert_intermediate_size": n_shared, "num_hidden_layers": n_layers,
           "num_attention_heads": config["num_attention_heads"], "num_key_value_heads": config["num_key_value_heads"],
           "hidden_act": config["hidden_act"], "max_position_embeddings": config["max_position_embeddings"],
           "rms_norm_eps": config["rms_norm_eps"],
           "rope_theta": (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)),
           "tie_word_embeddings": config.get("tie_word_embeddings", False), "num_experts": E,
           "num_experts_per_tok": k, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "qkv_bias": True, "use_sliding_window": False, "router_aux_loss_coef": 0.0, "output_router_logits": False,
           "attention_dropout": 0.0, "initializer_range": config.get("initializer_range", 0.02),
           "bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": config.get("pad_token_id"), "torch_dtype": "float32", "use_cache": True}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(moe, indent=2) + "\n")
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
