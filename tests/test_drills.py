"""The reliability drills, short version (seconds each): a real TorchServe under load survives a soak, a killed
worker, 3x overload and a storm of malformed input. `make drills` runs the full version."""

import pytest

from loadtest import drills
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, data_root):
    from export import __main__ as export_cli

    folder = tmp_path_factory.mktemp("drill-export")
    export_cli.main(export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(REPO / "models" / "pneumonia" / "model.pt"), "--data", str(data_root),
         "--output-dir", str(folder), "--formats", "onnx", "--check-images", "32", "--repeats", "1"]))
    return folder


def test_short_drills_meet_their_goals(export_dir, sample_paths, tmp_path):
    args = drills.get_args_parser().parse_args(
        ["--export-dir", str(export_dir), "--variant", "onnx", "--samples", str(sample_paths[0].parent.parent),
         "--short", "--concurrency", "8", "--output", str(tmp_path / "reliability.md")])
    results = drills.main(args)
    soak, crash, overload, storm = (results[k] for k in ("soak", "crash", "overload", "storm"))
    assert results["peak"] > 0
    assert soak["failures"] == 0 and soak["requests"] > 0
    assert crash["recovery_s"] is not None and crash["recovery_s"] <= 30
    assert crash["failures"] <= crash["concurrency"]  # at most the requests in flight at the kill
    assert overload["at_3x"]["statuses"].get("0", 0) == 0  # no connection dropped or hung
    assert overload["after_at_half"]["failures"] == 0  # back to normal once the load drops
    assert storm["bad_got_4xx"] == storm["bad"] and storm["good_got_200"] == storm["good"]
    assert storm["healthy_after"] and not storm["worker_restarted"]
    assert "Reliability drills" in (tmp_path / "reliability.md").read_text()
