"""Starting TorchServe: waiting for it copes with what a slow machine shows half-done."""

import pytest

from cxr import server
from tests.serving_support import StillRunning


def test_a_half_written_key_file_means_not_ready_yet(tmp_path):
    """TorchServe writes key_file.json while it starts; seen half-written, it must be waited for, not fatal."""
    (tmp_path / "key_file.json").write_text('{"management": {"ke')
    [port] = server.free_ports(1)
    with pytest.raises(TimeoutError, match="not ready"):
        server.wait_ready(tmp_path, port, ["pneumonia"], StillRunning(), timeout=1.5)
