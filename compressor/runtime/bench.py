"""Latency and memory of ONNX models under ONNX Runtime: the measuring half of `compress bench`.

A session is one model on one target at one batch size. GPU sessions (cuda, tensorrt) run in this process with
inputs and outputs resident on the device (IOBinding); CPU sessions run in a fresh child process
(compressor.runtime.handles) so that the child's peak RSS belongs to that one model.
`run_benchmark` opens the sessions of all models for one target and batch, then times them in interleaved rounds
(A B A B ...) so that drift (clocks, heat, other tenants) hits every model alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from compressor.errors import CompressorError, first_line
from compressor.runtime.handles import ChildSession, LocalSession, SessionHandle, megabytes
from compressor.deploy.precision import model_precision
from compressor.runtime.inputs import InputSpec, ModelRef, graph_inputs, make_inputs, read_model_header, specs_from_inputs
from compressor.runtime.probes import GpuMemoryProbe, capture_environment, primed_gpu_probe
from compressor.runtime.report import BenchReport, Measurement, ModelInfo
from compressor.runtime.sessions import session_options_dict
from compressor.runtime.settings import (CandidateResult, SessionSetting, candidate_settings, check_fp32, check_reduced,
                                         choose_setting, fp32_reference)
from compressor.runtime.targets import Target, check_provider_available, parse_target

ProgressFn = Callable[[int, int, str], None]  # (done, total, what is running now)
CandidatesFn = Callable[[Target, bool], list[SessionSetting]]  # (target, strict_fp32) -> settings, default first


@dataclass
class Job:
    """One model prepared for benchmarking."""

    index: int
    info: ModelInfo
    inputs: list[onnx.ValueInfoProto]
    source: str  # the path a session loads


_COST_CACHE: dict[tuple, tuple[int | None, int | None, str | None]] = {}


def _model_cost(model: ModelRef, specs: list[InputSpec]) -> tuple[int | None, int | None, str | None]:
    """MACs and params per image from compressor.engine.cost, cached per file; (None, None, why) when the engine
    refuses the model (a CompressorError: MACs are a column of the report, never a reason to refuse measuring).
    Any other exception is a bug and propagates."""
    from compressor.engine.cost import model_cost

    shapes = {spec.name: list(spec.shape) for spec in specs}
    key = None
    if not isinstance(model, onnx.ModelProto):
        stat = os.stat(model)
        key = (os.path.realpath(model), stat.st_mtime_ns, stat.st_size, json.dumps(shapes, sort_keys=True))
        if key in _COST_CACHE:
            return _COST_CACHE[key]
    try:
        cost = model_cost(model, shapes)
        result = (int(cost.macs), int(cost.params), None)
    except CompressorError as exc:
        result = (None, None, str(exc))
    if key is not None:
        _COST_CACHE[key] = result
    return result


def _prepare_jobs(models: list[ModelRef], names: list[str] | None, input_shapes: dict | None, scratch: str,
                  with_cost: bool) -> list[Job]:
    names = list(names) if names else _default_names(models)
    if len(names) != len(models):
        raise CompressorError(f"{len(names)} names given for {len(models)} models")
    jobs = []
    for index, (model, name) in enumerate(zip(models, names)):
        header = read_model_header(model)
        inputs = graph_inputs(header)
        no_cost = (None, None, None)
        macs, params, cost_error = _model_cost(model, specs_from_inputs(inputs, None, input_shapes)) if with_cost else no_cost
        if isinstance(model, onnx.ModelProto):
            path = os.path.join(scratch, f"model{index}.onnx")
            onnx.save(model, path)
            file_bytes, shown_path = os.path.getsize(path), None
        else:
            path, file_bytes, shown_path = str(model), os.path.getsize(model), str(model)
        info = ModelInfo(index=index, name=name, path=shown_path, file_bytes=file_bytes, macs=macs, params=params,
                         cost_error=cost_error, precision=model_precision(header))
        jobs.append(Job(index, info, inputs, path))
    return jobs


def _default_names(models: list[ModelRef]) -> list[str]:
    names = [Path(m).stem if not isinstance(m, onnx.ModelProto) else (m.graph.name or f"model{i}") for i, m in enumerate(models)]
    duplicated = {n for n in names if names.count(n) > 1}
    return [f"{n}#{i}" if n in duplicated else n for i, n in enumerate(names)]


def _growth_mb(probe: GpuMemoryProbe | None, before: int | None) -> float | None:
    after = probe.used_bytes() if probe is not None else None
    return None if after is None or before is None else megabytes(after - before)


def runs_per_round(runs: int, rounds: int) -> list[int]:
    """`runs` spread over at most `rounds` rounds, the first ones one run longer where it does not divide."""
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]


def _check_counts(warmup: int, runs: int, batches: list[int]) -> None:
    if runs < 1:
        raise CompressorError(f"--runs must be at least 1 (got {runs})")
    if warmup < 0:
        raise CompressorError(f"--warmup cannot be negative (got {warmup})")
    if not batches or min(batches) < 1:
        raise CompressorError(f"batch sizes must be at least 1 (got {batches})")


def _open_session(job: Job, target: Target, specs: list[InputSpec], *, seed: int, cuda_graph: bool, warmup: int,
                  pin: bool, isolate: bool, gpu_probe: GpuMemoryProbe | None) -> SessionHandle:
    if isolate:
        return ChildSession(job.source, target, specs, seed, cuda_graph, warmup, pin)
    return LocalSession(job.source, target, specs, seed, cuda_graph, warmup, gpu_probe)


def _measurement(job: Job, target: Target, batch: int, specs: list[InputSpec], handle: SessionHandle, rounds_ms: list[list[float]],
                 memory: dict[str, Any], warmup: int, cuda_graph: bool, **tuned: Any) -> Measurement:
    return Measurement(**tuned,
        model=job.info.name, model_index=job.index, target=target.label, provider=handle.opened.provider, batch=batch,
        input_shapes={s.name: list(s.shape) for s in specs}, warmup=warmup,
        latencies_ms=[ms for chunk in rounds_ms for ms in chunk],
        round_medians_ms=[float(np.median(chunk)) for chunk in rounds_ms], session_create_s=handle.opened.create_s,
        first_run_s=handle.opened.first_run_s,
        memory=memory, file_bytes=job.info.file_bytes, macs=job.info.macs, params=job.info.params,
        cuda_graph=cuda_graph and target.on_gpu, pinned_cores=handle.opened.pinned_cores, precision=job.info.precision,
    )


def _bench_cell(jobs: list[Job], specs_by_job: list[list[InputSpec]], target: Target, batch: int, chunks: list[int],
                open_options: dict[str, Any], schedule: list[dict], advance: Callable[[str], None]) -> list[Measurement]:
    """Open every model's session on one target and batch, time them in interleaved rounds, close them."""
    handles = []
    try:
        for job, specs in zip(jobs, specs_by_job):
            handles.append(_open_session(job, target, specs, **open_options))
            advance(f"{target} batch {batch}: opened {job.info.name}")
        gpu_probe = open_options["gpu_probe"]
        used_before_runs = gpu_probe.used_bytes() if gpu_probe else None
        timed: list[list[list[float]]] = [[] for _ in jobs]
        for round_index, count in enumerate(chunks):
            for job, handle in zip(jobs, handles):
                timed[job.index].append(handle.time_runs(count))
                schedule.append({"target": target.label, "batch": batch, "round": round_index, "model_index": job.index,
                                 "runs": count})
                advance(f"{target} batch {batch}: round {round_index + 1}/{len(chunks)} {job.info.name}")
        growth = _growth_mb(gpu_probe, used_before_runs)
        measurements = []
        for job, specs, handle in zip(jobs, specs_by_job, handles):
            figures = handle.finish()
            if growth is not None:
                figures["cell_growth_during_runs_mb"] = growth  # all sessions of the cell together
            measurements.append(_measurement(job, target, batch, specs, handle, timed[job.index], figures,
                                             open_options["warmup"], open_options["cuda_graph"]))
        return measurements
    finally:
        for handle in handles:
            handle.close()


