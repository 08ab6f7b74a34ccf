"""`compress` entry point.

`compress MODEL.onnx ...` is the main command; `compress inspect|bench|train ...` are subcommands. Typer cannot
mix a positional default command with subcommands, so this module dispatches on the first argument and imports a
subcommand's module only when it runs (the ONNX path never imports torch).
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "inspect": ("cli.inspect_cmd", "List dependency groups, residual blocks and the MACs/params table of a model."),
    "bench": ("cli.bench_cmd", "Measure latency and memory of ONNX models with ONNX Runtime."),
    "train": ("cli.train_cmd", "Train or fine-tune a model in PyTorch (optionally with AMSC/GSM/a mask), export ONNX."),
    "finetune": ("cli.finetune_cmd", "Fine-tune a compressed ONNX model with distillation from the original."),
}


def _usage_epilog() -> str:
    lines = ["\b", "Subcommands (compress SUBCOMMAND --help):"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI with argv (defaults to sys.argv[1:])."""
    import importlib

    from cli.common import run_typer

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        run_typer(module.app, argv[1:], prog=f"compress {argv[0]}")
    else:
        from cli.compress_cmd import app

        run_typer(app, argv, prog="compress")


if __name__ == "__main__":
    main()
