"""`compress` entry point.

`compress MODEL.onnx ...` is the main command; `compress inspect|bench|train ...` are subcommands. Typer cannot
mix a positional default command with subcommands, so this module dispatches on the first argument and imports a
subcommand's module only when it runs (the ONNX path never imports torch).
"""

from __future__ import annotations

import sys

def main(argv: list[str] | None = None) -> None:
    """Run the CLI with argv (defaults to sys.argv[1:])."""
    import importlib

    from cli.common import SUBCOMMANDS, run_typer

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        run_typer(module.app, argv[1:], prog=f"compress {argv[0]}")
    else:
        from cli.compress_cmd import app

        run_typer(app, argv, prog="compress")


if __name__ == "__main__":
    main()
