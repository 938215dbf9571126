"""Architecture knowledge as data: decoder blocks, the matrices to prune, and mixtures of experts.

Blocks are the modules whose class is listed in ``model._no_split_modules`` (what accelerate uses to
place whole blocks on devices). A **target** is one [out, in] matrix wherever it lives: an ``nn.Linear``,
one expert's tensor on disk (Mixtral ``experts.3.w1.weight``), or one expert's slice of a fused 3-D tensor
(Granite-MoE ``input_linear.weight`` [E, out, in], GPT-OSS ``gate_up_proj`` [E, in, out]). Targets are named
as the checkpoint names them, so stats made under transformers 4.x (experts as linears) and 5.x (experts as
fused 3-D parameters of one module) agree. Nothing here branches on model names: per-family facts live in
the tables below.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import ModelError, UsageError

# model_type → facts the generic rules cannot see. Keep this table small; most models need no row.
#   exclude: regexes (on module names) of matrices inside blocks that must never be pruned.
QUIRKS: dict[str, dict] = {
    # the shared expert's scalar gate decides how much of it is mixed in: tiny and decisive, kept dense
    "qwen2_moe": {"exclude": [r"shared_expert_gate$"]},
}

# Mixtures of experts, as data. The config keys that say how many experts there are and how many each token
# uses (the first present wins), and the names of per-expert tensors on disk where shapes cannot tell
# (hidden == intermediate width): which half of a fused gate_up each one is, and which reads the expert's
# intermediate activation.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERT_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k")
GATE_NAMES = ("w1", "gate_proj")          # the first half of a fused [gate; up] projection
UP_NAMES = ("w3", "up_proj")              # the second half
DOWN_NAMES = ("w2", "down_proj", "output_linear")
ROUTER_NAME = re.compile(r"(gate|router)")
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.)(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")


@dataclass(frozen=True)
class Target:
    """One prunable [out, in] matrix."""

    name: str          # a linear's module name ("model.layers.3.mlp.down_proj"), or "KEY[e]" for an expert's slice
    block: int         # index of its decoder block
    in_features: int
    out_features: int
    has_bias: bool     # a bias tensor NAME.bias exists (never for slices: they cannot take a bias correction)
    key: str = ""      # the checkpoint tensor that holds it ("" → NAME.weight)
    index: int | None = None   # its slice along dim 0 of that tensor (experts stored fused, 3-D)
    transposed: bool = False   # stored [in, out] (GPT-OSS, Llama 4)
    expert: int | None = None  # which expert of its block's mixture it belongs to

    @property
    def weight_key(self) -> str:
        return self.key or f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    @property
    def fused(self) -> bool:
        """Stored as a slice of a tensor that holds several experts."""
        return self.index is not None

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's [out, in] matrix from its checkpoint tensor (a contiguous copy for slices)."""
        t = tensor[self.index] if self.index is not None else tensor
        return (t.T if self.transposed else t).contiguous() if (self.index is not None or self.transposed) else t

    def store(self, tensor: torch.Tensor, matrix: torch.Tensor) -> None:
        """Write an [out, in] ``matrix`` back into its place in the checkpoint ``tensor`` (in place)."""
        into = tensor[self.index] if self.index is not None else tensor
        into.copy_(matrix.T if self.transposed else matrix)


