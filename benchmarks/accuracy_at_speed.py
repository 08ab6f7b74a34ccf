"""Issue 12: accuracy at speed on the PyTorch side. Every row is one `compress train` command (rows in
benchmarks/accuracy_rows.py), run as parallel processes on the one GPU (each with the data resident on it), each
writing its JSON as soon as it finishes; a time guard stops cleanly and keeps what finished.

  stage-a  the strong baseline (83 epochs from the published checkpoint, 5,000 train images held out; or --baseline PT:
           evaluated and exported), alone, then the rows from it in parallel, in priority order, as many as fit in
           --time-limit (latency-aware rows only with --plan-latency: first, each alone until its plan is made).
           $OUT: rows_a.json, log_a.txt, logs_a.tar.gz, baseline.pt, slim_a_N.tar (the rows' slim ONNX).
  stage-b  --from DIR[,DIR...] (stage A folders; the first holds the trained baseline): the rows that did not fit
           (--rows none: none), then ONNX Runtime latency of every slim ONNX (baseline first, interleaved; cuda b1 +
           b128 with the CUDA EP, cpu:1 b1), the table and the plot.
           $OUT: accuracy_at_speed.json (the issue's list of rows), accuracy_at_speed_run.json (machine, skipped
           rows, settings), accuracy_at_speed.{md,png}, rows_b.json, log_b.txt, logs_b.tar.gz.
  report   --from DIR: rebuild accuracy_at_speed.{md,png} from accuracy_at_speed.json (+ _run.json), here.

Two GPUs, three calls (the exact commands of a run are in its results Markdown):
  1. GPU 0: stage-a --rows none (the baseline alone).
  2. GPU 0 and GPU 1: stage-a --baseline BASELINE.pt --rows ... (one driver per GPU, --plan-latency on one).
  3. more stage-a drivers for the rows left, then stage-b --from A,B0,B1,... --rows none (timing, table, plot).
CPU smoke (here): --device cpu --latency-device cpu:1 --limit 512 --epochs 1 --baseline-epochs 1 --rows 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_rows import (BASELINE, ROWS, VAL_SIZE, Row, baseline_argv, latency_target, load_rows,  # noqa: E402
                           markdown, pareto_plot, row_argv, row_summary, select_rows)

NAME = "accuracy_at_speed"
PART_BYTES = 15 * 2**20  # slim ONNX tar parts stay under the 16 MiB a returned file may have
MAX_PARTS = 4
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) .* ([\d.]+)s$")
PLAN_LINE = "plan removes"
STARTED = time.monotonic()


class Log:
    """Timestamped lines on stdout and in a file."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - STARTED:6.0f}s] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("stage-a", "stage-b", "report"))
    p.add_argument("--data", default=None, help="folder with cifar10-{train,test}.tar.xz")
    p.add_argument("--models", default=None, help="folder holding resnet56-*.th (stage A without --baseline)")
    p.add_argument("--baseline", default=None, help="stage A: an existing baseline .pt (skips the 83 epochs)")
    p.add_argument("--from", dest="source", default=None,
                   help="stage B / report: the folder(s) of stage A's files, comma-separated (the first holds the "
                        "trained baseline; later folders' baseline rows are ignored)")
    p.add_argument("--plan-latency", action="store_true",
                   help="stage A: run the latency-aware rows too (first, each alone until its plan is made)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="checkpoints, ONNX files and row logs [a temp dir]")
    p.add_argument("--rows", default="all", help="comma-separated row names, 'all', or a number N (the first N)")
    p.add_argument("--baseline-epochs", type=int, default=83)
    p.add_argument("--baseline-schedule", choices=("onecycle", "onecycle-torch"), default="onecycle",
                   help="stage A without --baseline: the strong recipe's OneCycle (ours, or torch's OneCycleLR)")
    p.add_argument("--baseline-val-size", type=int, default=VAL_SIZE,
                   help="stage A without --baseline: train images the baseline holds out [the rows' %(default)s; 0: "
                        "the issue's recipe on the whole train set, for its top-1 only: rows never start from it]")
    p.add_argument("--epochs", type=int, default=60, help="fine-tune epochs of every row (the same for all)")
    p.add_argument("--recipe", choices=("cosine", "onecycle"), default="cosine",
                   help="the rows' common fine-tune schedule (rows with their own recipe keep it)")
    p.add_argument("--parallel", type=int, default=12, help="row processes at once on the GPU")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole stage")
    p.add_argument("--latency-reserve", type=float, default=200.0, help="stage B: seconds kept for timing")
    p.add_argument("--latency-runs", type=int, default=60)
    p.add_argument("--latency-device", default="cuda", help="target of the latency-aware rows' plans")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="train/test images per row (smoke runs)")
    return p.parse_args(argv)


