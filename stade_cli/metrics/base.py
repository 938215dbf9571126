"""What a pruning method is, and the registry every method file adds itself to.

A method is one file in this package (or in another installed package, through the ``stade.methods``
entry-point group) that decorates its function with ``@scorer`` or ``@solver``:

* a **scorer** gives ``score(weight, moments, ctx) -> scores``: weight [out, in] float32, moments the
  layer's input Moments (None when it needs none), scores [out, in], higher means keep; the pattern
  (unstructured or N:M) turns scores into the mask;
* a **solver** gives ``solve(weight, stats, pattern, ctx) -> (weight, mask)``: it chooses its own mask and
  may change the kept weights (SparseGPT's update, DSnoT's swaps);
* an **update** (``--update NAME``) gives ``update(weight, mask, stats, pattern, ctx, **how) -> (weight,
  mask)``, applied after any method's mask: it reconstructs the kept weights (ADMM) and may re-choose the mask
  (a gradual one, from ``how["score"]``, the metric's scores of given weights).

A method owns its options: ``options=`` a frozen dataclass whose fields (defaults, and ``help`` in each
field's metadata) become its command-line flags (``ria_alpha`` → ``--ria-alpha``) and its keys in the
report, and ``validate(options, pattern)`` checks them before any weight is read. Math raises
``MethodError`` (a ValueError) whose text names options as ``{field}``; the layer that knows the flags
renders them (``--field``), so no method knows the command line.

Nothing here imports torch at import time: the CLI builds its flags from the registry and stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import KINDS, MethodError

SCORER, SOLVER, UPDATE = "scorer", "solver", "update"


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


RUN_SEED = "seed"   # an option field of this name takes the run's --seed (it is not a flag of its own)


@dataclass(frozen=True)
class LayerStats:
    """What the calibration measured at one layer's input."""

    moments: Any = None             # Moments, or None
    gram: Any = None                # H = Σ x xᵀ [in, in] (a tensor), for methods that need it
    input: str | None = None        # which input it is (layers reading the same input share it: q/k/v, gate/up)


@dataclass(frozen=True)
class LayerContext:
    name: str = ""                 # module name, e.g. "model.layers.3.mlp.down_proj"
    reads_norm: bool = False       # its input is the output of a normalisation layer
    options: Any = field(default_factory=NoOptions)   # the running method's options (its own dataclass)
    all_options: Mapping[str, Any] = field(default_factory=dict)   # every method's options, by method name


def _never(ctx: LayerContext) -> bool:
    return False


def _no_checks(options, pattern) -> None:
    return None


@dataclass(frozen=True)
class Metric:
    """A registered method (the name is historical: scorers were all there was)."""

    name: str
    kind: str
    summary: str
    score: Callable | None = None                       # scorer
    solve: Callable | None = None                       # solver
    update: Callable | None = None                      # update
    options: type = NoOptions
    validate: Callable[[Any, Any], None] = _no_checks    # (options, pattern) -> None; raises MethodError
    needs_stats: bool = True                            # False: no calibration at all (magnitude)
    needs_gram: bool = False
    needs_roles: bool = False                           # reads which linears read a norm's output (stadew)
    corrects_bias: Callable[[LayerContext], bool] = _never
    order: int = 1000                                   # place in listings and in the report's options
    module: str = ""
    runs_with: Callable[[Any], tuple] = lambda options: ()   # other methods it runs (DSnoT: its init)
    needs_scores: Callable[[Any], bool] = lambda options: False   # an update that re-chooses the mask by scores

    def running(self, options: Mapping[str, Any]) -> list["Metric"]:
        """This method and the ones it runs, given every method's options."""
        return [self] + [get_metric(name) for name in self.runs_with(options[self.name])]


_REGISTRY: dict[str, Metric] = {}
_DISCOVERED = False


def _register(method: Metric) -> None:
    if method.name in _REGISTRY and _REGISTRY[method.name].module != method.module:
        raise ValueError(f"two methods are called {method.name!r}: in {_REGISTRY[method.name].module} "
                         f"and {method.module}")
    if not (dataclasses.is_dataclass(method.options) and method.options.__dataclass_params__.frozen):
        raise TypeError(f"{method.name}: options must be a frozen dataclass")
    _REGISTRY[method.name] = method


def _context(ctx: LayerContext | None, cls: type, name: str) -> LayerContext:
    """``ctx`` with this method's options (its entry in ``all_options``, else its defaults) when it carries
    another method's (DSnoT running its --init) or none (a direct call)."""
    if ctx is None:
        return LayerContext(options=cls())
    if isinstance(ctx.options, cls):
        return ctx
    return dataclasses.replace(ctx, options=ctx.all_options.get(name) or cls())


def scorer(name: str, summary: str, *, options: type = NoOptions, validate=_no_checks, needs_stats: bool = True,
           corrects_bias: Callable[[LayerContext], bool] = _never, needs_roles: bool = False, order: int = 1000):
    """Register ``score(weight, moments, ctx) -> scores`` as the method ``name``."""
    def wrap(fn):
        def score(weight, moments=None, ctx: LayerContext | None = None):
            return fn(weight, moments, _context(ctx, options, name))

        _register(Metric(name, SCORER, summary, score=score, options=options, validate=validate,
                         needs_stats=needs_stats, corrects_bias=corrects_bias, needs_roles=needs_roles, order=order,
                         module=fn.__module__))
        return fn
    return wrap