@dataclass(frozen=True)
class Place:
    """Where a target lives in a loaded model: ``module.param`` (its slice ``index``; the rows ``rows`` of the
    [out, in] view; stored transposed), so ``--sequential`` can write a pruned matrix back."""

    module: str
    param: str = "weight"
    index: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False

    def view(self, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        return self.within(getattr(modules[self.module], self.param))

    def within(self, t: torch.Tensor) -> torch.Tensor:
        """The target's [out, in] view of ``t``, a tensor shaped like the parameter that holds it."""
        t = t[self.index] if self.index is not None else t
        t = t.T if self.transposed else t
        return t[self.rows[0]:self.rows[1]] if self.rows is not None else t


@dataclass(frozen=True)
class MoE:
    """One block's mixture of experts, in checkpoint terms (what prune needs, from stats or from the config)."""

    block: int
    num_experts: int
    top_k: int
    inputs: tuple[tuple[str, ...], ...]      # per expert: its targets that read the tokens routed to it
    middles: tuple[tuple[str, ...], ...]     # per expert: its targets that read its intermediate activation
    router: tuple[str, ...] = ()             # checkpoint keys whose rows are the experts (router weight, biases)
    prefix: str = ""                         # per-expert tensors: every key of expert e starts with PREFIX + "e."
    fused: tuple[str, ...] = ()              # tensors holding every expert along dim 0 (weights and biases)
    module: str = ""                         # the loaded model's experts module (not stored: per transformers version)
    fused_runtime: bool = False              # that module holds them as 3-D parameters (transformers ≥ 5)

    def members(self, e: int) -> tuple[str, ...]:
        return self.inputs[e] + self.middles[e]

    def to_data(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "inputs": [list(x) for x in self.inputs],
                "middles": [list(x) for x in self.middles], "router": list(self.router), "prefix": self.prefix,
                "fused": list(self.fused)}

    @classmethod
    def from_data(cls, block: int, d: dict) -> "MoE":
        return cls(block, int(d["num_experts"]), int(d["top_k"]), tuple(tuple(x) for x in d["inputs"]),
                   tuple(tuple(x) for x in d["middles"]), tuple(d["router"]), d.get("prefix", ""),
                   tuple(d.get("fused", ())))


@dataclass
class Architecture:
    model_type: str
    blocks: list[str]                      # module names of the decoder blocks, in order
    targets: dict[str, Target] = field(default_factory=dict)   # by name, in model order
    # config flag → linears that gain a bias when it is turned on (see bias_flag_table), when known
    bias_flags: dict[str, list[str]] | None = None
    experts: dict[int, MoE] = field(default_factory=dict)      # by block: its mixture of experts
    dense: tuple[str, ...] = ()            # checkpoint keys inside blocks known to stay dense (routers, ...)
    skipped: tuple[str, ...] = ()          # checkpoint keys of targets --only/--skip left out
    places: dict[str, Place] = field(default_factory=dict)     # in a loaded model (describe of a model only)

    def by_key(self) -> dict[str, list[Target]]:
        """checkpoint tensor → the targets it holds (one, or one per expert for a fused tensor)."""
        out: dict[str, list[Target]] = {}
        for t in self.targets.values():
            out.setdefault(t.weight_key, []).append(t)
        return out

    def role(self, name: str) -> str:
        """A target's name inside its block (``self_attn.q_proj``): the same in every block, a heat map's column."""
        prefix = self.blocks[self.targets[name].block] + "."
        return name[len(prefix):] if name.startswith(prefix) else name

    def block(self, index: int) -> "Architecture":
        """The same description restricted to decoder block ``index``."""
        return dataclasses.replace(self, blocks=[self.blocks[index]],
                                   targets={n: t for n, t in self.targets.items() if t.block == index},
                                   experts={b: m for b, m in self.experts.items() if b == index})

    def filtered(self, only: str | None = None, skip: str | None = None) -> "Architecture":
        """The targets --only/--skip keep (the others are remembered in ``skipped``)."""
        keep = target_filter(only, skip)
        kept = {n: t for n, t in self.targets.items() if keep(n)}
        gone = tuple(dict.fromkeys(t.weight_key for n, t in self.targets.items() if n not in kept))
        return dataclasses.replace(self, targets=kept, skipped=self.skipped + gone)

    def expert_of(self, name: str) -> tuple[MoE, int, str] | None:
        """(the mixture, the expert, "input" or "middle") of an expert's target; None for other targets."""
        t = self.targets.get(name)
        if t is None or t.expert is None or t.block not in self.experts:
            return None
        moe = self.experts[t.block]
        return moe, t.expert, "input" if name in moe.inputs[t.expert] else "middle"

    def to_data(self) -> dict:
        """A JSON-able description (stored with calibration stats, so prune need not rebuild the model)."""
        return {"format": DATA_FORMAT, "model_type": self.model_type, "blocks": self.blocks,
                "targets": [[t.name, t.block, t.in_features, t.out_features, t.has_bias, t.key, t.index,
                             t.transposed, t.expert] for t in self.targets.values()],
                "bias_flags": self.bias_flags,
                "experts": {str(b): m.to_data() for b, m in self.experts.items()},
                "dense": list(self.dense)}

    @classmethod
    def from_data(cls, data, only: str | None = None, skip: str | None = None) -> "Architecture | None":
        """The description ``to_data`` wrote, filtered by --only/--skip; None if absent or of another format."""
        if not isinstance(data, dict) or data.get("format") != DATA_FORMAT:
            return None
        targets = {name: Target(name, block, fan_in, fan_out, bool(bias), key, index, bool(tr), expert)
                   for name, block, fan_in, fan_out, bias, key, index, tr, expert in data["targets"]}
        experts = {int(b): MoE.from_data(int(b), m) for b, m in (data.get("experts") or {}).items()}
        whole = cls(data["model_type"], list(data["blocks"]), targets, data.get("bias_flags"), experts,
                    tuple(data.get("dense", ())))
        return whole.filtered(only, skip)


DATA_FORMAT = 2       # of Architecture.to_data; a change of the rules in describe() must bump it


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks, in order: modules of a ``_no_split_modules`` class sitting in a ModuleList."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [(name, mod) for name, mod in model.named_modules()
              if type(mod).__name__ in classes and re.search(r"\.\d+$", name)]
    if not blocks:  # fall back to the longest ModuleList of identical modules
        lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
        lists = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1]
        if not lists:
            raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}")
        name, mod = max(lists, key=lambda nm: len(nm[1]))
        blocks = [(f"{name}.{i}", child) for i, child in enumerate(mod)]
    return blocks