def _open_candidates(job: Job, target: Target, specs: list[InputSpec], open_options: dict[str, Any],
                     candidates: list[SessionSetting]) -> list[tuple[CandidateResult, SessionHandle | None]]:
    """Open one session per candidate setting of `job` on `target` and check each one's outputs (settings.py)."""
    single = len(candidates) == 1
    opened: list[tuple[CandidateResult, SessionHandle | None]] = []
    reference = noise = default_outputs = None
    for setting in candidates:
        options = {**open_options, "cuda_graph": setting.cuda_graph, "isolate": open_options["isolate"] and single}
        try:
            handle = _open_session(job, setting.target, specs, **options)
        except CompressorError as exc:
            if setting.is_default:
                raise
            opened.append((CandidateResult(setting, None, failure=first_line(exc)), None))
            continue
        result = CandidateResult(setting, None)
        opened.append((result, handle))
        if single:
            continue
        outputs = handle.runner.outputs()
        if setting.is_default:
            default_outputs = outputs
        if job.info.precision in ("fp16", "int8"):
            result.check = check_reduced(outputs, default_outputs, job.info.precision)
        else:
            if reference is None:
                reference, noise = fp32_reference(job.source, make_inputs(specs, open_options["seed"]))
            result.check = check_fp32(outputs, reference, noise, default_outputs)
    return opened


