"""The Typer app: every command registered here, in one place; one error table for all of them.

Command modules (``calibrate``, ``prune``, ``eval``, ``inspect``, ``demo``) define plain functions and
never import this module. ``StadeGroup`` runs every command through ``_errors.report``, so known
failures, interrupts and parser errors alike become one stderr line and an exit code, both from the
console script and from ``typer.testing.CliRunner``.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .._version import __version__
from ..distributed import leave
from ..errors import Interrupted, note_signal
from ..runtime import StderrReporter
from . import calibrate, demo, eval as eval_cmd, inspect, prune, sweep
from ._errors import UsageError, report
from .output import State, debug_from_env, other_rank


def _bare_flags(params) -> None:
    """A flag shows no value in the help (newer typer writes ``--force <bool>``, which reads as ``--force true``)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class StadeCommand(TyperCommand):
    """Usage reads ``stade prune [OPTIONS] MODEL``: newer typer writes required arguments as ``{MODEL}``,
    which reads like a literal to type."""

    def get_params(self, ctx: typer.Context):
        return _bare_flags(super().get_params(ctx))

    def get_help_option(self, ctx: typer.Context):
        """In a help with panels, --help joins the first panel (not a panel of its own at the top)."""
        option = super().get_help_option(ctx)
        panels = [p.rich_help_panel for p in self.params if getattr(p, "rich_help_panel", None)
                  and isinstance(p, typer.core.TyperOption)]
        if option is not None and panels:
            option.rich_help_panel = panels[0]
        return option

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """An option that takes one value, given twice, is refused: click would silently keep the last one
        (``--dataset a.txt --dataset b.txt`` calibrating on b.txt alone)."""
        takes_value = {opt: p for p in self.params if p.param_type_name == "option" and not p.is_flag
                       and not p.multiple and not getattr(p, "count", False) for opt in p.opts + p.secondary_opts}
        seen: dict[str, str] = {}
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                break
            name, has_value = token.split("=", 1)[0], "=" in token
            param = takes_value.get(name)
            if param is not None:
                if param.name in seen:
                    several = " (several files: one comma-separated value, --dataset a.txt,b.txt)" \
                        if param.name == "dataset" else ""
                    raise UsageError(f"{name} was given twice; give it once{several}", ctx=ctx)
                seen[param.name] = name
                i += 0 if has_value else 1          # its value is the next token
            i += 1
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


class StadeGroup(TyperGroup):
    """Every command runs through the error table; ``prune`` is built when it is run (its flags come from the
    method registry, whose files import torch), so ``stade --help`` and the other commands start fast."""

    def get_params(self, ctx: typer.Context):
        return _bare_flags(super().get_params(ctx))

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if name in _BUILT_WHEN_RUN:
            command = _BUILT_WHEN_RUN[name]()
        return name, command, rest

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as exc:  # noqa: BLE001 - the table decides, and re-raises what it does not know
            debug = ctx.obj.debug if isinstance(ctx.obj, State) else debug_from_env()
            raise typer.Exit(report(exc, debug)) from None


app = typer.Typer(
    name="stade",
    cls=StadeGroup,
    help="Prune Hugging Face causal LMs after training (magnitude, Wanda, STADE) and write loadable checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Examples (MODEL: a folder or a hub id, e.g. HuggingFaceTB/SmolLM2-135M):\n"
           "  stade calibrate MODEL --gram -o stats\n"
           "  stade prune MODEL --stats stats --recipe best --sparsity 0.5 -o pruned\n"
           "  stade eval pruned --record",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stade {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also STADE_DEBUG=1).")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    if other_rank():    # under a launcher, rank 0 alone prints results and progress
        quiet = True
        sys.stdout = open(os.devnull, "w")
    ctx.obj = State(json=json_out, quiet=quiet, debug=debug or debug_from_env(), reporter=StderrReporter(quiet=quiet))


def _full_prune():
    """The click command of ``prune`` with every method's options (built once, when prune runs)."""
    if "prune" not in _BUILT:
        sub = typer.Typer(pretty_exceptions_enable=False, add_completion=False,
                          context_settings={"help_option_names": ["-h", "--help"]})
        sub.command("prune", cls=StadeCommand)(prune.command())
        _BUILT["prune"] = typer.main.get_command(sub)
    return _BUILT["prune"]


_BUILT: dict = {}
_BUILT_WHEN_RUN = {"prune": _full_prune}

app.command(cls=StadeCommand)(calibrate.calibrate)
app.command("prune", cls=StadeCommand)(prune.listed)  # what `stade --help` lists; the full one replaces it when run
app.command("eval", cls=StadeCommand)(eval_cmd.eval_command)
app.command(cls=StadeCommand)(inspect.inspect)
app.command(cls=StadeCommand)(sweep.sweep)
app.command(cls=StadeCommand)(demo.demo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. SIGTERM and SIGHUP unwind like Ctrl-C; errors that happen before any
    command runs (``stade --bogus``) go through the same table."""
    import signal
    import threading

    def _term(signum, frame):
        note_signal(signum)
        raise Interrupted(signum)

    def _int(signum, frame):
        note_signal(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:    # a shell's background job keeps ignoring Ctrl-C
        signal.signal(signal.SIGINT, _int)
    if hasattr(signal, "SIGHUP"):  # the terminal closed
        signal.signal(signal.SIGHUP, _term)
    try:
        code = app(args=argv, prog_name="stade", standalone_mode=False)
    except typer.Abort:
        code = report(KeyboardInterrupt(), False)
    except (KeyboardInterrupt, Interrupted) as exc:
        code = report(exc, False)
    except UsageError as exc:
        code = report(exc, False)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # done: a launcher's SIGTERM now simply ends the exit
    code = code if isinstance(code, int) else 0
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if code != 0 and others:
        # Everything was unwound (outputs cleaned up, locks released); a worker thread may still be inside a
        # layer's solve, which Python's exit would wait for: end now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    leave(code)      # under a launcher: ends the process here, once every rank is done
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
