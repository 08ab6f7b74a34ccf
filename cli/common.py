"""Shared CLI plumbing: one line on stderr and a non-zero exit for every failure, never a traceback.

Usage errors (a bad option value, a missing argument) are one `error: ... (run 'PROG --help')` line with exit 2;
SIGINT and SIGTERM print `error: interrupted` and exit 130 / 143 after the temp files are removed (an exception
unwinds the stack, so `PendingWrites` discards what it staged).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

import typer

from compressor.errors import CompressorError

SUBCOMMANDS = {
    "inspect": ("cli.inspect_cmd", "List dependency groups, residual blocks and the MACs/params table of a model."),
    "bench": ("cli.bench_cmd", "Measure latency and memory of ONNX models with ONNX Runtime."),
    "triton": ("cli.triton_cmd", "Write a validated Triton model repository (config.pbtxt + model) for an ONNX model."),
    "train": ("cli.train_cmd", "Train or fine-tune a model in PyTorch (optionally with AMSC/GSM/a mask), export ONNX."),
    "finetune": ("cli.finetune_cmd", "Fine-tune a compressed ONNX model with distillation from the original."),
}


def usage_epilog() -> str:
    """The subcommand list shown under `compress --help`."""
    lines = ["\b", "Subcommands (compress SUBCOMMAND --help):"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Turn SIGINT and SIGTERM into Interrupted (main thread only)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, _raise_interrupted)
        except (ValueError, OSError):  # not the main thread
            pass


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is(exc: BaseException, class_name: str) -> bool:
    """Whether `exc` is a click/typer exception of that class name. Typer >= 0.2x vendors its own copy of click,
    older releases use click itself: matching by name covers both without importing private modules."""
    return any(cls.__name__ == class_name for cls in type(exc).__mro__)


def run_typer(app: typer.Typer, argv: list[str], prog: str) -> None:
    """Run a typer app, turning usage errors, library errors, interrupts and unexpected exceptions into one
    stderr line and an exit code (2 usage/input, 1 internal, 130/143 signals)."""
    install_signal_handlers()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except Interrupted as exc:
        typer.echo("error: interrupted", err=True)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except CompressorError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if _is(exc, "Abort"):
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        if _is(exc, "UsageError"):
            typer.echo(f"error: {_one_line(exc.format_message())} (run '{prog} --help')", err=True)
            sys.exit(2)
        if _is(exc, "ClickException") or isinstance(exc, typer.TyperException):
            typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(getattr(exc, "exit_code", 1) or 1)
        if os.environ.get("COMPRESSOR_DEBUG"):
            raise
        typer.echo(f"error: internal error: {type(exc).__name__}: {_one_line(exc)} "
                   "(set COMPRESSOR_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def command_line(ctx: typer.Context, prog: str) -> str:
    """The command as an equivalent `prog ...` line (from the parsed options; defaults left out)."""
    parts = shlex.split(prog)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or value == param.default:
            continue
        if not param.opts[0].startswith("-"):
            parts.append(str(value))
            continue
        flag = max(param.opts, key=len)
        for item in value if isinstance(value, (list, tuple)) else [value]:  # repeated options once per value
            parts += [flag] if item is True else [flag, str(item)]
    return shlex.join(parts)
