"""The plan stage of prune: everything decided and checked before any weight is read, in one immutable Plan.

``check_request`` validates what needs no file at all (method, pattern, options, layer sparsity);
``make_plan`` then reads what is cheap (the stats' manifest and moments, the config or the stats' stored
model description, shard headers) and refuses every impossible combination before the expensive part.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .arch import (Architecture, Coverage, Target, bias_flag_table, bias_switches, check_coverage, context_length,
                   describe, meta_model)
from .calibration.store import Stats, load_stats
from .checkpoint import ModelSource, load_config, tensor_shapes
from .distributed import World
from .errors import ModelError, StatsError, UsageError
from .loading import CalibrationSpec, Placement
from .masks import NM, Pattern, parse_pattern
from .metrics import LayerContext, Metric, build_options, get_metric, get_update, methods
from .refine import RefineOptions
from .runtime import resolve_device


@dataclass(frozen=True)
class PruneRequest:
    """What the user asked for (the library's and the CLI's arguments, unchecked)."""

    model: str
    metric: str | None = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    group: str = "row"
    stats: Path | None = None
    bias_correction: bool | None = None      # None: the method's default
    layer_sparsity: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    sequential: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)   # method options by field name (ria_alpha=...)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    device: str = "auto"
    dtype: str = "auto"
    only: str | None = None
    skip: str | None = None
    placement: Placement | None = None
    update: str = "none"                     # a weight update after the mask (``admm``), or none
    structure: str | None = None             # channels or blocks: a smaller dense model instead of zeros
    experts: int | None = None               # keep this many experts in every MoE block (remove the others)
    expert_score: str = "reap"               # how --experts ranks them: reap, frequency or random
    expert_min_tokens: int = 128             # experts that saw fewer calibration tokens use fallback statistics
    refine: RefineOptions = field(default_factory=RefineOptions)   # --refine: block-wise refinement after the update
    recipe: Mapping[str, Any] | None = None  # --recipe: its name and the flags it stands for (for the report)
    command: str | None = None               # the `stade prune` command that writes the same checkpoint (the card)

    @property
    def unstructured(self) -> bool:
        """Whether weights are zeroed: always, except --experts alone (no --sparsity, no N:M pattern) and
        --structure (which removes them)."""
        return self.structure is None and not (self.experts is not None and self.sparsity is None
                                               and ":" not in self.pattern)

    @property
    def metric_name(self) -> str:
        """The method: as given; by default stade for MLP channels, wanda otherwise."""
        return self.metric or ("stade" if self.structure == "channels" else "wanda")


@dataclass(frozen=True)
class Checked:
    """The request's parts that need no file, parsed and validated."""

    method: Metric
    pattern: Pattern
    options: Mapping[str, Any]       # every method's options dataclass, by method name
    device: torch.device
    update: Metric | None = None

    @property
    def running(self) -> list[Metric]:
        """The methods this request runs: the metric, what it runs itself (DSnoT: its init), the update."""
        return self.method.running(self.options) + ([self.update] if self.update is not None else [])


def reads(req: PruneRequest, checked: Checked) -> tuple[bool, str | None]:
    """What the request reads from the stats, known before any file is read: (moments, what needs Gram matrices or
    None). ``make_plan`` decides with it, and ``stade sweep`` whether to calibrate and with ``--gram``."""
    method, update = checked.method, checked.update
    if req.structure is not None:   # blocks by their change to the input; channels by moments unless by magnitude
        moments = req.structure == "blocks" or method.needs_stats or update is not None
    else:
        moments = method.needs_stats or req.bias_correction is True or req.layer_sparsity == "owl" or update is not None
    moments = moments or req.experts is not None        # experts ranked by what they saw
    gram = None
    if req.structure == "channels" and update is not None:
        gram = "the refit of the kept channels"
    elif req.unstructured:
        gram = next((m.name for m in checked.running if m.needs_gram), None)
    return moments and (req.unstructured or req.experts is not None or req.structure is not None), gram


