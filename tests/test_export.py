"""Export checks: a variant that does not match eager fails the command and is not left as good."""

import json
import zipfile

import pytest

from cxr_core.backends import load_backend
from export import __main__ as export_cli
from export import archive
from tests.conftest import REPO
from tests.handler_support import write_tiny_checkpoint


def run_export(tmp_path, *extra):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    args = export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "no-data"), "--output-dir",
         str(tmp_path / "out"), "--formats", "ts", "--repeats", "1", *extra])
    return export_cli.main(args)


def test_export_without_data_checks_on_the_example_xrays(tmp_path):
    report = run_export(tmp_path)
    assert "20 example X-rays" in report["checked_on"]
    row = report["variants"]["ts"]
    assert row["check"] == "pass" and row["max_abs_diff"] <= 1e-4 and row["label_agreement"] == 1.0
    backend = load_backend(tmp_path / "out" / "model.ts")
    assert backend.config.class_names == ("NORMAL", "PNEUMONIA") and backend.config.threshold == 0.5
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["variants"]["eager"]["check"] == "pass"
    assert archive.fastest_exact_variant(tmp_path / "out") in ("eager", "ts")


def test_a_model_of_other_classes_exports_without_data(tmp_path):
    """The adult model (OPACITY / NO_OPACITY) in a clone without the data: checked on the example X-rays, whose
    folders name other classes (their labels are not used)."""
    args = export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(REPO / "models" / "adult" / "model.pt"), "--data", str(tmp_path / "no-data"),
         "--output-dir", str(tmp_path / "out"), "--formats", "onnx", "--repeats", "1"])
    report = export_cli.main(args)
    assert "20 example X-rays" in report["checked_on"] and report["variants"]["onnx"]["check"] == "pass"


def test_a_failed_check_fails_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_export(tmp_path, "--tolerance", "-1")
    assert stopped.value.code == 1
    assert "export check failed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.ts").exists()
    assert (tmp_path / "out" / "model.ts.failed").exists()


def test_a_second_version_gets_its_own_archive_files(tmp_path):
    assert archive.archive_stem("pneumonia", None, "1.0") == "pneumonia"
    assert archive.archive_stem("pneumonia", "onnx", "2.0") == "pneumonia_onnx-2.0"
    run_export(tmp_path)
    store = tmp_path / "store"
    for version in ("1.0", "2.0"):
        archive.main(archive.get_args_parser().parse_args(
            ["--export-dir", str(tmp_path / "out"), "--model-store", str(store), "--version", version,
             "--variants", "ts", "--default", "ts", "--gate", ""]))
    assert sorted(p.name for p in store.glob("*.mar")) == [
        "pneumonia-2.0.mar", "pneumonia.mar", "pneumonia_ts-2.0.mar", "pneumonia_ts.mar"]


def test_another_threshold_is_embedded_without_touching_the_checkpoint(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", threshold=0.5)
    before = checkpoint.read_bytes()
    export_cli.main(export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), "--formats", "ts",
         "--repeats", "1", "--threshold", "0.25", "--data", str(tmp_path / "no-data")]))
    assert checkpoint.read_bytes() == before
    for name in ("model.pt", "model.ts"):  # ONNX embeds the same config dict (test_handler covers that backend)
        assert load_backend(tmp_path / "out" / name).config.threshold == 0.25, name


def test_archives_carry_the_core_package_and_nothing_operational():
    shipped = set(archive.serving_modules())
    assert {"__init__.py", "backends.py", "inputs.py", "variants.py", "preprocessing.py", "gate.py"} <= shipped
    operational = {"data.py", "metrics.py", "report.py", "server.py", "client.py", "cli.py", "paths.py", "demo.py"}
    assert not shipped & operational


def test_an_archive_holds_the_model_the_handler_and_exactly_the_core_package(tmp_path):
    run_export(tmp_path)
    store = tmp_path / "store"
    archive.main(archive.get_args_parser().parse_args(
        ["--export-dir", str(tmp_path / "out"), "--model-store", str(store), "--variants", "--default", "ts"]))
    with zipfile.ZipFile(store / "pneumonia.mar") as packed:
        files = set(packed.namelist())
    core = {f"cxr_core/{name}" for name in archive.serving_modules()}
    assert core == {path.relative_to(archive.REPO).as_posix() for path in archive.CORE.glob("*.py")}
    assert files == core | {"model.ts", "cxr_handler.py", "model-config.yaml", "ood_gate.pt",
                            "MAR-INF/MANIFEST.json"}
