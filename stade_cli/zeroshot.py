"""Zero-shot (or few-shot) accuracy with lm-evaluation-harness, on an already loaded model.

Needs the optional extra ``stade-cli[lm-eval]`` (PyPI ``lm-eval``). The model and tokenizer are
loaded the same way as everywhere else in stade (``loading.Runtime``, ``load_model``) and handed to lm_eval's ``HFLM`` wrapper, so ``--device`` and
``--dtype`` mean the same thing as for perplexity.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

from .arch import context_length
from .errors import DataError, StadeError, UsageError
from .loading import Runtime, check_batch_size, load_model, load_tokenizer, release_model
from .runtime import Reporter

INSTALL_HINT = "pip install 'stade-cli[lm-eval]'"
ACC_METRICS = ("acc", "acc_norm")     # shown first, in this order; other metrics follow


class MissingExtraError(StadeError):
    """An optional dependency (an extra of stade-cli) is not installed."""


def _import_lm_eval():
    """(lm_eval, TaskManager, HFLM), or a one-line error naming the install command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except Exception as exc:  # noqa: BLE001 - a broken install can fail in any way (e.g. a hub fetch at import)
        if isinstance(exc, ImportError) and (getattr(exc, "name", None) or "").split(".")[0] in ("lm_eval", ""):
            raise MissingExtraError("zero-shot evaluation (--tasks) needs lm-evaluation-harness, which is not "
                                    "installed", INSTALL_HINT) from None
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MissingExtraError(f"lm-evaluation-harness is installed but cannot be imported: {first}",
                                f"reinstall it with {INSTALL_HINT}") from None
    return lm_eval, TaskManager, HFLM


def _task_manager(include_path: str | None):
    """Indexing lm_eval's ~15k task YAMLs takes seconds: done once per process and include path (and again
    when a YAML under it changes)."""
    stamp = () if include_path is None else tuple(sorted(
        (str(p), p.stat().st_mtime_ns) for p in Path(include_path).rglob("*") if p.suffix in (".yaml", ".yml", ".py")))
    return _cached_task_manager(include_path, stamp)


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, stamp: tuple):
    _, TaskManager, _ = _import_lm_eval()
    return TaskManager(include_path=include_path)


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"boolq, piqa,boolq"`` or a list → ``["boolq", "piqa"]`` (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    names = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise UsageError("--tasks is empty", "give a comma-separated list, e.g. --tasks boolq,piqa")
    return names


def _check_task_names(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file()]
    if not unknown:
        return
    close = sorted({m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=3, cutoff=0.75)})
    what = f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}"
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(what, f"{hint}`lm-eval ls tasks` lists them; add your own YAMLs with --task-path DIR")


def _load_tasks(manager, names: list[str]) -> list:
    """Build every task (this downloads or opens its data) before the model is loaded, one name at a time
    so a failure names its task. Returns what to hand to ``simple_evaluate``: the built Task/Group objects
    (lm_eval >= 0.4.12, ``TaskManager.load``), or the names again with older versions, whose
    ``simple_evaluate`` rebuilds tasks by name (their data then comes from the datasets cache)."""
    if not hasattr(manager, "load"):
        for name in names:
            with _task_errors(name):
                manager.load_task_or_group([name])
        return list(names)
    objects: list = []
    for name in names:
        with _task_errors(name):
            loaded = manager.load([name])
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objects.append(loaded["tasks"][name])
        else:  # a tag (or a YAML path): its tasks
            objects.extend(loaded["tasks"].values())
    try:  # what simple_evaluate would refuse later (a task asked for twice, e.g. alone and in its group)
        manager.load(objects)
    except ValueError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise UsageError(f"--tasks: {first}", "ask for each task once, alone or through one group") from None
    return objects


@contextlib.contextmanager
def _task_errors(name: str):
    """Any failure while building task ``name`` → one DataError line naming it."""
    try:
        yield
    except StadeError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/hub/YAML errors come in many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        hint = "lm-eval reads task data from the Hugging Face hub or its cache; check the network, "\
               "HF_DATASETS_OFFLINE and the task's YAML"
        raise DataError(f"cannot load task '{name}': {type(exc).__name__}: {first}", hint) from None