def _tuned_cell(jobs: list[Job], specs_by_job: list[list[InputSpec]], target: Target, batch: int, chunks: list[int],
                open_options: dict[str, Any], schedule: list[dict], advance: Callable[[str], None],
                candidates: list[SessionSetting]) -> tuple[list[Measurement], list[dict[str, Any]]]:
    """Every model under every candidate setting on one target and batch, all sessions timed in interleaved rounds;
    per model the fastest setting that passes its check is chosen. Returns the measurements (target = the target
    as given, `setting` = the candidate) and one row per candidate, those that could not run included."""
    per_job: list[list[tuple[CandidateResult, SessionHandle | None]]] = []
    try:
        for job, specs in zip(jobs, specs_by_job):
            per_job.append(_open_candidates(job, target, specs, open_options, candidates))
            advance(f"{target} batch {batch}: opened {job.info.name} ({len(per_job[-1])} settings)")
        running = [(job, result, handle) for job, pairs in zip(jobs, per_job) for result, handle in pairs if handle]
        timed: dict[int, list[list[float]]] = {id(h): [] for _, _, h in running}
        for round_index, count in enumerate(chunks):
            for job, result, handle in running:
                timed[id(handle)].append(handle.time_runs(count))
                schedule.append({"target": target.label, "batch": batch, "round": round_index, "model_index": job.index,
                                 "setting": result.setting.name, "runs": count})
            advance(f"{target} batch {batch}: round {round_index + 1}/{len(chunks)}")
        measurements, rows = [], []
        for job, specs, pairs in zip(jobs, specs_by_job, per_job):
            for result, handle in pairs:
                if handle is not None:
                    result.p50_ms = float(np.median([ms for chunk in timed[id(handle)] for ms in chunk]))
            choose_setting([result for result, _ in pairs])
            for result, handle in pairs:
                rows.append(_candidate_row(job, target, batch, result))
                if handle is not None:
                    measurements.append(_measurement(
                        job, target, batch, specs, handle, timed[id(handle)], handle.finish(), open_options["warmup"],
                        result.setting.cuda_graph, setting=result.setting.name, chosen=result.chosen,
                        check=result.check.to_dict() if result.check else None))
        return measurements, rows
    finally:
        for pairs in per_job:
            for _, handle in pairs:
                if handle is not None:
                    handle.close()


def _candidate_row(job: Job, target: Target, batch: int, result: CandidateResult) -> dict[str, Any]:
    return {"model": job.info.name, "model_index": job.index, "precision": job.info.precision, "target": target.label,
            "batch": batch, "setting": result.setting.name, "session_target": result.setting.target.label,
            "cuda_graph": result.setting.cuda_graph, "p50_ms": result.p50_ms, "passed": result.passed,
            "chosen": result.chosen, "failure": result.failure,
            "check": result.check.to_dict() if result.check else None}


def measure(model: ModelRef, target: Target | str, batch: int = 1, warmup: int = 10, runs: int = 50, *,
            input_shapes: dict[str, list[int]] | None = None, seed: int = 0, cuda_graph: bool = False, pin: bool = False,
            isolate: bool | None = None, with_cost: bool = True, memory: bool = True) -> Measurement:
    """Measure one session: latency samples and percentiles, throughput, session creation time, memory, MACs.

    `isolate` runs the session in a fresh child process (default: yes for CPU targets, so peak RSS is the model's own;
    pass False for many quick in-process measurements). GPU memory is what the session adds on the device;
    `memory=False` skips the GPU memory probe (and the primer session it needs), `with_cost=False` the MAC count.
    """
    report = run_benchmark([model], [target], [batch], warmup=warmup, runs=runs, rounds=1, input_shapes=input_shapes,
                           seed=seed, cuda_graph=cuda_graph, pin=pin, isolate=isolate, with_cost=with_cost,
                           memory=memory, environment=False)
    return report.measurements[0]


