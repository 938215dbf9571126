"""Architecture knowledge as data: decoder blocks and the linear layers to prune, found generically.

Blocks are the modules whose class is listed in ``model._no_split_modules`` (what accelerate uses to
place whole blocks on devices); targets are the ``nn.Linear`` modules inside them. Nothing here
branches on model names: per-family facts live in ``QUIRKS``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelError, UsageError

# model_type → facts the generic rules cannot see. Keep this table small; most models need no row.
#   exclude: regexes (on module names) of linears inside blocks that must never be pruned.
QUIRKS: dict[str, dict] = {
    # Mixture-of-experts routers are linears inside blocks but are tiny and decide routing: keep them dense.
    "mixtral": {"exclude": [r"\.gate$"]},
    "qwen2_moe": {"exclude": [r"\.gate$", r"shared_expert_gate$"]},
}


@dataclass(frozen=True)
class Target:
    """One prunable linear layer."""

    name: str          # module name, e.g. "model.layers.3.mlp.down_proj"
    block: int         # index of its decoder block
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"


@dataclass
class Architecture:
    model_type: str
    blocks: list[str]                      # module names of the decoder blocks, in order
    targets: dict[str, Target] = field(default_factory=dict)   # by module name, in model order
    # config flag → linears that gain a bias when it is turned on (see bias_flag_table), when known
    bias_flags: dict[str, list[str]] | None = None

    def by_weight_key(self) -> dict[str, Target]:
        return {t.weight_key: t for t in self.targets.values()}

    def role(self, name: str) -> str:
        """A target's name inside its block (``self_attn.q_proj``): the same in every block, a heat map's column."""
        prefix = self.blocks[self.targets[name].block] + "."
        return name[len(prefix):] if name.startswith(prefix) else name

    def block(self, index: int) -> "Architecture":
        """The same description restricted to decoder block ``index``."""
        return Architecture(self.model_type, [self.blocks[index]],
                            {n: t for n, t in self.targets.items() if t.block == index}, self.bias_flags)

    def to_data(self) -> dict:
        """A JSON-able description (stored with calibration stats, so prune need not rebuild the model)."""
        return {"format": DATA_FORMAT, "model_type": self.model_type, "blocks": self.blocks,
                "targets": [[t.name, t.block, t.in_features, t.out_features, t.has_bias]
                            for t in self.targets.values()],
                "bias_flags": self.bias_flags}

    @classmethod
    def from_data(cls, data, only: str | None = None, skip: str | None = None) -> "Architecture | None":
        """The description ``to_data`` wrote, filtered by --only/--skip; None if absent or of another format."""
        if not isinstance(data, dict) or data.get("format") != DATA_FORMAT:
            return None
        keep = target_filter(only, skip)
        targets = {name: Target(name, block, fan_in, fan_out, bool(bias))
                   for name, block, fan_in, fan_out, bias in data["targets"] if keep(name)}
        return cls(data["model_type"], list(data["blocks"]), targets, data.get("bias_flags"))


DATA_FORMAT = 1       # of Architecture.to_data; a change of the rules in describe() must bump it


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
    """name → whether --only/--skip keep that linear."""
    only_re, skip_re = compile_filters(only, skip)
    return lambda name: (not only_re or only_re.search(name)) and not (skip_re and skip_re.search(name))


def describe(model: nn.Module, only: str | None = None, skip: str | None = None) -> Architecture:
    """Blocks and target linears of ``model`` (a real or meta-device model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    quirk_excludes = [re.compile(p) for p in QUIRKS.get(model_type, {}).get("exclude", [])]
    keep = target_filter(only, skip)
    blocks = decoder_blocks(model)
    arch = Architecture(model_type=model_type, blocks=[n for n, _ in blocks])
    for index, (block_name, block) in enumerate(blocks):
        for sub_name, mod in block.named_modules():
            if not isinstance(mod, nn.Linear) or not sub_name:
                continue
            name = f"{block_name}.{sub_name}"
            if any(p.search(name) for p in quirk_excludes) or not keep(name):
                continue
            arch.targets[name] = Target(name, index, mod.in_features, mod.out_features, mod.bias is not None)
    return arch


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


def bias_switches(table: dict[str, list[str]], model_type: str, needed: set[str]) -> tuple[dict[str, bool], set[str]]:
    """Config flags of ``table`` (``bias_flag_table``: flag → the linears it gives a bias) to turn on so that
    every linear named in ``needed`` has a bias. Returns the flags and every linear that gains a bias
    through them (the siblings get zero biases). Raises if ``needed`` cannot be covered.
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
                         f"({len(missing)} layer(s) in all), which bias correction needs",
                         "pass --no-bias-correction, or --skip those layers")
    return flags, gained