def compile_filters(only: str | None, skip: str | None):
    try:
        only_re = re.compile(only) if only else None
        skip_re = re.compile(skip) if skip else None
    except re.error as exc:
        raise UsageError(f"bad regular expression in --only/--skip: {exc}") from None
    return only_re, skip_re


def target_filter(only: str | None, skip: str | None):
    """name → whether --only/--skip keep that target."""
    only_re, skip_re = compile_filters(only, skip)
    return lambda name: bool((not only_re or only_re.search(name)) and not (skip_re and skip_re.search(name)))


HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd")      # the residual stream's width, by family
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# a dense MLP, by family: the linears whose rows are its channels, the one whose columns are, the config's width
MLP_PRODUCERS = ("gate_proj", "up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h")
MLP_CONSUMERS = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h")
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
# linears of one block that read the same tensor, by name (before a calibration has found them by identity)
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj", "w1", "w3"})


def config_value(config, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` that the config (or its text part) sets to a positive integer."""
    for c in (config, getattr(config, "text_config", None)):
        for key in keys:
            value = getattr(c, key, None) if c is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# ------------------------------------------------------------------------------------------------ describe
def describe(model: nn.Module, only: str | None = None, skip: str | None = None,
             disk: Mapping[str, tuple] | None = None) -> Architecture:
    """Blocks and targets of ``model`` (a real or meta-device model), filtered by --only/--skip.

    ``disk``: the checkpoint's tensor shapes by key (``checkpoint.tensor_shapes``). Experts held as fused 3-D
    parameters at run time (transformers ≥ 5) are named as the checkpoint stores them: one target per
    per-expert tensor, or per slice of a fused tensor. Without ``disk`` they are taken to be stored as loaded.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    quirks = [re.compile(p) for p in QUIRKS.get(model_type, {}).get("exclude", [])]
    hidden = config_value(config, HIDDEN_SIZE_KEYS)
    top_k = config_value(config, EXPERT_TOP_K_KEYS) or 1
    blocks = decoder_blocks(model)
    arch = Architecture(model_type=model_type, blocks=[n for n, _ in blocks])
    dense: list[str] = []
    for index, (block_name, block) in enumerate(blocks):
        block_keys = {k: tuple(s) for k, s in (disk or {}).items() if k.startswith(block_name + ".")}
        containers = _expert_containers(block)
        routers = _runtime_routers(block, containers)
        inside_fused = {f"{block_name}.{sub}" for sub, _, kind in containers if kind == "fused"}
        listed: dict[str, tuple[int, str]] = {}       # linear name → (expert, container path)
        for sub, mod, kind in containers:
            if kind == "list":
                for e, child in enumerate(mod):
                    for s, m in child.named_modules():
                        if isinstance(m, nn.Linear):
                            listed[f"{block_name}.{sub}.{e}.{s}"] = (e, f"{block_name}.{sub}")
        for sub_name, mod in block.named_modules():
            if not isinstance(mod, nn.Linear) or not sub_name:
                continue
            name = f"{block_name}.{sub_name}"
            if any(name.startswith(f + ".") for f in inside_fused):
                continue
            if sub_name in routers or any(p.search(name) for p in quirks):
                dense.append(f"{name}.weight")
                continue
            expert = listed.get(name, (None, ""))[0]
            arch.targets[name] = Target(name, index, mod.in_features, mod.out_features, mod.bias is not None,
                                        expert=expert)
            arch.places[name] = Place(name)
        for sub, mod, kind in containers:
            path = f"{block_name}.{sub}"
            if kind == "list":
                arch.experts[index] = _listed_moe(index, path, len(mod), top_k, hidden, arch.targets, listed)
            else:
                moe = _fused_moe(index, path, mod, top_k, block_keys if disk is not None else None, arch)
                arch.experts[index] = moe
        if index in arch.experts and disk is not None:
            arch.experts[index] = _with_disk_router(arch.experts[index], block_keys, arch, hidden)
        dense += list(arch.experts[index].router) if index in arch.experts else []
        dense += [k for k in block_keys if any(p.search(k.rsplit(".", 1)[0]) for p in quirks)]
    for moe in arch.experts.values():   # expert biases held fused are known, not targets
        dense += [k for k in moe.fused if k not in {t.weight_key for t in arch.targets.values()}]
    arch.dense = tuple(dict.fromkeys(dense))
    return arch.filtered(only, skip)


def _expert_containers(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The modules of ``block`` that hold experts: ("path", module, "fused") for a module with 3-D expert
    parameters (transformers ≥ 5's experts interface), ("path", module list, "list") for a list of expert MLPs."""
    found = []
    for sub, mod in block.named_modules():
        if not sub:
            continue
        params = dict(mod.named_parameters(recurse=False))
        down = params.get("down_proj")
        up = params.get("gate_up_proj", params.get("up_proj"))
        if down is not None and up is not None and down.dim() == 3 and up.dim() == 3:
            found.append((sub, mod, "fused"))
        elif (isinstance(mod, nn.ModuleList) and sub.rsplit(".", 1)[-1] == "experts" and len(mod) > 1
              and len({type(c) for c in mod}) == 1 and any(isinstance(m, nn.Linear) for m in mod[0].modules())):
            found.append((sub, mod, "list"))
    return found


def _runtime_routers(block: nn.Module, containers) -> set[str]:
    """Linears of ``block`` (paths inside it) that route tokens to experts, never pruned: beside an experts
    container, outside it, named gate or router, with one output per expert."""
    routers = set()
    for sub, mod, kind in containers:
        parent = sub.rpartition(".")[0]
        n = len(mod) if kind == "list" else int(mod.down_proj.shape[0])
        owner = block.get_submodule(parent) if parent else block
        for s, m in owner.named_modules():
            full = f"{parent}.{s}" if parent else s
            if (s and isinstance(m, nn.Linear) and not full.startswith(sub + ".") and m.out_features == n
                    and ROUTER_NAME.search(s)):
                routers.add(full)
    return routers


def _side(proj: str, out_features: int, in_features: int, hidden: int | None) -> str:
    """Whether an expert's [out, in] matrix reads the expert's input ("input") or its intermediate ("middle")."""
    if hidden is not None and in_features != out_features:
        if in_features == hidden:
            return "input"
        if out_features == hidden:
            return "middle"
    return "middle" if proj in DOWN_NAMES else "input"


def _listed_moe(block: int, path: str, n: int, top_k: int, hidden, targets: dict[str, Target],
                listed: dict[str, tuple[int, str]]) -> MoE:
    inputs: list[list[str]] = [[] for _ in range(n)]
    middles: list[list[str]] = [[] for _ in range(n)]
    for name, (e, container) in listed.items():
        if container != path or name not in targets:
            continue
        t = targets[name]
        side = _side(name.rsplit(".", 1)[-1], t.out_features, t.in_features, hidden)
        (inputs if side == "input" else middles)[e].append(name)
    return MoE(block, n, min(top_k, n), tuple(map(tuple, inputs)), tuple(map(tuple, middles)), prefix=path + ".",
               module=path)


def _fused_moe(block: int, path: str, mod: nn.Module, top_k: int, block_keys: dict | None,
               arch: Architecture) -> MoE:
    """The targets of a fused experts module (3-D parameters), named as the checkpoint stores them."""
    has_gate = bool(getattr(mod, "has_gate", hasattr(mod, "gate_up_proj")))
    up_param = "gate_up_proj" if has_gate else "up_proj"
    tr = bool(getattr(mod, "is_transposed", False))
    concatenated = bool(getattr(mod, "is_concatenated", True))
    w_up, w_down = getattr(mod, up_param), getattr(mod, "down_proj")
    n = int(w_up.shape[0])
    up_out, hid = (w_up.shape[2], w_up.shape[1]) if tr else (w_up.shape[1], w_up.shape[2])
    down_out, mid = (w_down.shape[2], w_down.shape[1]) if tr else (w_down.shape[1], w_down.shape[2])
    params = {up_param: tuple(w_up.shape), "down_proj": tuple(w_down.shape)}
    inputs: list[list[str]] = [[] for _ in range(n)]
    middles: list[list[str]] = [[] for _ in range(n)]
    fused_keys = _fused_on_disk(path, params, block_keys)
    if fused_keys is not None:                               # one 3-D tensor per projection, sliced per expert
        for param, key in fused_keys.items():
            out_f, in_f = (up_out, hid) if param == up_param else (down_out, mid)
            side = inputs if param == up_param else middles
            for e in range(n):
                name = f"{key}[{e}]"
                arch.targets[name] = Target(name, block, int(in_f), int(out_f), False, key, e, tr, e)
                arch.places[name] = Place(path, param, e, None, tr)
                side[e].append(name)
        owners = tuple(k.rsplit(".", 1)[0] + "." for k in fused_keys.values())
        beside = [k for k, s in (block_keys or {}).items()       # their biases: one row per expert too
                  if k.startswith(owners) and s[:1] == (n,) and k not in fused_keys.values()]
        return MoE(block, n, min(top_k, n), tuple(map(tuple, inputs)), tuple(map(tuple, middles)),
                   fused=tuple(dict.fromkeys([*fused_keys.values(), *beside])), module=path, fused_runtime=True)
    # one 2-D tensor per expert and projection (Mixtral, Qwen-MoE, OLMoE, DeepSeek: transformers merges them)
    groups: dict[str, dict[int, dict[str, tuple]]] = {}
    for k, shape in block_keys.items():
        m = _PER_EXPERT.match(k)
        if m and len(shape) == 2:
            groups.setdefault(m["prefix"], {}).setdefault(int(m["e"]), {})[m["proj"]] = shape
    candidates = [p for p, g in groups.items() if set(g) == set(range(n))]
    if len(candidates) != 1:
        raise ModelError(f"cannot tell how the checkpoint stores the {n} experts of {path} "
                         f"({'no' if not candidates else len(candidates)} matching set(s) of per-expert tensors)",
                         "please report this model; --skip cannot help, the experts would stay dense")
    prefix = candidates[0]
    for e in range(n):
        gate_up: list[str] = []
        for proj, (out_f, in_f) in sorted(groups[prefix][e].items()):
            name = f"{prefix}{e}.{proj}"
            side = _side(proj, out_f, in_f, hid)
            has_bias = f"{name}.bias" in block_keys
            arch.targets[name] = Target(name, block, int(in_f), int(out_f), has_bias, expert=e)
            if side == "input":
                inputs[e].append(name)
                gate_up.append(proj)
            else:
                middles[e].append(name)
                arch.places[name] = Place(path, "down_proj", e, None, tr)
        order = [p for p in gate_up if p in GATE_NAMES] + [p for p in gate_up if p in UP_NAMES]
        if has_gate and concatenated and len(order) == 2 == len(gate_up):
            rows = int(up_out) // 2
            for i, proj in enumerate(order):
                arch.places[f"{prefix}{e}.{proj}"] = Place(path, up_param, e, (i * rows, (i + 1) * rows), tr)
        elif not has_gate and len(gate_up) == 1:
            arch.places[f"{prefix}{e}.{gate_up[0]}"] = Place(path, up_param, e, None, tr)
        inputs[e] = [f"{prefix}{e}.{p}" for p in (order if len(order) == len(gate_up) else gate_up)]
    return MoE(block, n, min(top_k, n), tuple(map(tuple, inputs)), tuple(map(tuple, middles)), prefix=prefix,
               module=path, fused_runtime=True)


def _fused_on_disk(path: str, params: dict[str, tuple], block_keys: dict | None) -> dict[str, str] | None:
    """param → the checkpoint key of the 3-D tensor holding it for all experts: the loaded name, or the one
    3-D tensor of the block with its shape (Granite-MoE's ``input_linear.weight``); None when stored per expert."""
    if block_keys is None:
        return {p: f"{path}.{p}" for p in params}
    found: dict[str, str] = {}
    for param, shape in params.items():
        same = f"{path}.{param}"
        if block_keys.get(same) == shape:
            found[param] = same
            continue
        alike = [k for k, s in block_keys.items() if s == shape and k not in found.values()]
        if len(alike) == 1:
            found[param] = alike[0]
    if len(found) == len(params):
        return found
    if found:
        raise ModelError(f"cannot tell which checkpoint tensors hold the experts of {path} "
                         f"(found {', '.join(found.values())} only)", "please report this model")
    return None


def _with_disk_router(moe: MoE, block_keys: dict, arch: Architecture, hidden) -> MoE:
    """The router's checkpoint keys: a 2-D tensor of the block named gate/router with one row per expert, and the
    tensors beside it with one entry per expert (biases, correction biases)."""
    targets = {t.weight_key for t in arch.targets.values()}
    weights = [k for k, s in block_keys.items() if len(s) == 2 and s[0] == moe.num_experts and k not in targets
               and k not in moe.fused and (hidden is None or s[1] == hidden)
               and ROUTER_NAME.search(k.rsplit(".", 1)[0])
               and not (moe.prefix and k.startswith(moe.prefix))]
    router: list[str] = []
    for w in weights:
        owner = w.rsplit(".", 1)[0] + "."
        router += [w] + [k for k, s in block_keys.items() if k != w and k.startswith(owner) and s[:1] == (moe.num_experts,)]
    return dataclasses.replace(moe, router=tuple(dict.fromkeys(router)))


def _pattern(role: str) -> str:
    """A --skip regex for ``role`` in every block and every expert: ``experts\.\d+\.w1``."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in role.split("."))


# ------------------------------------------------------------------------------------------------ coverage
@dataclass(frozen=True)
class Coverage:
    """How much of the decoder blocks' weights the targets are, and what nobody accounts for."""

    target_params: int
    block_params: int
    unknown: tuple[str, ...]     # ≥ 2-D tensors in blocks: neither a target, nor skipped, nor known to stay dense

    @property
    def share(self) -> float:
        return self.target_params / max(self.block_params, 1)

    def line(self) -> str:
        return f"targets: {self.share:.2%} of the decoder blocks' weights"

    def to_data(self) -> dict:
        return {"target_params": self.target_params, "block_params": self.block_params, "share": self.share}


def coverage(arch: Architecture, disk: Mapping[str, tuple], skip: str | None = None) -> Coverage:
    """Coverage of ``arch`` (filtered by --only/--skip) over the checkpoint's tensors ``disk`` (key → shape)."""
    import math

    _, skip_re = compile_filters(None, skip)
    prefixes = tuple(b + "." for b in arch.blocks)
    in_blocks = {k: s for k, s in disk.items() if k.startswith(prefixes)}
    accounted = {t.weight_key for t in arch.targets.values()} | set(arch.skipped) | set(arch.dense)
    unknown = tuple(k for k, s in in_blocks.items() if len(s) >= 2 and k not in accounted
                    and not (skip_re and skip_re.search(k.removesuffix(".weight"))))
    targets = sum(t.in_features * t.out_features for t in arch.targets.values())
    return Coverage(targets, sum(math.prod(s) for s in in_blocks.values()), unknown)


def check_coverage(arch: Architecture, disk: Mapping[str, tuple], skip: str | None = None) -> Coverage:
    """``coverage``, refusing a block tensor that is neither pruned nor known to stay dense (stade would do less
    than it says): one line naming it and the --skip that accepts it."""
    cov = coverage(arch, disk, skip)
    if cov.unknown:
        key = cov.unknown[0]
        block = next(b for b in arch.blocks if key.startswith(b + "."))
        role = key[len(block) + 1:].removesuffix(".weight")
        dims = len(disk[key])
        more = f" ({len(cov.unknown)} such tensors in all)" if len(cov.unknown) > 1 else ""
        raise ModelError(f"{key} ({dims}-D, {'×'.join(map(str, disk[key]))}) is neither a layer stade prunes nor one "
                         f"known to stay dense{more}; stade would leave it dense",
                         f"to accept that, pass --skip '{_pattern(role)}'")
    return cov


def meta_model(config) -> nn.Module:
    """The model's module tree on the meta device: structure without weights, in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
            raise ModelError(f"cannot build a causal LM from this config: {exc}") from None


def context_length(config) -> int:
    """The model's maximum sequence length, from whichever field its config uses."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def bias_flag_table(config) -> dict[str, list[str]]:
    """Config flags that give linears a bias, and the linears each one gives a bias to.

    Found generically: each boolean config field with "bias" in its name that is off (and any flag listed
    in QUIRKS) is tried on a meta-device model; it is kept only if everything it adds is biases of
    linears (Llama's ``attention_bias``/``mlp_bias``, Gemma's ``attention_bias``, ...).
    """
    import copy

    base_model = meta_model(config)
    base_keys = set(base_model.state_dict())
    linears = {name for name, mod in base_model.named_modules() if isinstance(mod, nn.Linear)}
    table: dict[str, list[str]] = {}
    candidates = [k for k, v in sorted(config.to_dict().items()) if "bias" in k and v is False]
    for flag in candidates + QUIRKS.get(config.model_type, {}).get("bias_flags", []):
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        try:
            added = set(meta_model(trial).state_dict()) - base_keys
        except ModelError:
            continue
        owners = {k[: -len(".bias")] for k in added if k.endswith(".bias")}
        if added and len(owners) == len(added) and owners <= linears:
            table[flag] = sorted(owners)
    return table


def bias_switches(table: dict[str, list[str]], model_type: str, needed: set[str],
                  counted: Callable[[list[str]], int] = len) -> tuple[dict[str, bool], set[str]]:
    """Config flags of ``table`` (``bias_flag_table``: flag → the linears it gives a bias) to turn on so that
    every linear named in ``needed`` has a bias. Returns the flags and every linear that gains a bias
    through them (the siblings get zero biases). Raises if ``needed`` cannot be covered, naming the first such
    linear and how many there are (``counted``: of the uncovered names, the layers the output will hold).
    """
    if not needed:
        return {}, set()
    flags: dict[str, bool] = {}
    gained: set[str] = set()
    for flag, owners in table.items():
        if needed <= gained:
            break
        if set(owners) & (needed - gained):
            flags[flag] = True
            gained |= set(owners)
    missing = sorted(needed - gained)
    if missing:
        raise ModelError(f"this {model_type} model cannot hold a bias on {missing[0]} "
                         f"({counted(missing)} layer(s) in all), which bias correction needs",
                         "pass --no-bias-correction, or --skip those layers")
    return flags, gained
