"""The reliability drills, short version (seconds each): a real TorchServe under load survives a soak, a killed
worker, 3x overload and a storm of malformed input. `make drills` runs the full version."""

import pytest

from loadtest import drills
from tests.serving_support import slow_machine_config

pytestmark = pytest.mark.integration


def test_short_drills_meet_their_goals(served, sample_paths, tmp_path):
    """Functional goals only: how fast a worker comes back is the drill report's number (`make drills`), not a
    test's, since a shared 2-core CI machine can take minutes to import torch."""
    args = drills.get_args_parser().parse_args(
        ["--export-dir", str(served.export_dir), "--variant", "onnx", "--model-config",
         str(slow_machine_config(tmp_path / "model-config.yaml", workers=2)),
         "--samples", str(sample_paths[0].parent.parent), "--short", "--concurrency", "8", "--recovery-timeout",
         "900", "--output", str(tmp_path / "reliability.md")])
    results = drills.main(args)
    soak, crash, overload, storm = (results[k] for k in ("soak", "crash", "overload", "storm"))
    assert results["peak"] > 0
    assert soak["failures"] == 0 and soak["requests"] > 0
    assert crash["recovery_s"] is not None
    assert crash["failures"] <= crash["concurrency"]  # at most the requests in flight at the kill
    assert overload["at_3x"]["statuses"].get("0", 0) == 0  # no connection dropped or hung
    assert overload["after_at_half"]["failures"] == 0  # back to normal once the load drops
    assert storm["bad_got_4xx"] == storm["bad"] and storm["good_got_200"] == storm["good"]
    assert storm["healthy_after"] and not storm["worker_restarted"]
    hostile = results["hostile"]
    assert hostile["bad_got_4xx"] == hostile["bad"] and hostile["good_got_200"] == hostile["good"]
    assert not hostile["worker_restarted"] and hostile["peak_growth_mb"] <= 300
    assert "Reliability drills" in (tmp_path / "reliability.md").read_text()