def check_request(req: PruneRequest) -> Checked:
    method = get_metric(req.metric_name)
    if req.structure is not None:
        _check_structure(req)
    pattern = parse_pattern(req.pattern if req.structure is None else "unstructured",
                            req.sparsity if req.unstructured or req.structure else 0.0, req.group)
    if req.experts is not None:
        from .experts import SCORES

        if req.expert_score not in SCORES:
            raise UsageError(f"--expert-score must be one of {', '.join(SCORES)} (got {req.expert_score})")
        if req.sequential:
            raise UsageError("--experts does not combine with --sequential",
                             "remove the experts first (stade prune M --experts K -o M-K), then prune M-K "
                             "--sequential")
    req.refine.check()
    if req.refine.on:
        if req.experts is not None or req.structure is not None:
            # a recipe's --refine is not a flag the user typed: name the recipe
            refining = f"--recipe {req.recipe['name']}" if req.recipe else "--refine"
            if req.experts is not None:
                other, hint = "--experts", (f"remove the experts first (stade prune M --experts K -o M-K), then "
                                            f"prune M-K with {refining}")
            else:
                other, hint = "--structure", ("--structure removes whole channels or blocks; refit what it keeps "
                                              "with --update admm")
            what = f"{refining} (its --refine {req.refine.steps})" if req.recipe else refining
            raise UsageError(f"{what} does not combine with {other}: it refines the kept weights of zeroed "
                             "(unstructured or N:M) layers", hint)
        if not req.unstructured:
            raise UsageError("--refine needs weights to zero (--sparsity or an N:M --pattern)")
    if req.expert_min_tokens < 0:
        raise UsageError(f"--expert-min-tokens must be at least 0 (got {req.expert_min_tokens})")
    if req.layer_sparsity not in ("uniform", "owl"):
        raise UsageError(f"--layer-sparsity must be uniform or owl (got {req.layer_sparsity})")
    if req.layer_sparsity == "owl":
        if isinstance(pattern, NM):
            raise UsageError("--layer-sparsity owl needs --pattern unstructured (N:M fixes every layer's sparsity)")
        if not 0 <= req.owl_lambda < 0.5:
            raise UsageError(f"--owl-lambda must be in [0, 0.5) (got {req.owl_lambda})")
        if not req.owl_m > 0:
            raise UsageError(f"--owl-m must be positive (got {req.owl_m})")
    options = build_options(req.options, seed=req.calibration.seed)
    running = {m.name for m in method.running(options)}     # it, and what it runs (DSnoT: its init)
    update = get_update(req.update)
    if update is not None:
        running.add(update.name)
        if update.needs_scores(options[update.name]) and method.score is None:
            raise UsageError(f"this use of --update {update.name} re-chooses the mask from the metric's scores, and "
                             f"{method.name} has none (it chooses its own mask)",
                             "use a scoring metric (magnitude, wanda, stade, stadew, ria, stochria)")
    for name, m in methods().items():   # every method's ranges; the pattern only for those that run
        m.validate(options[name], pattern if name in running else None)
    return Checked(method, pattern, options, resolve_device(req.device), update)


def _check_structure(req: PruneRequest) -> None:
    """What --structure allows, in one line each."""
    from .structured.scores import CHANNEL_SCORES

    if req.structure not in ("channels", "blocks"):
        raise UsageError(f"--structure must be channels or blocks (got {req.structure})")
    given = {"--pattern": ":" in req.pattern, "--sequential": req.sequential, "--experts": req.experts is not None,
             "--layer-sparsity owl": req.layer_sparsity != "uniform", "--group layer": req.group != "row",
             "--only/--skip": bool(req.only or req.skip)}
    for flag, on in given.items():
        if on:
            raise UsageError(f"--structure {req.structure} removes whole {req.structure}; {flag} does not combine "
                             "with it")
    if req.sparsity is None:
        raise UsageError(f"--structure {req.structure} needs --sparsity, the fraction to remove, in (0, 1)",
                         f"e.g. --sparsity 0.25 removes a quarter of the {req.structure}")
    if not 0 < req.sparsity < 1:
        raise UsageError(f"--structure {req.structure} removes the fraction --sparsity of the {req.structure}, which "
                         f"must be in (0, 1) (got {req.sparsity:g})",
                         f"e.g. --sparsity 0.25 removes a quarter of the {req.structure}")
    if req.structure == "channels" and req.metric_name not in CHANNEL_SCORES:
        raise UsageError(f"{req.metric_name} has no channel score",
                         f"--structure channels ranks channels by {', '.join(CHANNEL_SCORES)}")
    if req.structure == "blocks" and (req.metric is not None or req.update != "none"):
        raise UsageError("--structure blocks ranks blocks by how little they change their input; "
                         f"{'--metric' if req.metric is not None else '--update'} does not apply")
    if req.update not in ("none", "admm"):
        raise UsageError(f"--structure channels refits the kept channels with --update admm (got {req.update})")


