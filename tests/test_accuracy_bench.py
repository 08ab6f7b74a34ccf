"""benchmarks/accuracy_at_speed.py's pure parts: every row is a valid `compress train` command, the table, the
Pareto plot and the packing of slim models (the GPU run itself is smoke-tested on CPU, see its docstring)."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy_at_speed as driver  # noqa: E402
import accuracy_rows as rows  # noqa: E402


def parse_train(argv: list[str]) -> dict:
    from typer.main import get_command

    from cli.train_cmd import app

    return get_command(app).make_context("train", list(argv)).params


def test_every_row_is_a_valid_compress_train_command():
    assert len(set(rows.ROW_NAMES)) == len(rows.ROWS)
    for row in rows.ROWS:
        argv = rows.row_argv(row, "base.pt", f"w/{row.name}", 60, "data", "cuda", None, "cuda")
        params = parse_train(argv)
        assert params["epochs"] == (row.epochs or 60) and str(params["init"]) == "base.pt"
        assert str(params["out"]) == f"w/{row.name}" and params["val_size"] == rows.VAL_SIZE
        assert (str(params["distill"]) == "base.pt") == row.kd
        assert (params["target"] == "latency") == row.plans_latency
    base = parse_train(rows.baseline_argv("pub.th", "w/baseline", 83, "data", "cuda", None))
    assert (base["epochs"], base["batch_size"], base["lr"], base["schedule"], base["weight_decay"], base["nesterov"]) \
        == (83, 256, 0.1, "onecycle", 5e-4, True)
    assert base["val_size"] == rows.VAL_SIZE  # the rows' searches never judge on images the baseline trained on
    torch_cycle = parse_train(rows.baseline_argv("pub.th", "w/b", 83, "data", "cuda", None, "onecycle-torch"))
    assert torch_cycle["schedule"] == "onecycle-torch" and torch_cycle["lr"] == 0.1
    onecycle = parse_train(rows.row_argv(rows.row_by_name("gsm-kd-onecycle"), "b", "o", 60, "d", "cuda", None))
    assert (onecycle["schedule"], onecycle["lr"]) == ("onecycle", 0.1)
    plain, common = (parse_train(rows.row_argv(rows.row_by_name("l1-kd"), "b", "o", 60, "d", "cuda", None, "cuda", r))
                     for r in ("cosine", "onecycle"))
    assert (plain["schedule"], plain["lr"], common["schedule"], common["lr"]) == ("cosine", 0.05, "onecycle", 0.1)
    assert [r.name for r in rows.select_rows("l1,gsm-kd")] == ["l1", "gsm-kd"]  # the order given is the priority
    with pytest.raises(SystemExit):
        rows.select_rows("nope")


def test_seed_replicates_change_the_training_seed_only():
    chosen = rows.select_rows("gsm-kd@1,gsm-kd,gsm-kd-seed2")
    assert [r.name for r in chosen] == ["gsm-kd-seed1", "gsm-kd", "gsm-kd-seed2"]
    one, base = (parse_train(rows.row_argv(r, "b.pt", "o", 60, "d", "cuda", None)) for r in chosen[:2])
    assert (one["seed"], base["seed"]) == (1, 0)
    assert {k: v for k, v in one.items() if k != "seed"} == {k: v for k, v in base.items() if k != "seed"}
    assert rows.row_by_name("l1-kd-seed3").label.endswith("(seed 3)")
    table = [fake_row("baseline", 91.0, 2.4, True), fake_row("gsm-kd", 90.0, 2.2), fake_row("gsm-kd-seed1", 90.4, 2.2),
             fake_row("l1-kd", 89.0, 2.3)]
    summary = rows.seed_summary(table)
    assert any(line.startswith("- gsm-kd: 90.20 ± 0.28 (90.00, 90.40)") for line in summary)
    assert not any("l1-kd" in line for line in summary) and rows.seed_summary(table[:2]) == []
    assert "90.20 ± 0.28" in rows.markdown(table, ["# t"])


def test_the_device_scripts_row_lists_name_known_rows():
    import re

    for script_name, keys in (("device_issue12_14.sh", ("R0", "R1")), ("device_issue12.sh", ("R",))):
        script = (ROOT / "benchmarks" / script_name).read_text()
        for key in keys:
            names = re.search(rf"{key}=\$\{{{key}:-([^}}]*)\}}", script)[1]
            assert len(rows.select_rows(names)) == len(names.split(","))


def test_the_whole_train_set_baseline_holds_nothing_out():
    default = parse_train(rows.baseline_argv("p.th", "o", 83, "d", "cuda", None))
    whole = parse_train(rows.baseline_argv("p.th", "o", 83, "d", "cuda", None, "onecycle-torch", 0))
    assert (default["val_size"], whole["val_size"]) == (rows.VAL_SIZE, 0)
    assert {k: v for k, v in whole.items() if k not in ("val_size", "schedule")} == {
        k: v for k, v in default.items() if k not in ("val_size", "schedule")}


def test_cpu_proxy_rows_are_valid_compress_train_commands(tmp_path):
    import cpu_proxy_r20

    common = ["--data", "d", "--models", "m", "--out", str(tmp_path), "--work", str(tmp_path)]
    ramp_rows = cpu_proxy_r20.experiment_rows(cpu_proxy_r20.parse_args(["mask-ramp", *common]), "r20.th")
    assert [fields for _, fields, _ in ramp_rows] == [{"schedule": s, "mask_ramp_epochs": r}
                                                       for s in ("cosine", "onecycle") for r in (0.0, 2.0)]
    for _, fields, argv in ramp_rows:
        params = parse_train(argv)
        assert (params["schedule"], params["mask_ramp_epochs"], params["prune"], params["ratio"]) == (
            fields["schedule"], fields["mask_ramp_epochs"], "l1", 0.6)
        assert str(params["distill"]) == str(params["init"]) == "r20.th"
    amsc_rows = cpu_proxy_r20.experiment_rows(cpu_proxy_r20.parse_args(["amsc-weights", *common]), "r20.th")
    for name, fields, argv in amsc_rows:
        params = parse_train(argv)
        assert (params["method"], params["amsc_weights"], params["search"], params["schedule"]) == (
            "amsc", fields["weights"], True, "onecycle")
    assert [f["weights"] for _, f, _ in amsc_rows] == ["adaptive", "uniform", "reverse"]


def fake_row(name: str, top1: float, b128: float | None, baseline: bool = False) -> dict:
    return {"name": name, "label": name, "test_top1": top1, "macs_reduction": 0.0 if baseline else 0.6,
            "latency_ms": {"cuda_b1": 1.0, "cuda_b128": b128, "cpu1": 3.0}, "baseline": baseline, "epochs": 60,
            "command": f"compress train -o {name}", "kd": name.endswith("-kd"), "blocks_removed": 0,
            "filters_removed": 10}


def test_table_and_pareto_plot(tmp_path):
    table = [fake_row("baseline", 91.0, 2.4, True), fake_row("baseline-ft", 91.2, 2.4), fake_row("l1-kd", 90.5, 1.2),
             fake_row("gsm", 90.0, None)]
    text = rows.markdown(table, ["# t"])
    line = next(l for l in text.splitlines() if l.startswith("| l1-kd"))
    assert "| -0.50 | -0.70 |" in line and "| 2.00 |" in line and "| yes |" in line
    assert "`compress train -o gsm`" in text
    assert rows.pareto_plot(table, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000
    none = fake_row("gsm", 90.0, None)
    none["latency_ms"]["cpu1"] = None
    assert not rows.pareto_plot([none], tmp_path / "none.png")


def test_report_carries_the_run_notes(tmp_path):
    table = [fake_row("baseline", 91.0, 2.4, True), fake_row("l1-kd", 90.5, 1.2)]
    driver.write_report(table, {"skipped": {}, "notes": ["the whole train set: 90.75%"]}, tmp_path)
    text = (tmp_path / "accuracy_at_speed.md").read_text()
    assert "- the whole train set: 90.75%" in text and text.index("90.75%") < text.index("| l1-kd")
    driver.write_report(table, {"skipped": {}}, tmp_path)
    assert "90.75%" not in (tmp_path / "accuracy_at_speed.md").read_text()


def test_slim_models_are_packed_in_parts(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    for name in ("a", "b", "c"):
        (work / f"{name}.slim.onnx").write_bytes(bytes(600))
    monkeypatch.setattr(driver, "PART_BYTES", 1300)
    parts = driver.pack_slim_models({n: {"slim_onnx": f"{n}.slim.onnx"} for n in "abc"}, work, out, "slim_a")
    assert parts == ["slim_a_1.tar", "slim_a_2.tar"]
    back = tmp_path / "back"
    driver.unpack(out, back)
    assert sorted(p.name for p in back.iterdir()) == ["a.slim.onnx", "b.slim.onnx", "c.slim.onnx"]
    with tarfile.open(out / "slim_a_1.tar") as tar:
        assert len(tar.getnames()) == 2
