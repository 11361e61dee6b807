"""The `cxr` command answers every user mistake with one line (or one JSON answer), never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr import cli
from cxr.paths import EXAMPLE_XRAYS
from cxr.server import free_ports

CXR = str(Path(sys.executable).with_name("cxr"))
EXAMPLE = next(EXAMPLE_XRAYS.glob("PNEUMONIA/*.jpeg"))


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([CXR, *arguments], capture_output=True, text=True, timeout=60)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def test_every_subcommand_help_has_an_example():
    for command in cli.EXAMPLES:
        result = run(command, "--help")
        assert result.returncode == 0 and "example:" in result.stdout, command
        assert cli.EXAMPLES[command].split("\n")[0] in result.stdout


def test_missing_and_malformed_key_files_are_named(tmp_path):
    result = run("predict", "--key-file", str(tmp_path / "none.json"), str(EXAMPLE))
    assert result.returncode == 1 and "no key file" in result.stderr and "make serve" in result.stderr
    no_traceback(result)
    broken = tmp_path / "key_file.json"
    for text in ("{not json", '{"inference": {}}', "[]"):
        broken.write_text(text)
        result = run("models", "--key-file", str(broken))
        assert result.returncode == 1 and str(broken) in result.stderr and len(result.stderr.splitlines()) == 1
        no_traceback(result)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "k1"}, "management": {"key": "k2"}}))
    return path


def test_a_stopped_server_is_one_line_naming_make_serve(key_file):
    port, grpc_port, management_port = free_ports(3)  # nothing listens there
    options = ["--key-file", str(key_file), "--port", str(port), "--grpc-port", str(grpc_port),
               "--management-port", str(management_port), "--timeout", "2"]
    for arguments in (["predict", str(EXAMPLE)], ["models"], ["predict", "--protocol", "grpc", str(EXAMPLE)]):
        result = run(*arguments, *options)  # options after the subcommand work too
        assert result.returncode == 1 and "make serve" in result.stderr, arguments
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        no_traceback(result)


def test_missing_image_files_get_a_json_answer_each(key_file, tmp_path, capsys):
    [port] = free_ports(1)
    options = ["--key-file", str(key_file), "--port", str(port)]
    assert cli.main(["explain", str(tmp_path / "missing.jpeg"), "--out", str(tmp_path / "x.png"), *options]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"file": str(tmp_path / "missing.jpeg"), "code": 400, "error": "no such file"}


def test_connection_options_before_or_after_the_subcommand():
    parser = cli.get_args_parser()
    before = parser.parse_args(["--key-file", "k.json", "--port", "9", "predict", "x.jpeg"])
    after = parser.parse_args(["predict", "--key-file", "k.json", "x.jpeg", "--port", "9"])
    assert before.key_file == after.key_file == "k.json" and before.port == after.port == 9
    assert parser.parse_args(["predict", "x.jpeg"]).key_file == "logs/serve/key_file.json"


@pytest.mark.integration
def test_an_unknown_model_lists_the_served_ones(served, capsys):
    options = ["--key-file", str(served.workdir / "key_file.json"), "--port", str(served.ports["inference"]),
               "--management-port", str(served.ports["management"])]
    assert cli.main(["predict", "--model", "no_such_model", str(EXAMPLE), *options]) == 1
    error = capsys.readouterr().err
    assert "no model named 'no_such_model'" in error and "pneumonia" in error