def chosen_rows(args: argparse.Namespace) -> list[Row]:
    """--rows as Row objects in priority order."""
    if args.rows == "none":
        return []
    if args.rows.isdigit():
        return list(ROWS[: int(args.rows)])
    return select_rows(args.rows)


# --- processes ---------------------------------------------------------------------------------------------------


class Proc:
    """One `compress train` process with its log."""

    def __init__(self, name: str, argv: list[str], work: Path, log: Log, epochs: int, extra: int = 0):
        self.name, self.argv, self.work, self.epochs, self.extra = name, argv, work, epochs, extra
        self.log_path = work / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COMPRESSOR_DEBUG": "1"}
        self.handle = subprocess.Popen([sys.executable, "-m", "cli.main", "train", *argv], cwd=ROOT, env=env,
                                       stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        log(f"start {name}: compress train {shlex.join(argv)}")

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines() if self.log_path.is_file() else []

    def last_epoch(self) -> tuple[int, int, float] | None:
        """(epoch, of, seconds) of its latest epoch line."""
        for line in reversed(self.lines()):
            match = EPOCH_LINE.match(line.strip())
            if match:
                return int(match[1]), int(match[2]), float(match[3])
        return None

    def stop(self) -> None:
        self.handle.terminate()
        try:
            self.handle.wait(10)
        except subprocess.TimeoutExpired:
            self.handle.kill()
            self.handle.wait()


class Pool:
    """Runs rows as parallel processes within a deadline; collects each row's JSON as soon as it finishes.

    Rows are added while every running row (and the new one) is projected to finish before the deadline even if
    the GPU were fully shared (epoch time growing in proportion to the number of processes); the epoch time is the
    one observed now (the slowest latest epoch line of the running rows). A row that cannot fit waits for a later
    call; rows still running at the deadline are stopped and reported as cut.
    """

    STARTUP = 30.0  # seconds of a row before its first epoch (data decoding, CUDA context, evaluation)
    EXPORT = 20.0  # seconds after its last epoch (evaluation, export, slimming, checks)

    def __init__(self, args, work: Path, log: Log, deadline: float, on_row):
        self.args, self.work, self.log, self.deadline, self.on_row = args, work, log, deadline, on_row
        self.running: list[Proc] = []
        self.skipped: dict[str, str] = {}
        self.alone_epoch: float | None = None

    def epoch_seconds(self) -> float:
        """Seconds per epoch now: the slowest latest epoch line among the running rows, else a guess from the
        baseline's epoch alone (batch 256; the rows' batch 512 epochs are shorter) and the rows starting."""
        seen = [e[2] for p in self.running if (e := p.last_epoch())]
        return max(seen) if seen else (self.alone_epoch or 2.5) * (1.0 + 0.25 * len(self.running))

    def remaining_epochs(self, proc: Proc) -> float:
        """Epochs `proc` still has to train: from its fine-tune epoch lines, or from its time running."""
        epoch = proc.last_epoch()
        if epoch and epoch[1] == proc.epochs:
            return proc.epochs - epoch[0]
        busy = max(time.monotonic() - proc.started - self.STARTUP, 0.0)
        return max(proc.epochs + proc.extra - busy / self.epoch_seconds(), proc.epochs)

    def fits(self, row: Row) -> bool:
        """Whether `row` and every running row would still finish if `row` joined them now."""
        n = len(self.running)
        observed = any(p.last_epoch() for p in self.running)
        epoch = self.epoch_seconds() * ((n + 1) / n if observed else 1.0)
        need = max([self.remaining_epochs(p) for p in self.running]
                   + [row.finetune_epochs(self.args.epochs) + row.extra_epochs]) * epoch
        return time.monotonic() + need + self.STARTUP + self.EXPORT <= self.deadline

    def settled(self) -> bool:
        """Every running row shows its pace (an epoch line, or a minute of running)."""
        return all(p.last_epoch() or time.monotonic() - p.started > 60 for p in self.running)

    def poll(self) -> None:
        for proc in list(self.running):
            code = proc.handle.poll()
            if code is None:
                continue
            self.running.remove(proc)
            json_path = self.work / f"{proc.name}.json"
            if code == 0 and json_path.is_file():
                metrics = json.loads(json_path.read_text())
                self.on_row(proc.name, metrics)
                self.log(f"done {proc.name}: test {metrics['test_top1']:.2f}%  MACs -{100 * metrics['macs_reduction']:.1f}%"
                         f"  ({time.monotonic() - proc.started:.0f} s)")
            else:
                tail = "\n".join(proc.lines()[-15:])
                self.skipped[proc.name] = f"failed (exit {code}): {tail.splitlines()[-1] if tail else ''}"
                self.log(f"FAILED {proc.name} (exit {code}):\n{tail}")

    def wait_for(self, proc: Proc, text: str, timeout: float) -> None:
        """Until `proc` logs `text`, ends, or `timeout` seconds pass."""
        until = min(time.monotonic() + timeout, self.deadline)
        while time.monotonic() < until and proc.handle.poll() is None and not any(text in line for line in proc.lines()):
            time.sleep(2)

    def run(self, rows: list[Row], argv_of, plan_latency: bool = True) -> None:
        """Latency-planning rows first (each alone until its plan is made), then the others in priority order.
        Only the latency rows of the first one's plan run here (they share its measured latency table, cached on this
        machine); rows planning for another target are left for the next call, which starts on a quiet GPU."""
        planning = [r for r in rows if r.plans_latency]
        later = [r for r in planning if not plan_latency or latency_target(r) != latency_target(planning[0])]
        for row in later:
            self.skipped[row.name] = ("latency plan for another target: left for the next call" if plan_latency else
                                      "latency-aware rows plan at the start of stage B, on a quiet GPU")
        queue = sorted((r for r in rows if r not in later), key=lambda r: not r.plans_latency)
        first_batch = True
        while queue or self.running:
            self.poll()
            if time.monotonic() >= self.deadline:
                break
            while queue and len(self.running) < self.args.parallel and (first_batch or self.settled()):
                row = next((r for r in queue if self.fits(r)), None)
                if row is None:
                    if not self.running:
                        for late in queue:
                            self.skipped[late.name] = "not started: it cannot finish before the time limit"
                        self.log(f"defer {', '.join(r.name for r in queue)}: cannot finish before the time limit")
                        queue.clear()
                    break
                queue.remove(row)
                proc = Proc(row.name, argv_of(row), self.work, self.log, row.finetune_epochs(self.args.epochs),
                             row.extra_epochs)
                self.running.append(proc)
                if row.plans_latency:
                    self.wait_for(proc, PLAN_LINE, 240.0)
                first_batch = first_batch and len(self.running) < 4
            time.sleep(3)
        for proc in self.running:
            epoch = proc.last_epoch()
            self.skipped[proc.name] = f"cut at the time limit (epoch {epoch[0]}/{epoch[1]})" if epoch else "cut at the time limit"
            self.log(f"stop {proc.name}: {self.skipped[proc.name]}")
            proc.stop()
        self.running = []
        for row in queue:
            self.skipped.setdefault(row.name, "not started: time limit")


# --- packing -------------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict) -> None:
    """Write through a temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def pack_slim_models(rows: dict[str, dict], work: Path, out: Path, prefix: str) -> list[str]:
    """Tar parts (each under PART_BYTES) of the rows' slim ONNX files; returns the part names."""
    files = [work / r["slim_onnx"] for r in rows.values() if (work / r["slim_onnx"]).is_file()]
    parts: list[list[Path]] = [[]]
    size = 0
    for path in sorted(files, key=lambda p: p.stat().st_size):
        if parts[-1] and size + path.stat().st_size > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(path)
        size += path.stat().st_size
    names = []
    for index, part in enumerate(parts[:MAX_PARTS], 1):
        if part:
            name = f"{prefix}_{index}.tar"
            with tarfile.open(out / name, "w") as tar:
                for path in part:
                    tar.add(path, arcname=path.name)
            names.append(name)
    return names


def pack_logs(work: Path, out: Path, name: str) -> None:
    with tarfile.open(out / name, "w:gz") as tar:
        for path in sorted(work.glob("*.log")):
            tar.add(path, arcname=path.name)


def unpack(source: Path, work: Path) -> None:
    for part in sorted(source.glob("slim_*.tar")):
        with tarfile.open(part) as tar:
            tar.extractall(work, filter="data")


# --- stages --------------------------------------------------------------------------------------------------------


def stage_a(args: argparse.Namespace, out: Path, work: Path, log: Log) -> dict:
    deadline = STARTED + args.time_limit - 45.0  # packing and the return trip
    packed: dict = {"stage": "a", "settings": vars(args), "rows": [], "skipped": {}}
    rows_path = out / "rows_a.json"

    def on_row(name: str, metrics: dict) -> None:
        packed["rows"].append(row_summary(name, metrics, args.epochs))
        write_json(rows_path, packed)

    pool = Pool(args, work, log, deadline, on_row)
    if args.baseline is None:  # the strong recipe from the published checkpoint
        published = sorted(Path(args.models or ".").rglob("resnet56-*.th"))
        if not published:
            raise SystemExit(f"no resnet56-*.th under {args.models}")
        argv, epochs = baseline_argv(str(published[0]), str(work / BASELINE), args.baseline_epochs, args.data,
                                     args.device, args.limit, args.baseline_schedule,
                                     args.baseline_val_size), args.baseline_epochs
        baseline = str(work / f"{BASELINE}.pt")
    else:  # a given baseline: evaluated, exported and slimmed (its row and its ONNX for timing)
        shutil.copy(args.baseline, work / "baseline-init.pt")
        baseline = str(work / "baseline-init.pt")
        argv, epochs = baseline_argv(baseline, str(work / BASELINE), 0, args.data, args.device, args.limit), 0
    pool.running.append(Proc(BASELINE, argv, work, log, epochs))
    while pool.running and time.monotonic() < deadline:  # alone on the GPU
        time.sleep(3)
        pool.poll()
    if not (work / f"{BASELINE}.json").is_file():
        pool.run([], None)
        packed["skipped"] = pool.skipped
        write_json(rows_path, packed)
        raise SystemExit("the baseline did not finish: nothing else can run")
    history = json.loads((work / f"{BASELINE}.json").read_text())["history"]
    pool.alone_epoch = sorted(h["seconds"] for h in history)[len(history) // 2] if history else None
    shutil.copy(baseline, out / "baseline.pt")
    pool.run(chosen_rows(args), lambda row: row_argv(row, baseline, str(work / row.name), args.epochs, args.data,
                                                      args.device, args.limit, args.latency_device, args.recipe),
             plan_latency=args.plan_latency)
    packed["skipped"] = pool.skipped
    packed["slim_parts"] = pack_slim_models({r["name"]: r for r in packed["rows"]}, work, out, "slim_a")
    write_json(rows_path, packed)
    pack_logs(work, out, "logs_a.tar.gz")
    return packed


def stage_b(args: argparse.Namespace, out: Path, work: Path, log: Log) -> dict:
    sources = [Path(s) for s in args.source.split(",") if s]
    earlier: dict[str, dict] = {}
    stage_a_files = []
    for source in sources:  # the first folder's rows win (its baseline row is the trained one)
        for name, row in load_rows(source / "rows_a.json").items():
            earlier.setdefault(name, row)
        unpack(source, work)
        if (source / "rows_a.json").is_file():
            stage_a_files.append(json.loads((source / "rows_a.json").read_text()))
    baseline = str(next(s / "baseline.pt" for s in sources if (s / "baseline.pt").is_file()))
    packed: dict = {"stage": "b", "settings": vars(args), "rows": [], "skipped": {}}

    def on_row(name: str, metrics: dict) -> None:
        packed["rows"].append(row_summary(name, metrics, args.epochs))
        write_json(out / "rows_b.json", packed)

    left = [r for r in chosen_rows(args) if r.name not in earlier]
    deadline = STARTED + args.time_limit - args.latency_reserve
    if left:
        log(f"rows left from stage A: {', '.join(r.name for r in left)}")
        pool = Pool(args, work, log, deadline, on_row)
        pool.run(left, lambda row: row_argv(row, baseline, str(work / row.name), args.epochs, args.data, args.device,
                                            args.limit, args.latency_device, args.recipe))
        packed["skipped"] = pool.skipped
    write_json(out / "rows_b.json", packed)
    pack_logs(work, out, "logs_b.tar.gz")
    rows = list(earlier.values()) + packed["rows"]
    rows.sort(key=lambda r: (not r["baseline"],))
    models = {r["name"]: str(work / r["slim_onnx"]) for r in rows if (work / r["slim_onnx"]).is_file()}
    log(f"timing {len(models)} slim models")
    latency = measure_latency(models, args.latency_runs, log)
    for r in rows:
        r["latency_ms"] = latency.get(r["name"], r["latency_ms"])
    done = {r["name"] for r in rows}
    skipped = {}
    for files in stage_a_files + [packed]:
        skipped.update({k: v for k, v in files.get("skipped", {}).items() if k not in done})
    run = {"machine": machine(), "skipped": skipped, "stage_a_settings": [f.get("settings") for f in stage_a_files],
           "stage_b_settings": vars(args)}
    write_json(out / f"{NAME}.json", issue_rows(rows))
    write_json(out / f"{NAME}_run.json", run)
    write_report(rows, run, out)
    return {"rows": rows, "skipped": skipped}


ISSUE_KEYS = ("name", "test_top1", "macs_reduction", "latency_ms", "baseline", "epochs", "command")


def issue_rows(rows: list[dict]) -> list[dict]:
    """The issue's JSON: a list of rows with its keys, everything else the driver recorded under "details"."""
    return [{**{k: r.get(k) for k in ISSUE_KEYS}, "details": {k: v for k, v in r.items() if k not in ISSUE_KEYS}}
            for r in rows]


def flat_rows(rows: list[dict]) -> list[dict]:
    """The driver's row summaries back from the issue's JSON."""
    return [{**r.get("details", {}), **{k: v for k, v in r.items() if k != "details"}} for r in rows]


def measure_latency(models: dict[str, str], runs: int, log: Log) -> dict[str, dict]:
    """p50 ms per model: cuda b1 and b128 (when the CUDA EP exists) in one interleaved benchmark, cpu:1 b1 in another."""
    import onnxruntime as ort

    from compressor.runtime.bench import run_benchmark

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    result = {name: {"cuda_b1": None, "cuda_b128": None, "cpu1": None} for name in models}
    names, paths = list(models), list(models.values())
    cells = [("cpu:1", [1], "cpu1")]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cells.insert(0, ("cuda", [1, 128], "cuda"))
    for target, batches, key in cells:
        started = time.monotonic()
        report = run_benchmark(paths, [target], batches, warmup=10, runs=runs, rounds=5, names=names, environment=False)
        for m in report.measurements:
            if target == "cuda" and m.provider != "CUDAExecutionProvider":
                raise RuntimeError(f"{m.model} ran on {m.provider}, not CUDA")
            result[m.model][key if key == "cpu1" else f"cuda_b{m.batch}"] = round(m.percentile_ms(50), 4)
        log(f"latency {target} {batches}: {time.monotonic() - started:.0f} s")
    return result


def machine() -> dict:
    import platform

    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_report(rows: list[dict], run: dict, out: Path) -> None:
    """accuracy_at_speed.md and .png from the final rows."""
    header = [f"# CIFAR-10 (JPEG) ResNet-56: accuracy at speed (issue 12)", "",
              f"Machine: {run.get('machine')}. Latency: ONNX Runtime p50 of each row's slim ONNX, all rows timed in "
              "one call, interleaved (compressor.runtime.bench; cuda with IOBinding, cpu:1 in a fresh process per "
              "model). Pareto plot: accuracy_at_speed.png.",
              "", "Skipped: " + ("; ".join(f"{k}: {v}" for k, v in run.get("skipped", {}).items()) or "none")]
    header += [""] + [f"- {note}" for note in run["notes"]] if run.get("notes") else []  # written into _run.json later
    (out / f"{NAME}.md").write_text(markdown(rows, header))
    try:
        pareto_plot(rows, out / f"{NAME}.png")
    except ImportError:
        print("matplotlib missing: no plot (run the report stage where it is installed)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "report":
        source = Path(args.source or out)
        rows = flat_rows(json.loads((source / f"{NAME}.json").read_text()))
        run_path = source / f"{NAME}_run.json"
        write_report(rows, json.loads(run_path.read_text()) if run_path.is_file() else {}, out)
        return 0
    if not args.data or (args.stage == "stage-b" and not args.source):
        raise SystemExit("--data is required (and --from for stage-b)")
    work = Path(args.work or tempfile.mkdtemp(prefix="accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    log = Log(out / ("log_a.txt" if args.stage == "stage-a" else "log_b.txt"))
    log(f"{args.stage}: {shlex.join(sys.argv)}; work {work}")
    done = stage_a(args, out, work, log) if args.stage == "stage-a" else stage_b(args, out, work, log)
    log(f"finished: {len(done['rows'])} rows, skipped {done.get('skipped')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
