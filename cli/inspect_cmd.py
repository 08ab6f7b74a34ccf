"""`compress inspect MODEL.onnx`: groups, blocks and the MACs/params table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX model to analyze."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="Concrete input shape NAME:1x3x224x224."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the analysis as JSON here."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Print the per-layer cost table."),
) -> None:
    """List dependency groups, removable residual blocks and per-layer MACs/params."""
    from compressor.api import inspect as run_inspect
    from compressor.engine.loading import parse_input_shapes
    from compressor.files import check_output_paths, write_text

    check_output_paths([model], {"--json": json_out})

    data = run_inspect(model, parse_input_shapes(input_shape)).to_dict()
    typer.echo(f"{model}: {data['macs'] / 1e6:.2f} MMACs, {data['params'] / 1e6:.3f} M params")
    typer.echo(f"\ngroups ({len(data['groups'])}):")
    typer.echo(f"  {'#':>3}  {'channels':>8}  {'prunable':>8}  {'producers':>9}  name / why blocked")
    for g in data["groups"]:
        why = f"  [{g['blocked_reason']}]" if g["prunable"] < g["channels"] and g["blocked_reason"] else ""
        typer.echo(f"  {g['index']:>3}  {g['channels']:>8}  {g['prunable']:>8}  {len(g['producers']):>9}  {g['name']}{why}")
    typer.echo(f"\nresidual blocks ({len(data['blocks'])}):")
    for b in data["blocks"]:
        zero = "  (exactly zero)" if b["zero"] else ""
        typer.echo(f"  {b['index']:>3}  {b['nodes']:>3} nodes  {b['macs'] / 1e6:>9.2f} MMACs  join {b['join']}{zero}")
    if layers:
        typer.echo("\nlayers:")
        typer.echo(f"  {'op':<14} {'MMACs':>10} {'params':>10}  name")
        for layer in data["layers"]:
            typer.echo(f"  {layer['op_type']:<14} {layer['macs'] / 1e6:>10.3f} {layer['params']:>10}  {layer['name']}")
    if json_out is not None:
        write_text(json_out, json.dumps(data, indent=2) + "\n")