def solver(name: str, summary: str, *, options: type = NoOptions, validate=_no_checks, needs_gram: bool = False,
           order: int = 1000, runs_with: Callable[[Any], tuple] = lambda options: ()):
    """Register ``solve(weight, stats, pattern, ctx) -> (weight, mask)`` as the method ``name``."""
    def wrap(fn):
        def solve(weight, stats, pattern, ctx: LayerContext | None = None):
            return fn(weight, stats, pattern, _context(ctx, options, name))

        _register(Metric(name, SOLVER, summary, solve=solve, options=options, validate=validate, needs_gram=needs_gram,
                         order=order, module=fn.__module__, runs_with=runs_with))
        return fn
    return wrap


def update(name: str, summary: str, *, options: type = NoOptions, validate=_no_checks, needs_gram: bool = True,
           order: int = 1000, needs_scores: Callable[[Any], bool] = lambda options: False):
    """Register ``update(weight, mask, stats, pattern, ctx, **how) -> (weight, mask)`` as the weight update
    ``name`` (``--update NAME``): it runs after any method's mask and may re-choose it (a gradual mask)."""
    def wrap(fn):
        def run(weight, mask, stats, pattern, ctx: LayerContext | None = None, **how):
            return fn(weight, mask, stats, pattern, _context(ctx, options, name), **how)

        _register(Metric(name, UPDATE, summary, update=run, options=options, validate=validate,
                         needs_gram=needs_gram, order=order, module=fn.__module__, needs_scores=needs_scores))
        return fn
    return wrap


def discover() -> None:
    """Import every method file of this package, then every ``stade.methods`` entry point (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import importlib
    import pkgutil
    from importlib.metadata import entry_points
    from pathlib import Path

    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")
    for ep in entry_points(group="stade.methods"):
        ep.load()


def methods() -> dict[str, Metric]:
    """Every method (metrics and weight updates), in listing order."""
    discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def metrics() -> dict[str, Metric]:
    """What ``--metric`` chooses from: the scorers and solvers."""
    return {n: m for n, m in methods().items() if m.kind != UPDATE}


def updates() -> dict[str, Metric]:
    """What ``--update`` chooses from (besides ``none``)."""
    return {n: m for n, m in methods().items() if m.kind == UPDATE}


def _lookup(name: str, pool: dict[str, Metric], what: str, other: dict[str, Metric], flag: str,
            extra: tuple[str, ...] = ()) -> Metric:
    from ..errors import UsageError

    found = pool.get(name)
    if found is None:
        import difflib

        if name in other:
            raise UsageError(f"{name} is not a {what}", f"give it as {flag} {name}")
        names = list(extra) + sorted(pool)
        close = difflib.get_close_matches(name, names, n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown {what} '{name}'", f"{guess}choose one of {', '.join(names)}")
    return found


def get_metric(name: str) -> Metric:
    return _lookup(name, metrics(), "metric", updates(), "--update")


def get_update(name: str) -> Metric | None:
    """The weight update ``name``, or None for ``none``."""
    if name in (None, "none"):
        return None
    return _lookup(name, updates(), "weight update", metrics(), "--metric", extra=("none",))


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class OptionSpec:
    """One method option as the command line and the report see it."""

    name: str
    type: type
    default: Any
    help: str
    users: tuple[str, ...]          # the methods that read it


def option_specs() -> dict[str, OptionSpec]:
    """Every method option, by field name, in method order (a field several methods share appears once)."""
    specs: dict[str, OptionSpec] = {}
    for method in methods().values():
        for f in dataclasses.fields(method.options):
            if f.name in specs:
                specs[f.name] = dataclasses.replace(specs[f.name], users=specs[f.name].users + (method.name,))
                continue
            specs[f.name] = OptionSpec(f.name, _field_type(method.options, f), f.default, f.metadata.get("help", ""),
                                       (method.name,))
    return specs


def _field_type(cls, f) -> type:
    import typing

    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def check_mapping(values: Any) -> None:
    """Refuses method options that are not a mapping of option names to values (None: none given)."""
    if values is not None and not isinstance(values, Mapping):
        raise MethodError(f"method options must be a mapping of option names to values (got {type(values).__name__})",
                          'e.g. options={{"ria_alpha": 1.0}}')     # a template: {{ is a brace


def build_options(values: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every method's options dataclass from flat ``values`` (field name → value; the rest defaults)."""
    check_mapping(values)
    values = dict(values or {})
    known = option_specs()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MethodError(f"unknown method option {unknown[0]!r}", f"known: {', '.join(known)}")
    values = {k: _typed(known[k], v) for k, v in values.items()}
    out = {}
    for name, method in methods().items():
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(method.options) if f.name in values}
        if RUN_SEED in {f.name for f in dataclasses.fields(method.options)} and RUN_SEED not in values:
            kwargs[RUN_SEED] = seed
        out[name] = method.options(**kwargs)
    return out


def _typed(spec: OptionSpec, value: Any) -> Any:
    """``value`` as the option's type: text as typed in a sweep entry (``ria_alpha=2``) converted, a number for a
    number; anything else refused with the option's name."""
    kind = spec.type
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
    elif kind in (int, float):
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value)):
            return kind(value)
    elif isinstance(value, kind):
        return value
    what = KINDS.get(kind, "text")
    shown = repr(value).replace("{", "{{").replace("}", "}}")           # the caller's value, not a template
    raise MethodError(f"{{{spec.name}}} must be {what} (got {shown})",
                      f"its default is {spec.default!r}; see `stade prune --help-method {spec.users[0]}`")


def flat_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``options``: every field of every method's options once, in method order."""
    flat: dict[str, Any] = {}
    for name in methods():
        if name in options:
            for key, value in dataclasses.asdict(options[name]).items():
                flat.setdefault(key, value)
    return flat