@dataclass(frozen=True)
class Plan:
    """Everything prune decided before reading a weight. The decide and write stages only read it."""

    request: PruneRequest
    source: ModelSource
    files: tuple[str, ...]
    arch: Architecture
    config: Any                          # the model's config, or None when the stats' description stood for it
    method: Metric
    pattern: Pattern
    options: Mapping[str, Any]           # every method's options, by method name
    device: torch.device
    stats: Stats | None                  # the cached stats in use (None: none given, or not needed)
    calibration: CalibrationSpec         # the calibration pass to run (the cache's own, for --sequential)
    calibrate_first: bool                # one-shot without stats, but moments needed: calibrate now
    needs_gram: bool
    bias_table: Mapping[str, list]       # config flag → the linears it gives a bias ({} if none can be needed)
    started: float
    update: Metric | None = None         # the weight update after the mask (--update), or None
    world: World = World()               # the ranks sharing this prune (one process unless launched)
    coverage: Coverage | None = None     # the targets' share of the decoder blocks' weights
    shapes: Mapping[str, tuple] = field(default_factory=dict)   # every checkpoint tensor's shape by key
    config_json: Mapping[str, Any] = field(default_factory=dict)  # config.json as written (--experts, --structure)
    notes: tuple[str, ...] = ()          # what prune chose by itself, said before the work
    refine_windows: CalibrationSpec | None = None   # --refine: the windows it trains on

    def pattern_for(self, target: Target, block_sparsity: Mapping[int, float] | None = None) -> Pattern:
        if block_sparsity is None:
            return self.pattern
        return self.pattern.with_sparsity(block_sparsity[target.block])

    def context(self, name: str, reads_norm: bool) -> LayerContext:
        return LayerContext(name, reads_norm, self.options[self.method.name], self.options)

    def update_context(self, name: str) -> LayerContext | None:
        if self.update is None:
            return None
        return LayerContext(name, False, self.options[self.update.name], self.options)

    def corrects(self, ctx: LayerContext) -> bool:
        bc = self.request.bias_correction
        if bc is None and self.update is not None:
            return False    # measured: after a weight update the bias helps little and can hurt (README)
        return self.method.corrects_bias(ctx) if bc is None else bc

    def roles(self, st: Stats | None) -> dict[str, bool]:
        """Which targets read a normalisation layer's output, as the stats recorded (none without stats)."""
        if st is None:
            return {}
        return {n: bool(st.manifest["modules"].get(n, {}).get("reads_norm", False)) for n in self.arch.targets}


