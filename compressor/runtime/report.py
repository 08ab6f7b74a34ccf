"""What `compress bench` reports: measurements, ratios against the first model, and the outputs (stdout table,
JSON, Markdown, PNG plot, progress bar). Measuring lives in compressor.runtime.bench, the environment in probes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from compressor.errors import CompressorError
from compressor.runtime.settings_report import best_settings, settings_lines
from compressor.runtime.tables import markdown_table, number, ratio, text_table


@dataclass
class ModelInfo:
    """A benchmarked model: its name in tables, path, file size, and MACs/params per image (None when unknown;
    `cost_error` then says why the engine could not count them)."""

    index: int
    name: str
    path: str | None
    file_bytes: int
    macs: int | None
    params: int | None
    cost_error: str | None = None
    precision: str | None = None  # fp32, fp16 or int8, read from the graph


@dataclass
class Measurement:
    """One model on one target at one batch size: latency samples and what follows from them, memory, creation time
    and the first (untimed) inference's time, which holds cuDNN's algorithm search on GPU targets.

    memory: {"kind": "gpu" | "cpu-rss" | "cpu-rss-in-process", "source": how it was read, "added_mb": what the
    session added (GPU: device memory after its warm-up minus before its creation, the other sessions idle; CPU: peak
    RSS minus RSS before the session), "peak_mb": peak RSS of the fresh child process (CPU) or None}; GPU entries
    also carry "cell_growth_during_runs_mb", what all sessions of that target and batch added during the timed runs.
    """

    model: str
    model_index: int
    target: str
    provider: str
    batch: int
    input_shapes: dict[str, list[int]]
    warmup: int
    latencies_ms: list[float]
    round_medians_ms: list[float]
    session_create_s: float
    memory: dict[str, Any]
    first_run_s: float | None = None
    file_bytes: int | None = None
    macs: int | None = None
    params: int | None = None
    cuda_graph: bool = False
    pinned_cores: list[int] | None = None
    precision: str | None = None
    setting: str | None = None  # --tune: the candidate session setting (compressor.runtime.settings), else None
    chosen: bool | None = None  # --tune: the fastest setting of this model that passed its check
    check: dict[str, Any] | None = None  # --tune: the setting's output check (None: the only candidate)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0-100, linear interpolation) of the latency samples."""
        return float(np.percentile(self.latencies_ms, q))

    @property
    def runs(self) -> int:
        """Number of timed inferences."""
        return len(self.latencies_ms)

    @property
    def p50_ms(self) -> float:
        """Median latency."""
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        """90th percentile latency."""
        return self.percentile_ms(90)

    @property
    def p99_ms(self) -> float:
        """99th percentile latency."""
        return self.percentile_ms(99)

    @property
    def mean_ms(self) -> float:
        """Mean latency."""
        return float(np.mean(self.latencies_ms))

    @property
    def throughput(self) -> float:
        """Images (batch items) per second at the median latency (the statistic speedups use too)."""
        return self.batch * 1000.0 / self.p50_ms

    @property
    def memory_mb(self) -> float | None:
        """The headline memory figure: peak RSS of the child process for CPU, memory the session adds on a GPU."""
        return self.memory.get("peak_mb") if self.memory.get("peak_mb") is not None else self.memory.get("added_mb")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, with the summary statistics added."""
        data = asdict(self)
        data.update(runs=self.runs, p50_ms=self.p50_ms, p90_ms=self.p90_ms, p99_ms=self.p99_ms, mean_ms=self.mean_ms,
                    min_ms=float(np.min(self.latencies_ms)), std_ms=float(np.std(self.latencies_ms)),
                    throughput_per_s=self.throughput, memory_mb=self.memory_mb)
        return data


@dataclass
class BenchReport:
    """All measurements of one `compress bench` run, with the schedule that produced them and the environment."""

    models: list[ModelInfo]
    measurements: list[Measurement]
    schedule: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    tuning: list[dict[str, Any]] = field(default_factory=list)  # --tune: every candidate setting, failed ones too

    def cells(self) -> list[tuple[str, int]]:
        """(target, batch) pairs in measurement order."""
        return list(dict.fromkeys((m.target, m.batch) for m in self.measurements))

    def cell(self, target: str, batch: int) -> list[Measurement]:
        """The measurements of one target and batch, in model order."""
        return sorted((m for m in self.measurements if m.target == target and m.batch == batch),
                      key=lambda m: (m.model_index, m.setting not in (None, "default")))

    def ratios(self) -> list[dict[str, Any]]:
        """Each model against the first one, pair by pair on the same target and batch.

        speedup_p50 = first p50 / this p50; paired_speedup = median over rounds of the per-round ratio of medians
        (the two ran back to back in each round); other ratios are this / first.
        """
        rows = []
        for target, batch in self.cells():
            group = self.cell(target, batch)
            if not group or group[0].model_index != 0:
                continue
            base = group[0]
            for other in group[1:]:
                paired = [b / o for b, o in zip(base.round_medians_ms, other.round_medians_ms) if o > 0]
                rows.append({
                    "model": other.model, "baseline": base.model, "target": target, "batch": batch,
                    "setting": other.setting,
                    "speedup_p50": ratio(base.p50_ms, other.p50_ms),
                    "paired_speedup": float(np.median(paired)) if paired else None,
                    "throughput_ratio": ratio(other.throughput, base.throughput),
                    "macs_ratio": ratio(other.macs, base.macs), "params_ratio": ratio(other.params, base.params),
                    "memory_ratio": ratio(other.memory_mb, base.memory_mb),
                    "size_ratio": ratio(other.file_bytes, base.file_bytes),
                })
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able."""
        return {"models": [asdict(m) for m in self.models], "measurements": [m.to_dict() for m in self.measurements],
                "ratios": self.ratios(), "schedule": self.schedule, "settings": self.settings,
                "environment": self.environment, "tuning": self.tuning, "best_settings": best_settings(self)}

    def save_json(self, path: str | os.PathLike) -> None:
        """Write to_dict() as indented JSON (atomically)."""
        from compressor.files import write_text

        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["model", "prec", "target", "batch", "MACs", "params", "p50 ms", "p90 ms", "p99 ms", "img/s (p50)",
                  "speedup (p50)", "MACs x", "mem MB", "create s"]
        speedups = {(r["model"], r["target"], r["batch"], r.get("setting")): r["speedup_p50"] for r in self.ratios()}
        rows = []
        for target, batch in self.cells():
            group = self.cell(target, batch)
            base = group[0]
            for m in group:
                speedup = 1.0 if m is base else speedups.get((m.model, m.target, m.batch, m.setting))
                name = m.model + (f" [{m.setting}]{' *' if m.chosen else ''}" if m.setting else "")
                rows.append([name, m.precision or "?", m.target, str(m.batch), _human(m.macs), _human(m.params),
                             f"{m.p50_ms:.3f}", f"{m.p90_ms:.3f}", f"{m.p99_ms:.3f}", f"{m.throughput:.1f}",
                             number(speedup, 2, "x"), number(ratio(m.macs, base.macs), 3),
                             number(m.memory_mb, 1), f"{m.session_create_s:.2f}"])
        return header, rows

    def to_text(self) -> str:
        """A fixed-width table for stdout, then one line on how memory was measured."""
        header, rows = self._table_rows()
        lines = text_table([header, *rows], right=range(1, len(header)))
        lines.append(_MEMORY_NOTE)
        if self.tuning:
            lines += ["", *settings_lines(self, markdown=False)]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown report: results table, ratios, settings and environment."""
        header, rows = self._table_rows()
        out = ["# Benchmark", "", "## Results", "", *markdown_table([header, *rows])]
        out += ["", _MEMORY_NOTE, "speedup = p50 of the first model / p50 of this model, same target and batch; "
                "MACs x = MACs of this model / MACs of the first (per image).", ""]
        ratios = self.ratios()
        if ratios:
            table = [["model", "target", "batch", "speedup (p50)", "paired speedup", "throughput x", "MACs x", "params x",
                      "memory x", "size x"]]
            for r in ratios:
                model = r["model"] + (f" [{r['setting']}]" if r.get("setting") else "")
                cells = [r["speedup_p50"], r["paired_speedup"], r["throughput_ratio"], r["macs_ratio"], r["params_ratio"],
                         r["memory_ratio"], r["size_ratio"]]
                table.append([model, r["target"], str(r["batch"]), *(number(c, 3) for c in cells)])
            out += ["## Ratios against the first model", "", *markdown_table(table), ""]
        if self.tuning:
            out += ["## Session settings (--tune)", "", *settings_lines(self, markdown=True), ""]
        out += ["## Settings", "", "```json", json.dumps(self.settings, indent=2), "```", "",
                "## Environment", ""]
        out += [f"- **{key}**: {_flat(value)}" for key, value in self.environment.items()]
        out.append("")
        return "\n".join(out)


def merge_reports(reports: list[BenchReport]) -> BenchReport:
    """One report from several runs over the same models (e.g. GPU targets at batch 1 and 32, CPU targets at batch 1):
    measurements and schedules concatenated, targets and session options united, warmup/runs/rounds/batches given
    per target where they differ, the first run's environment."""
    if not reports:
        raise CompressorError("no reports to merge")
    first = reports[0]
    if any([m.name for m in r.models] != [m.name for m in first.models] for r in reports):
        raise CompressorError("reports over different models cannot be merged")
    settings = dict(first.settings)
    for key in ("warmup", "runs", "rounds", "batches"):
        per_target = {t: r.settings.get(key) for r in reports for t in r.settings.get("targets", [])}
        if len({json.dumps(v) for v in per_target.values()}) > 1:
            settings[key] = per_target
    settings["targets"] = list(dict.fromkeys(t for r in reports for t in r.settings.get("targets", [])))
    settings["session_options"] = {k: v for r in reports for k, v in r.settings.get("session_options", {}).items()}
    return BenchReport(models=first.models, measurements=[m for r in reports for m in r.measurements],
                       schedule=[s for r in reports for s in r.schedule], settings=settings,
                       environment=first.environment, tuning=[t for r in reports for t in r.tuning])


