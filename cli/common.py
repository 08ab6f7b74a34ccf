"""Shared CLI plumbing: one line on stderr and a non-zero exit for every failure, never a traceback."""

from __future__ import annotations

import os
import shlex
import sys

import typer

from compressor.errors import CompressorError


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_typer(app: typer.Typer, argv: list[str], prog: str) -> None:
    """Run a typer app, turning library errors and unexpected exceptions into one stderr line."""
    try:
        app(args=argv, prog_name=prog, standalone_mode=True)
    except SystemExit as exc:
        raise exc
    except CompressorError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("COMPRESSOR_DEBUG"):
            raise
        typer.echo(f"error: internal error: {type(exc).__name__}: {exc} (set COMPRESSOR_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


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
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)