def attention_kinds(model_dir: Path) -> list[str]:
    """The distinct kinds of attention of the model's blocks, in order of first appearance (config.json's
    ``layer_types``, or its text model's): ``["sliding_attention", "full_attention"]`` for Gemma 3; [] when the
    config does not say."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    for c in (config, config.get("text_config") or {}):
        types = c.get("layer_types") if isinstance(c, dict) else None
        if isinstance(types, list) and types:
            return list(dict.fromkeys(str(t) for t in types))
    return []


def make_plan(req: PruneRequest, checked: Checked, source: ModelSource, files: list[str], started: float,
              world: World = World()) -> Plan:
    method, pattern, options = checked.method, checked.pattern, checked.options
    running = checked.running
    needs_moments, gram_for = reads(req, checked)
    given: Stats | None = None
    arch = config = None
    shapes = tensor_shapes(source.path, files)
    if req.stats is not None:
        given = load_stats(Path(req.stats))
        given.check_fingerprint(source.fingerprint)
        # the fingerprint covers config.json: the stats' stored description stands for the model's, and
        # prune from stats needs neither transformers nor a model built on the meta device (seconds saved)
        arch = Architecture.from_data(given.manifest.get("architecture"), req.only, req.skip)
    if arch is None or arch.bias_flags is None:
        config = load_config(source.path)
    if arch is None:
        arch = describe(meta_model(config), only=req.only, skip=req.skip, disk=shapes)
    cov = check_coverage(arch, shapes, req.skip)          # never do less than we say: refused before any work
    _check_keys(arch, shapes)
    if not arch.targets and req.unstructured:
        raise UsageError("no layer left to prune", "check --only/--skip")
    for t in arch.targets.values():
        pattern.check_width(t.in_features, t.name)
    config_json: dict = {}
    notes: list[str] = []
    if req.structure is not None:
        import json

        config_json = json.loads((source.path / "config.json").read_text())
        method, notes = _structure_plan(req, method, arch, config, source, notes)
    if req.experts is not None:
        import json

        from .experts import check_removal, config_entries

        check_removal(arch, req.experts)
        config_json = json.loads((source.path / "config.json").read_text())
        config_entries(config_json, list(arch.experts.values()), req.experts)
        reap = (given.manifest.get("experts") or {}).get("reap") if given is not None else \
            all(m.fused_runtime for m in arch.experts.values()) or None
        if req.expert_score == "reap" and reap is False:
            raise StatsError("--expert-score reap needs the router weights of the tokens each expert saw, which "
                             f"{'these stats do' if given is not None else 'this transformers version does'} not "
                             "record (experts as separate linears: transformers 4.x)",
                             "use --expert-score frequency, or calibrate with transformers 5")
    if req.structure is None:
        bias_table = _bias_table(req, method, options, arch, config, checked.update)
    else:                   # the flags that can give the down projections the folded mean (structured/plan.py)
        bias_table = arch.bias_flags if arch.bias_flags is not None else bias_flag_table(
            config if config is not None else load_config(source.path))

    st = given if given is not None and (needs_moments or req.sequential) else None
    calibration = req.calibration
    if st is not None:
        st.check_model(source.fingerprint, arch.targets.values())
        kinds = attention_kinds(source.path)
        if len(kinds) > 1 and "block_arguments" not in st.manifest:
            raise StatsError(f"the stats in {req.stats} were calibrated by an earlier stade, which gave every block "
                             f"the first block's attention arguments; this model's blocks alternate "
                             f"{' and '.join(kinds)} attention, so the statistics of the blocks of the other kind "
                             "may be wrong", "re-run `stade calibrate` with this version")
        if gram_for and not req.sequential and not st.has_gram:
            raise StatsError(f"{gram_for} needs Gram matrices, which the stats in {req.stats} do not hold",
                             "make them with `stade calibrate --gram`" + ("" if req.structure else
                                                                          ", or prune --sequential"))
        if req.structure == "blocks" and st.block_distance() is None:
            raise StatsError(f"the stats in {req.stats} do not record how much each block changes its input",
                             "re-run `stade calibrate` with this version")
        if req.sequential:  # the pruned-model pass uses the same calibration windows as the cache
            m = st.manifest
            calibration = dataclasses.replace(calibration, dataset=m["dataset"], nsamples=m["nsamples"],
                                              seqlen=m["seqlen"], seed=m["seed"])
        roles = [m.name for m in running if m.needs_roles]
        unknown = [n for n in arch.targets if "reads_norm" not in st.manifest["modules"].get(n, {})]
        if roles and unknown and not req.sequential:
            raise StatsError(f"{roles[0]} needs to know which linears read a normalisation layer's output, and "
                             f"{req.stats} do not record it (for {unknown[0]})",
                             "re-run `stade calibrate` with this version")
    calibrate_first = st is None and needs_moments and not (req.sequential and req.layer_sparsity != "owl")
    refine_windows = req.calibration
    if req.refine.on and given is not None:    # the refinement reads the stats' own text, from the same seed
        m = given.manifest
        refine_windows = dataclasses.replace(refine_windows, dataset=m["dataset"], seed=m["seed"],
                                             seqlen=refine_windows.seqlen or m["seqlen"])
    if req.refine.on:
        refine_windows = dataclasses.replace(refine_windows, nsamples=req.refine.samples,
                                             seqlen=req.refine.seqlen or refine_windows.seqlen, batch_size=1)
        refine_windows.check(context_length(config if config is not None else load_config(source.path)))
    if st is None and (needs_moments or req.sequential):     # windows will be read: their options checked now
        calibration.check(context_length(config if config is not None else load_config(source.path)))
    return Plan(req, source, tuple(files), arch, config, method, pattern, options, checked.device, st, calibration,
                calibrate_first, gram_for is not None, bias_table, started, checked.update, world, cov, shapes,
                config_json, tuple(notes), refine_windows)


def _structure_plan(req: PruneRequest, method: Metric, arch: Architecture, config, source: ModelSource,
                    notes: list[str]):
    """--structure channels: the MLPs are found (or refused) now; STADE folds the removed channels' mean into the
    down projection's bias, which the model must be able to hold: by default wanda is used where it cannot."""
    from .structured.plan import channel_width, find_mlps, removed_blocks, removed_count
    from .structured.scores import folds

    if req.structure == "blocks":
        removed_blocks(len(arch.blocks), req.sparsity)
        return method, notes
    mlps = find_mlps(arch)
    removed_count(channel_width(mlps), req.sparsity)
    if folds(req.bias_correction, method.name):
        table = arch.bias_flags if arch.bias_flags is not None else bias_flag_table(
            config if config is not None else load_config(source.path))
        needed = {m.consumer.name for m in mlps.values() if not m.consumer.has_bias}
        try:
            bias_switches(table, arch.model_type, needed)
        except ModelError:
            if req.bias_correction is True:
                raise ModelError(f"--bias-correction folds the removed channels' mean into the down projection's "
                                 f"bias, and this {arch.model_type} model cannot hold one there",
                                 "drop --bias-correction") from None
            if req.metric is not None:
                raise ModelError(f"{method.name} folds the removed channels' mean into the down projection's bias, "
                                 f"and this {arch.model_type} model cannot hold one there",
                                 "use --metric wanda, or --no-bias-correction") from None
            notes.append(f"this {arch.model_type} model cannot hold a bias on its down projections, which stade's "
                         "channel score needs: ranking channels by wanda instead")
            return get_metric("wanda"), notes
    return method, notes


