"""graph-rw scoring time against the number of filters (issue 12, the seed's reviewers' question), on CPU.

One group of n filters of a 3x3 conv with n input channels (W is n x 9n, seeded Gaussian): the ridge regression
edges (M = WW^T + rho I, inverted by block elimination), the random walk (dense solve up to 128 filters, power
iteration above) and the LIS eigenvalues, timed separately (median of --repeat runs), for the exact spec and the
scale-invariant variant (rw_normalize). Then the whole method's scoring of every group of the ResNet-20 example.

    OPENBLAS_NUM_THREADS=1 python benchmarks/graph_rw_scoring_time.py --out benchmarks/results [--sizes 16,32,...] [--repeat 3]

Writes graph_rw_scoring_time.{md,json} into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.methods import graph_rw as rw  # noqa: E402


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def time_group(n: int, repeat: int) -> dict:
    """Seconds of each scoring step for one n-filter group."""
    w = np.random.default_rng(n).standard_normal((n, 9 * n))
    edges_s, alpha = timed(lambda: rw.ridge_regression_edges(w), repeat)
    adjacency = rw.edge_weights(alpha)
    walk_s, _ = timed(lambda: rw.stationary_distribution(adjacency), repeat)
    lis_s, _ = timed(lambda: rw.layer_importance(adjacency), repeat)
    total_s, _ = timed(lambda: rw.filter_scores(w), repeat)
    normalized_s, _ = timed(lambda: rw.filter_scores(w, normalize=True), repeat)
    return {"filters": n, "weights_per_filter": 9 * n, "edges_s": edges_s, "walk_s": walk_s, "lis_s": lis_s,
            "total_s": total_s, "total_normalized_s": normalized_s,
            "walk_method": "dense" if n <= rw.DENSE_SOLVE_MAX_N else "power"}


def time_model(path: Path, repeat: int) -> dict:
    """Seconds to score every prunable group of an ONNX model with graph-rw (analysis excluded)."""
    from compressor.engine.analysis import analyze
    from compressor.engine.plan import PlanOptions, prunable_groups

    analysis = analyze(str(path))
    options = PlanOptions(0.5)
    groups = prunable_groups(analysis, options)
    seconds, _ = timed(lambda: rw.scores_graph_rw(analysis, options), repeat)
    return {"model": path.name, "groups": len(groups), "filters": int(sum(analysis.groups[g].size for g in groups)),
            "largest_group": int(max(analysis.groups[g].size for g in groups)), "seconds": seconds}


def markdown(record: dict) -> str:
    lines = ["# graph-rw: scoring time vs number of filters (CPU)", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['machine']}; numpy {record['numpy']}; BLAS threads {record['blas_threads']}; "
             f"{record['date']}. The development machine is shared (2 cores, other jobs running; one BLAS thread keeps "
             f"idle threads from spinning against them): times are medians of {record['repeat']} runs.", "",
             "One group of n filters of a 3x3 conv with n input channels (W: n x 9n). Edges: ridge leave-one-out "
             "regression (O(n^2 d + n^3)); walk: dense solve up to 128 filters, power iteration above (O(n^2) per "
             "step); LIS: eigenvalues of the symmetrized edge matrix (O(n^3)).", "",
             "| filters n | weights per filter | edges s | walk s | LIS s | total s | total, scale-invariant s | walk |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["groups"]:
        lines.append(f"| {r['filters']} | {r['weights_per_filter']} | {r['edges_s']:.4f} | {r['walk_s']:.4f} | "
                     f"{r['lis_s']:.4f} | {r['total_s']:.4f} | {r['total_normalized_s']:.4f} | {r['walk_method']} |")
    big = record["groups"][-1]
    lines += ["", f"From {record['groups'][0]['filters']} to {big['filters']} filters the total grows "
              f"{big['total_s'] / max(record['groups'][0]['total_s'], 1e-9):.0f}x; the scale-invariant variant adds "
              "one row normalization (no measurable cost)."]
    if record.get("model"):
        m = record["model"]
        lines += ["", f"Whole model: {m['model']}, {m['groups']} prunable groups, {m['filters']} filters (largest "
                  f"group {m['largest_group']}): {m['seconds']:.3f} s to score every group."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="16,32,64,128,256,512,1024,2048")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default=str(ROOT / "examples" / "resnet20-cifar10.onnx"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = []
    for n in (int(v) for v in args.sizes.split(",")):
        groups.append(time_group(n, args.repeat))
        print(f"{n} filters: {groups[-1]['total_s']:.4f} s", file=sys.stderr, flush=True)
    threads = os.environ.get("OPENBLAS_NUM_THREADS")
    record = {"command": (f"OPENBLAS_NUM_THREADS={threads} " if threads else "") + "python " + " ".join(["benchmarks/graph_rw_scoring_time.py", *(argv or sys.argv[1:])]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "numpy": np.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "repeat": args.repeat, "groups": groups, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
              "model": time_model(Path(args.model), args.repeat) if Path(args.model).is_file() else None}
    (out / "graph_rw_scoring_time.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "graph_rw_scoring_time.md").write_text(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