@contextlib.contextmanager
def _harness_output(verbose: bool):
    """lm_eval's own progress bars and prints go to stderr (or nowhere when quiet), never to stdout; its
    warnings about our pre-loaded model are noise and are hidden."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        if verbose:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    contextlib.redirect_stderr(devnull):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_git_describe():
    """simple_evaluate records the git hash of the *current directory* (not ours to report) by running
    ``git describe`` with an inherited stderr, which prints "fatal: not a git repository" outside a repo."""
    import lm_eval.evaluator as evaluator

    if not callable(getattr(evaluator, "get_git_commit_hash", None)):
        yield
        return
    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _number(value) -> float | None:
    """A metric value as a float; "N/A" (lm_eval's stderr of a single example) and NaN → None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _task_metrics(raw: dict) -> dict:
    """lm_eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` → ``{"acc": x, "acc_stderr": s}``.

    Metrics under a filter other than ``none`` keep it: ``"exact_match,strict-match"``.
    """
    values: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        values[name] = _number(value)
        values[f"{name}_stderr"] = _number(raw.get(f"{metric}_stderr,{filt}"))
    order = [m for base in ACC_METRICS for m in (base, f"{base}_stderr") if m in values]
    return {**{k: values[k] for k in order}, **{k: v for k, v in values.items() if k not in order}}


def zero_shot(model: str, tasks: str | list[str], num_fewshot: int = 0, limit: int | None = None,
              task_path: str | Path | None = None, device: str = "auto", dtype: str = "auto",
              batch_size: int = 1, reporter: Reporter | None = None, placement=None) -> dict:
    """Accuracy of ``model`` (a checkpoint dir or hub id) on lm-evaluation-harness ``tasks``.

    Returns ``{model, tasks: {name: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, ..., samples,
    num_fewshot}}, mean_acc, limit, num_fewshot, device, dtype, batch_size, lm_eval, seconds}``;
    ``mean_acc`` is the unweighted mean of ``acc`` over the tasks that report it (None if none does).
    """
    verbose = bool(getattr(reporter, "bars", False))  # lm_eval's tqdm bars only where stade draws its own
    from .distributed import one_process

    one_process("zero-shot evaluation (--tasks)", "run it without a launcher; lm-evaluation-harness has its own "
                "multi-GPU mode: accelerate launch -m lm_eval --model hf ...")
    reporter = reporter or Reporter()
    model = os.fspath(model)        # a Path is as good as a string
    names = parse_tasks(tasks)
    if num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more (got {num_fewshot})")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    check_batch_size(batch_size)
    include = None
    if task_path is not None:
        path = Path(task_path).expanduser()
        if not path.is_dir():
            raise UsageError(f"--task-path {task_path} is not a directory", "point it at a directory of task YAMLs")
        include = str(path.resolve())

    lm_eval, _, HFLM = _import_lm_eval()
    rt = Runtime.of(model, device, dtype)
    placement = rt.settle(placement, reporter)
    source, config, dev, dt = rt.source, rt.config, rt.device, rt.dtype

    reporter.log("indexing lm-eval tasks")
    with _harness_output(verbose):
        manager = _task_manager(include)
    _check_task_names(manager, names)
    reporter.log(f"loading {len(names)} task(s): {', '.join(names)}")
    with _harness_output(verbose):
        task_objects = _load_tasks(manager, names)

    tokenizer = load_tokenizer(source)
    net = load_model(source, dev, dt, placement)  # with a device map, accelerate's hooks move the blocks
    t0 = time.perf_counter()
    with _harness_output(verbose):
        lm = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size, max_length=context_length(config))
        if getattr(net, "hf_device_map", None):
            # HFLM takes a pre-built model's device from its first parameter, which is "meta" when that one is
            # offloaded; inputs belong on the device the embeddings run on (accelerate moves the rest).
            from .blockwise import execution_device

            lm._device = execution_device([net.get_input_embeddings()], dev)
        with _no_git_describe():
            out = lm_eval.simple_evaluate(model=lm, tasks=task_objects, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
    seconds = round(time.perf_counter() - t0, 2)
    release_model(net)      # accelerate's offload folder now (on an error: when the model is collected)

    # leaf tasks only: group aggregates are left out (lm_eval < 0.4.12 lists plain tasks in group_subtasks too)
    groups = set(out.get("groups", {})) | {g for g, kids in out.get("group_subtasks", {}).items()
                                           if any(k != g for k in kids)}
    results: dict[str, dict] = {}
    for name in sorted(out["results"]):
        if name in groups:
            continue
        entry = _task_metrics(out["results"][name])
        samples = out.get("n-samples", {}).get(name) or {}
        entry["samples"] = samples.get("effective")
        entry["num_fewshot"] = out.get("n-shot", {}).get(name)
        results[name] = entry
    accs = [r["acc"] for r in results.values() if r.get("acc") is not None]
    return {"model": source.ref, "tasks": results, "mean_acc": sum(accs) / len(accs) if accs else None,
            "limit": limit, "num_fewshot": num_fewshot, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
            "batch_size": batch_size, "lm_eval": getattr(lm_eval, "__version__", None), "seconds": seconds}
