"""Shared CLI plumbing: one line on stderr and a non-zero exit for every failure, never a traceback."""

from __future__ import annotations

import os
import sys

import typer

from compressor.errors import CompressorError

SUBCOMMANDS = {
    "inspect": ("cli.inspect_cmd", "List dependency groups, residual blocks and the MACs/params table of a model."),
    "bench": ("cli.bench_cmd", "Measure latency and memory of ONNX models with ONNX Runtime."),
    "train": ("cli.train_cmd", "Train or fine-tune a model in PyTorch (optionally with AMSC/GSM/a mask), export ONNX."),
}


def usage_epilog() -> str:
    """The subcommand list shown under `compress --help`."""
    lines = ["\b", "Subcommands (compress SUBCOMMAND --help):"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


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