_MEMORY_NOTE = ("mem MB: CPU targets: peak RSS of a fresh process holding only that model's session; "
                "GPU targets: device memory the session added (after its warm-up, minus before its creation).")


def _human(count: int | None) -> str:
    if count is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _flat(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# --------------------------------------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def progress_bar(every_s: float = 5.0) -> Iterator[Any]:
    """A progress callback (done, total, what) for run_benchmark: a rich bar on a terminal's stderr; elsewhere (logs,
    pipes, no rich) a plain stderr line at most every `every_s` seconds."""
    rich_ok = sys.stderr.isatty()
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        rich_ok = False
    if not rich_ok:
        last = [0.0]

        def plain(done: int, total: int, what: str) -> None:
            now = time.monotonic()
            if now - last[0] >= every_s or done == total:
                last[0] = now
                print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

        yield plain
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("benchmarking", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


def plot_report(report: BenchReport, path: str | os.PathLike) -> None:
    """Save a PNG: one panel per target and batch, p50 latency against MACs per image (params, then model index,
    when MACs are unknown), one marker per model, each model joined to the first by a line."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CompressorError("--plot needs matplotlib (pip install matplotlib)") from exc
    cells = report.cells()
    if not cells:
        raise CompressorError("nothing to plot: the report has no measurements")
    columns = min(len(cells), 2)
    rows = (len(cells) + columns - 1) // columns
    figure = Figure(figsize=(6.5 * columns, 4.5 * rows))
    FigureCanvasAgg(figure)
    markers = "o^sDv<>pP*Xhd"
    names = [m.name for m in report.models]
    for panel, (target, batch) in enumerate(cells, start=1):
        axes = figure.add_subplot(rows, columns, panel)
        group = report.cell(target, batch)
        x_values, x_label = _plot_x(group)
        base = group[0]
        for m, x in zip(group, x_values):
            if m is not base:
                axes.plot([x_values[0], x], [base.p50_ms, m.p50_ms], color="0.75", linewidth=0.8, zorder=1)
        for m, x in zip(group, x_values):
            axes.scatter([x], [m.p50_ms], marker=markers[m.model_index % len(markers)], s=60 if m is base else 36,
                         color=f"C{m.model_index % 10}", label=m.model, zorder=2, edgecolors="black", linewidths=0.4)
        axes.set_title(f"{target}, batch {batch}")
        axes.set_xlabel(x_label)
        axes.set_ylabel("p50 latency (ms)")
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(names)), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.04 + 0.03 * ((len(names) + 3) // 4) / rows, 1, 1))
    figure.savefig(str(path), dpi=120, format="png")


def _plot_x(group: list[Measurement]) -> tuple[list[float], str]:
    if all(m.macs is not None for m in group):
        return [m.macs / 1e9 for m in group], "MACs per image (G)"
    if all(m.params is not None for m in group):
        return [m.params / 1e6 for m in group], "parameters (M)"
    return [float(m.model_index) for m in group], "model index"
