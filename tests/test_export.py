"""Export checks: a variant that does not match eager fails the command and is not left as good."""

import json

import pytest

from cxr.backends import load_backend
from export import __main__ as export_cli
from export import archive
from tests.handler_support import write_tiny_checkpoint


def run_export(tmp_path, *extra):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    args = export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "no-data"), "--output-dir",
         str(tmp_path / "out"), "--formats", "torchscript", "--repeats", "1", *extra])
    return export_cli.main(args)


def test_export_without_data_checks_on_synthetic_inputs(tmp_path):
    report = run_export(tmp_path)
    assert "synthetic" in report["checked_on"]
    row = report["variants"]["torchscript"]
    assert row["check"] == "pass" and row["max_abs_diff"] <= 1e-4 and row["label_agreement"] == 1.0
    backend = load_backend(tmp_path / "out" / "model.ts")
    assert backend.config["class_names"] == ["NORMAL", "PNEUMONIA"] and backend.config["threshold"] == 0.5
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["variants"]["eager"]["check"] == "pass"
    assert archive.fastest_exact_variant(tmp_path / "out") in ("eager", "ts")


def test_a_failed_check_fails_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_export(tmp_path, "--tolerance", "-1")
    assert stopped.value.code == 1
    assert "export check failed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.ts").exists()
    assert (tmp_path / "out" / "model.ts.failed").exists()
