"""`compress bench --tune`: candidate session settings, their output checks and the choice, on the CPU (the CUDA path
runs through the CPU provider with IOBinding, as in test_bench.py). Structure and rules only, never timings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from compressor.runtime import sessions
from compressor.runtime.bench import run_benchmark
from compressor.runtime.inputs import input_specs, make_inputs
from compressor.runtime.settings import (CandidateResult, SessionSetting, SettingCheck, candidate_settings, check_fp32,
                                         check_reduced, choose_setting, fp32_reference)
from compressor.runtime.targets import Target, parse_target
from test_bench import cuda_on_cpu, run_cli, tiny_cnn  # noqa: F401 - cuda_on_cpu is a fixture


# ------------------------------------------------------------------------------------------------------ candidates
def test_cuda_candidates_are_default_nhwc_and_cuda_graphs():
    found = candidate_settings(parse_target("cuda:1"))
    assert [c.name for c in found] == ["default", "prefer_nhwc=1", "cuda graph", "prefer_nhwc=1 + cuda graph"]
    assert [c.target.label for c in found] == ["cuda:1", "cuda:1,prefer_nhwc=1"] * 2
    assert [c.cuda_graph for c in found] == [False, False, True, True]
    assert found[0].is_default and not any(c.is_default for c in found[1:])


def test_strict_fp32_turns_tf32_off_everywhere_and_given_options_stay():
    strict = candidate_settings(parse_target("cuda,prefer_nhwc=1"), strict_fp32=True)
    assert [c.name for c in strict] == ["default", "cuda graph"]  # prefer_nhwc=1 is already the target's
    assert all(dict(c.target.options) == {"prefer_nhwc": "1", "use_tf32": "0"} for c in strict)


def test_cpu_has_only_its_default_and_tensorrt_its_graph():
    assert candidate_settings(parse_target("cpu:4")) == [SessionSetting(Target("cpu", threads=4))]
    assert [c.name for c in candidate_settings(parse_target("tensorrt"))] == ["default", "cuda graph"]


# ----------------------------------------------------------------------------------------------------------- choice
def passed_check(passed: bool) -> SettingCheck:
    return SettingCheck("test", 0.0 if passed else 1.0, 0.5, passed)


def test_choice_is_the_fastest_passing_setting():
    target = parse_target("cuda")
    default, nhwc, graph, both = candidate_settings(target)
    results = [CandidateResult(default, 3.0, passed_check(True)), CandidateResult(nhwc, 1.0, passed_check(False)),
               CandidateResult(graph, None, failure="capture failed"), CandidateResult(both, 2.0, passed_check(True))]
    best = choose_setting(results)
    assert best is results[3] and [r.chosen for r in results] == [False, False, False, True]
    assert [r.passed for r in results] == [True, False, False, True]
    assert choose_setting([CandidateResult(nhwc, 1.0, passed_check(False))]) is None
    only = CandidateResult(SessionSetting(Target("cpu", threads=1)), 5.0)  # the only candidate: no check
    assert choose_setting([only]) is only and only.passed


# ------------------------------------------------------------------------------------------------------------ checks
@pytest.fixture(scope="module")
def fp32_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "tiny.onnx"
    onnx.save(tiny_cnn(8), path)
    feeds = make_inputs(input_specs(onnx.load(path), 4), 0)
    reference, noise = fp32_reference(str(path), feeds)
    fused = sessions.cpu_session(str(path), optimization="all").run(None, feeds)
    return reference, noise, fused


def test_fp32_check_accepts_a_rounding_and_refuses_a_changed_output(fp32_case):
    reference, noise, fused = fp32_case
    good = check_fp32(fused, reference, noise, default_outputs=fused)
    assert good.passed and good.relative_error <= good.tolerance
    assert good.tolerance >= 1e-4 and "optimizations off" in good.reference
    scale = np.abs(reference[0]).max()
    wrong = [reference[0].copy()]
    wrong[0][:, 3] += 0.01 * scale  # one class logit moved by 1% of the output's scale
    bad = check_fp32(wrong, reference, noise, default_outputs=fused)
    assert not bad.passed and bad.relative_error == pytest.approx(0.01, rel=1e-3)
    # a default setting that is itself 1% off (as TF32 can be) sets the noise: ten times that is accepted
    assert check_fp32(wrong, reference, noise, default_outputs=wrong).passed


def test_reduced_precision_check_uses_the_precision_limit(fp32_case):
    reference = fp32_case[0]
    half_percent = [reference[0] * 1.005]
    two_percent = [reference[0] * 1.02]
    assert check_reduced(half_percent, reference, "fp16").passed
    failed = check_reduced(two_percent, reference, "fp16")
    assert not failed.passed and failed.tolerance == 0.01 and failed.relative_error == pytest.approx(0.02, rel=1e-3)
    assert check_reduced(two_percent, reference, "int8").passed  # int8's limit is 0.25


# ---------------------------------------------------------------------------------------------------- whole bench
def test_tuned_cuda_path_excludes_a_setting_whose_outputs_change(cuda_on_cpu, monkeypatch):
    plain_outputs = sessions.SessionRunner.outputs

    def nhwc_changes_results(runner):
        outputs = plain_outputs(runner)
        return [o * 1.05 for o in outputs] if dict(runner.target.options).get("prefer_nhwc") else outputs

    monkeypatch.setattr(sessions.SessionRunner, "outputs", nhwc_changes_results)
    report = run_benchmark([tiny_cnn(8), tiny_cnn(4)], ["cuda"], [2], warmup=1, runs=4, rounds=2, tune=True)
    assert len(report.tuning) == 8 and len(report.measurements) == 8
    for model in ("tiny8", "tiny4"):
        rows = {r["setting"]: r for r in report.tuning if r["model"] == model}
        assert set(rows) == {"default", "prefer_nhwc=1", "cuda graph", "prefer_nhwc=1 + cuda graph"}
        assert rows["default"]["passed"] and rows["cuda graph"]["passed"]
        assert not rows["prefer_nhwc=1"]["passed"] and not rows["prefer_nhwc=1 + cuda graph"]["passed"]
        assert rows["prefer_nhwc=1"]["check"]["relative_error"] == pytest.approx(0.05, rel=1e-3)
        chosen = [r for r in rows.values() if r["chosen"]]
        assert len(chosen) == 1 and chosen[0]["setting"] in ("default", "cuda graph")
        assert chosen[0]["p50_ms"] == min(rows["default"]["p50_ms"], rows["cuda graph"]["p50_ms"])
    best = {r["model"]: r for r in report.to_dict()["best_settings"]}
    first = [r for r in report.tuning if r["model"] == "tiny8"]
    first_default = next(r["p50_ms"] for r in first if r["setting"] == "default")
    first_best = next(r["p50_ms"] for r in first if r["chosen"])
    assert best["tiny4"]["speedup_vs_first_default"] == pytest.approx(first_default / best["tiny4"]["chosen_p50_ms"])
    assert best["tiny4"]["speedup_vs_first_best"] == pytest.approx(first_best / best["tiny4"]["chosen_p50_ms"])
    assert report.cell("cuda:0", 2)[0].setting == "default"  # ratios are against the first model's default
    assert set(report.settings["session_options"]) == {"cuda:0 [default]", "cuda:0 [prefer_nhwc=1]",
                                                       "cuda:0 [cuda graph]", "cuda:0 [prefer_nhwc=1 + cuda graph]"}
    markdown = report.to_markdown()
    assert "## Session settings (--tune)" in markdown and "prefer_nhwc=1 + cuda graph" in markdown


def test_a_setting_that_cannot_run_is_recorded_and_not_chosen():
    def with_missing_provider(target, strict_fp32):
        return [SessionSetting(target), SessionSetting(Target("tensorrt"), name="tensorrt")]

    report = run_benchmark([tiny_cnn(4)], ["cpu:1"], [1], warmup=1, runs=2, rounds=1, tune=True, with_cost=False,
                           candidates=with_missing_provider, environment=False)
    rows = {r["setting"]: r for r in report.tuning}
    assert rows["tensorrt"]["failure"] and not rows["tensorrt"]["passed"] and not rows["tensorrt"]["chosen"]
    assert rows["default"]["chosen"] and rows["default"]["check"]["passed"]
    assert [m.setting for m in report.measurements] == ["default"]


def test_cli_tune_on_cpu_keeps_the_default_and_says_why(tmp_path, capsys):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(4), model)
    code = run_cli(["bench", str(model), "--target", "cpu:1", "--tune", "--runs", "2", "--warmup", "0", "--rounds", "1",
                    "--json", str(tmp_path / "r.json")])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "cpu:1: one candidate only" in out and "tiny [default] *" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tuning"][0]["chosen"] and data["tuning"][0]["check"] is None
    assert data["best_settings"][0]["chosen_setting"] == "default" and data["settings"]["tune"] is True


@pytest.mark.parametrize("args, message", [(["--tune", "--cuda-graph"], "leave out --cuda-graph"),
                                           (["--strict-fp32"], "add --tune")])
def test_cli_refuses_contradicting_options(tmp_path, capsys, args, message):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(4), model)
    assert run_cli(["bench", str(model), "--target", "cpu:1", *args]) not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_merged_reports_keep_every_candidate(cuda_on_cpu):
    from compressor.runtime.report import merge_reports

    parts = [run_benchmark([tiny_cnn(4)], ["cuda"], [batch], warmup=0, runs=2, rounds=1, tune=True, with_cost=False)
             for batch in (1, 2)]
    merged = merge_reports(parts)
    assert [(r["batch"], r["setting"]) for r in merged.tuning] == [(r["batch"], r["setting"]) for p in parts
                                                                  for r in p.tuning]
    assert len(merged.to_dict()["best_settings"]) == 2
