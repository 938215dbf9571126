"""``--recipe NAME``: a documented composition of prune's flags, so that users need not know them.

A recipe is data: the library arguments (and method options) it sets, in the order its flags are shown.
``apply`` gives a call's arguments with the recipe's values where the caller did not set them (what a caller
sets explicitly wins, and is recorded), and the record the report keeps: the name, the flags the recipe stands
for, and those the caller overrode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UsageError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    values: tuple[tuple[str, Any], ...]        # (library argument or method option, value), in flag order

    def flags(self) -> str:
        """The command-line flags this recipe stands for: ``--metric wanda --update admm --admm-gradual …``."""
        return " ".join(as_flag(k, v) for k, v in self.values)


def as_flag(name: str, value: Any) -> str:
    """A library argument as its command-line flag: ``refine_lr=0.001`` → ``--refine-lr 0.001``, ``True`` →
    the bare flag, ``False`` → ``--no-…``; values quoted for a shell where they need it."""
    import shlex

    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if value is False:
        return f"--no-{flag[2:]}"
    return f"{flag} {shlex.quote(f'{value:g}' if isinstance(value, float) else str(value))}"


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("best", "the best composition measured (README, Beyond layer-wise reconstruction): Wanda's mask, the "
                   "gradual ADMM refit from the Gram matrix, then block-wise refinement on the calibration text",
           (("metric", "wanda"), ("update", "admm"), ("admm_gradual", True), ("refine", 40), ("refine_lr", 8e-3),
            ("refine_warmup", 0.25), ("refine_loss", "balanced"), ("refine_batch", 4), ("refine_samples", 128),
            ("refine_seqlen", 256))),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown recipe {name!r}", f"choose one of: {', '.join(RECIPES)}") from None


def apply(name: str, arguments: Mapping[str, Any], options: Mapping[str, Any], given: set[str],
          option_names: set[str]) -> tuple[dict, dict, dict]:
    """(arguments, method options, report record) with the recipe's values for what is not in ``given``.

    ``arguments``: the library call's arguments; ``options``: its method options; ``given``: the names the
    caller set explicitly (arguments or options); ``option_names``: which recipe entries are method options.
    """
    recipe = get_recipe(name)
    arguments, options = dict(arguments), dict(options)
    overridden = []
    for key, value in recipe.values:
        if key in given:
            if (options if key in option_names else arguments).get(key) != value:
                overridden.append(as_flag(key, (options if key in option_names else arguments).get(key)))
            continue
        (options if key in option_names else arguments)[key] = value
    record = {"name": recipe.name, "flags": recipe.flags(), "overridden": overridden}
    return arguments, options, record


def apply_to_call(function, args: dict, name: str, given: set[str] | None) -> tuple[dict, dict]:
    """``function``'s call arguments ``args`` (with an ``options`` dict of method options) with recipe ``name``
    applied, and its record. ``given`` None: the arguments that differ from ``function``'s defaults and every
    option in ``options``."""
    import inspect

    from .metrics import option_specs

    if given is None:
        defaults = {k: p.default for k, p in inspect.signature(function).parameters.items()}
        given = {k for k, v in args.items() if k in defaults and k != "options" and v != defaults[k]}
        given |= set(args.get("options") or {})
    arguments, options, record = apply(name, {k: v for k, v in args.items() if k != "options"},
                                       args.get("options") or {}, set(given), set(option_specs()))
    arguments["options"] = options
    return arguments, record
