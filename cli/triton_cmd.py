"""`compress triton MODEL.onnx --repo DIR`: a validated Triton model repository for an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def triton(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="ONNX model to serve (never modified)."),
    repo: Path = typer.Option(..., "--repo", help="Triton model repository (created if missing; its parent must exist)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name, also its folder (default: the file's stem)."),
    version: int = typer.Option(1, "--version", help="Version folder; an existing one is never overwritten."),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="0: no batching (full dims in the config). Default 8 with a dynamic batch axis, else 0."),
    dynamic_batching: bool = typer.Option(False, "--dynamic-batching", help="Let Triton merge requests (needs max_batch_size > 0)."),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count)."),
    kind: str = typer.Option("gpu", "--kind", help="gpu or cpu instances."),
    trt_fp16: bool = typer.Option(False, "--trt-fp16", help="ONNX Runtime's TensorRT accelerator with precision_mode FP16."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:1x3x224x224 for dynamic dims other than the batch (the load-back run)."),
) -> None:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/VERSION/model.onnx, validated and loaded back before they land."""
    from cli.common import fail
    from compressor.errors import first_line
    from compressor.deploy.triton_config import TritonSettings
    from compressor.deploy.triton_repo import check_repository_target, uses_external_data, write_triton_repository
    from compressor.engine.loading import parse_input_shapes

    name = name or model.stem
    if not model.is_file():
        fail(f"model file not found: {model}")
    check_repository_target(repo, name, version, protected=[model])
    try:
        import onnx

        proto = onnx.load(str(model))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types on corrupt input
        fail(f"cannot read ONNX model {model}: {first_line(exc, 200)}")
    if not proto.graph.node:
        fail(f"{model} is not an ONNX model (no graph nodes)")
    settings = TritonSettings(max_batch_size, dynamic_batching, instances, kind, trt_fp16)
    staged = write_triton_repository(proto, repo, name, version, settings, parse_input_shapes(input_shape) or None,
                                     external_data=uses_external_data(model))
    typer.echo(f"wrote {staged.model_dir}/config.pbtxt and {staged.model_dir}/{version}/model.onnx "
               f"(validated; ran with ONNX Runtime at {staged.run_shapes})")
