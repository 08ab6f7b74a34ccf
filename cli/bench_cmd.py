"""`compress bench`: latency and memory of ONNX models side by side, with a table, JSON, Markdown and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, help="Measure latency and memory of ONNX models with ONNX Runtime.")


@app.command()
def bench(
    models: List[Path] = typer.Argument(..., help="ONNX models; ratios are reported against the first one."),
    target: List[str] = typer.Option(
        None, "--target", "-t",
        help="cuda, cuda:N, cpu:T (T intra-op threads) or tensorrt, with provider options after commas "
             "(cuda,prefer_nhwc=1,use_tf32=0); repeat for several (default: cuda when onnxruntime has it, else cpu:1).",
    ),
    batch: List[int] = typer.Option([1], "--batch", "-b", help="Batch size; repeat for several."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report (all samples) as JSON."),
    md_path: Optional[Path] = typer.Option(None, "--md", help="Write a Markdown report."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: latency against MACs (needs matplotlib)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="Replay a captured CUDA graph on GPU targets."),
    pin: bool = typer.Option(False, "--pin", help="Pin each CPU session's process to the same T cores (Linux); the sessions then stop their threads' spinning when a run returns."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed inferences per session before timing."),
    runs: int = typer.Option(50, "--runs", help="Timed inferences per model, target and batch."),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved rounds the runs are spread over (A B A B ...)."),
    input_shape: List[str] = typer.Option(
        None, "--input-shape", help="NAME:1x3x224x224 for dynamic dims other than the batch; repeat per input."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    tune: bool = typer.Option(
        False, "--tune",
        help="Time every model under each candidate session setting (CUDA: default, prefer_nhwc=1, CUDA graph, both; "
             "CPU: only the default exists, so it is kept), check each setting's outputs, and report the fastest "
             "passing one per model beside the default.",
    ),
    strict_fp32: bool = typer.Option(False, "--strict-fp32", help="With --tune on CUDA: use_tf32=0 on every setting."),
) -> None:
    """Benchmark ONNX models on CUDA, TensorRT and CPU targets (models interleaved round by round)."""
    import json

    from compressor.engine.loading import parse_input_shapes
    from compressor.errors import CompressorError
    from compressor.files import PendingWrites, check_output_paths
    from compressor.runtime.bench import run_benchmark
    from compressor.runtime.report import plot_report, progress_bar
    from compressor.runtime.targets import checked_targets, default_targets

    check_output_paths(list(models), {"--json": json_path, "--md": md_path, "--plot": plot_path})
    targets = checked_targets(target) if target else default_targets()
    shapes = parse_input_shapes(input_shape)
    if tune and cuda_graph:
        raise CompressorError("--tune times CUDA graphs on and off itself: leave out --cuda-graph")
    if strict_fp32 and not tune:
        raise CompressorError("--strict-fp32 chooses the settings --tune compares: add --tune")
    if plot_path is not None:
        _check_matplotlib()
    with progress_bar() as progress:
        report = run_benchmark([str(m) for m in models], targets, batch, warmup=warmup, runs=runs, rounds=rounds,
                               input_shapes=shapes, seed=seed, cuda_graph=cuda_graph, pin=pin, progress=progress,
                               tune=tune, strict_fp32=strict_fp32)
    typer.echo(report.to_text())
    with PendingWrites() as pending:
        if json_path is not None:
            pending.stage_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
        if md_path is not None:
            pending.stage_text(md_path, report.to_markdown())
        if plot_path is not None:
            plot_report(report, pending.stage_path(plot_path))
        pending.commit()
    for path in (json_path, md_path, plot_path):
        if path is not None:
            typer.echo(f"wrote {path}", err=True)


def _check_matplotlib() -> None:
    from compressor.errors import CompressorError

    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CompressorError("--plot needs matplotlib (pip install matplotlib)") from exc