def _check_keys(arch: Architecture, shapes: Mapping[str, tuple]) -> None:
    """Every target's tensor is in the checkpoint with the shape the description says (before any work)."""
    for t in arch.targets.values():
        shape = shapes.get(t.weight_key)
        if shape is None:
            raise ModelError(f"the weight shards hold no tensor {t.weight_key}", "the checkpoint does not match its config")
        want = (t.in_features, t.out_features) if t.transposed else (t.out_features, t.in_features)
        if tuple(shape[1:] if t.index is not None else shape) != want:
            raise ModelError(f"{t.weight_key} has shape {tuple(shape)}, its config says {want}",
                             "the checkpoint does not match its config")


def _bias_table(req: PruneRequest, method: Metric, options, arch: Architecture, config,
                update: Metric | None = None) -> Mapping[str, list]:
    """The config flags that can give linears a bias, when bias correction may need them; refuses early a
    correction that every layer needs and the model cannot hold."""
    if req.bias_correction is False or (req.bias_correction is None and update is not None):
        return {}
    ctx = LayerContext(options=options[method.name], all_options=options)
    by_role = {method.corrects_bias(dataclasses.replace(ctx, reads_norm=r)) for r in (False, True)}
    if req.bias_correction is None and by_role == {False}:
        return {}
    table = arch.bias_flags if arch.bias_flags is not None else bias_flag_table(config)
    if req.bias_correction is True or by_role == {True}:   # every layer is corrected: check it now
        slices = sorted(n for n, t in arch.targets.items() if t.fused)
        if req.bias_correction is True and slices:
            raise UsageError(f"--bias-correction does not apply to slices of fused expert tensors such as {slices[0]} "
                             f"({_after_removal(arch, slices, req.experts)} in all)",
                             f"leave it out: {method.name} then corrects the other layers where it does by default, "
                             "or --skip the experts")
        # by default the slices of fused expert tensors are left uncorrected (one-shot's ``corrected``)
        bias_switches(table, arch.model_type, {n for n, t in arch.targets.items() if not t.has_bias and not t.fused},
                      lambda names: _after_removal(arch, names, req.experts))
    return table


def _after_removal(arch: Architecture, names: list[str], experts: int | None) -> int:
    """How many of the targets ``names`` the output holds: under ``--experts K``, K of each block's experts'
    (which K the stats decide later; the count is known now)."""
    if experts is None:
        return len(names)
    kept = 0.0
    for n in names:
        t = arch.targets[n]
        kept += 1 if t.expert is None or t.block not in arch.experts else experts / arch.experts[t.block].num_experts
    return round(kept)

