"""The Typer app: global options, error handling (errors → one stderr line + exit code), commands."""
from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import Interrupted, StadeError
from ..runtime import StderrReporter
from .output import State, error

INTERRUPTED = "no partial output is left, and the output path holds what it held before (unless the new output was complete)"

app = typer.Typer(
    name="stade",
    help="Prune Hugging Face causal LMs after training (magnitude, Wanda, STADE) and write loadable checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    ctx.obj = State(json=json_out, quiet=quiet, debug=debug or os.environ.get("STADE_DEBUG") == "1",
                    reporter=StderrReporter(quiet=quiet))


def state(ctx: typer.Context, json_out: bool = False, quiet: bool = False) -> State:
    """The global options, merged with the same options given after the command name."""
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(debug=os.environ.get("STADE_DEBUG") == "1")
    st = root.obj
    if json_out:
        st.json = True
    if quiet and not st.quiet:
        st.quiet = True
        st.reporter = StderrReporter(quiet=True)
    return st


def handle_errors(fn):
    """Known errors → one line on stderr and their exit code; interrupts → 130/143; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = kwargs.get("ctx") or next((a for a in args if isinstance(a, typer.Context)), None)
        debug = state(ctx).debug if ctx is not None else os.environ.get("STADE_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except StadeError as exc:
            if debug:
                raise
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error(f"interrupted: {INTERRUPTED}")
            raise typer.Exit(130) from None
        except Interrupted as exc:
            error(f"interrupted by {exc.name}: {INTERRUPTED}")
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            if debug:
                raise
            error("out of memory; try a smaller --batch-size, --nsamples or --seqlen")
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence: still one line, no traceback
            if debug:
                raise
            first = (str(exc).splitlines() or [""])[0]
            error(f"unexpected {type(exc).__name__}: {first} (set STADE_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _register() -> None:
    from . import calibrate, demo, eval as eval_cmd, inspect, prune  # noqa: F401  (commands register on import)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors too become one line on stderr (exit 2)."""
    import signal

    # click's UsageError, whether typer uses click itself or its own vendored copy
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    def _term(signum, frame):  # SIGTERM / SIGHUP unwind like Ctrl-C (staging removed), exit 128 + signal
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, _term)
    if hasattr(signal, "SIGHUP"):  # the terminal closed
        signal.signal(signal.SIGHUP, _term)
    try:
        code = app(args=argv, prog_name="stade", standalone_mode=False)
    except usage_error as exc:
        command = f"stade {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent else "stade --help"
        error(f"{exc.format_message()} (see `{command}`)")
        code = exc.exit_code
    except typer.Abort:
        error("interrupted")
        code = 130
    except KeyboardInterrupt:
        error(f"interrupted: {INTERRUPTED}")
        code = 130
    except Interrupted as exc:
        error(f"interrupted by {exc.name}: {INTERRUPTED}")
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