def run_benchmark(models: list[ModelRef], targets: list[Target | str], batches: list[int] = (1,), *, warmup: int = 10,
                  runs: int = 50, rounds: int = 5, input_shapes: dict[str, list[int]] | None = None, seed: int = 0,
                  cuda_graph: bool = False, pin: bool = False, isolate: bool | None = None,
                  names: list[str] | None = None, progress: ProgressFn | None = None, with_cost: bool = True,
                  memory: bool = True, environment: bool = True, tune: bool = False,
                  strict_fp32: bool = False, candidates: CandidatesFn = candidate_settings) -> BenchReport:
    """Benchmark every model on every target at every batch size, interleaving the models round by round.

    For each target and batch, the sessions of all models are opened one after another (each warmed up right away,
    so the memory a session adds is measured while the others are idle), then `runs` timed inferences per model are
    spread over `rounds` rounds in the order A B A B ... Ratios against the first model are in the report.

    `tune=True` times every model under every candidate session setting of each target (compressor.runtime.settings:
    on CUDA prefer_nhwc and CUDA graphs, `strict_fp32` adds use_tf32=0; CPU has only its default), all sessions of a
    target and batch interleaved, checks each setting's outputs, and marks per model the fastest setting that passes;
    the report keeps every candidate (`tuning`) and the default rows beside the chosen ones. `candidates(target,
    strict_fp32)` lists the settings (default first; the default's failure is an error, another's is recorded).
    """
    if not models:
        raise CompressorError("no models to benchmark")
    parsed = [t if isinstance(t, Target) else parse_target(t) for t in targets]
    if not parsed:
        raise CompressorError("no targets to benchmark on")
    batches = [int(b) for b in batches]
    _check_counts(warmup, runs, batches)
    for target in parsed:
        check_provider_available(target)
    chunks = runs_per_round(runs, rounds)
    cells = [(t, b) for t in parsed for b in batches]
    total = len(cells) * (len(models) + len(chunks)) if tune else len(cells) * len(models) * (1 + len(chunks))
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    measurements, schedule, tuning = [], [], []
    with tempfile.TemporaryDirectory(prefix="compressor-bench-") as scratch:
        jobs = _prepare_jobs(list(models), names, input_shapes, scratch, with_cost)
        if progress:
            progress(0, total, "opening sessions")
        for target, batch in cells:
            use_child = (target.kind == "cpu") if isolate is None else isolate
            gpu_probe = primed_gpu_probe(target) if memory and target.on_gpu and not use_child else None
            open_options = {"seed": seed, "cuda_graph": cuda_graph, "warmup": warmup, "pin": pin, "isolate": use_child,
                            "gpu_probe": gpu_probe}
            specs_by_job = [specs_from_inputs(job.inputs, batch, input_shapes) for job in jobs]
            if tune:
                cell, rows = _tuned_cell(jobs, specs_by_job, target, batch, chunks, open_options, schedule, advance,
                                         candidates(target, strict_fp32))
                measurements, tuning = measurements + cell, tuning + rows
            else:
                measurements += _bench_cell(jobs, specs_by_job, target, batch, chunks, open_options, schedule, advance)
    settings = {"warmup": warmup, "runs": runs, "rounds": len(chunks), "seed": seed, "cuda_graph": cuda_graph, "pin": pin,
                "input_shapes": input_shapes or {}, "batches": batches, "targets": [t.label for t in parsed],
                "session_options": {t.label: session_options_dict(t, cuda_graph) for t in parsed}, "tune": tune}
    if tune:
        settings["strict_fp32"] = strict_fp32
        settings["session_options"] = {f"{t.label} [{c.name}]": session_options_dict(c.target, c.cuda_graph)
                                       for t in parsed for c in candidates(t, strict_fp32)}
    env = capture_environment(parsed) if environment else {}
    return BenchReport(models=[job.info for job in jobs], measurements=measurements, schedule=schedule,
                       settings=settings, environment=env, tuning=tuning)
