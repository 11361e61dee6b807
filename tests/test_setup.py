"""Set-up on a machine that is not ours: the system-package script and the Java that TorchServe gets."""

import os
import re
import subprocess

import pytest

from cxr import server
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "system-deps.sh"


def fake_java(folder, major: str):
    """A `java` that prints the banner of Java `major`."""
    (folder / "bin").mkdir(parents=True)
    java = folder / "bin" / "java"
    java.write_text(f'#!/bin/sh\necho \'openjdk version "{major}" 2025-04-15\' >&2\n')
    java.chmod(0o755)
    return java


def test_java_version_is_read_from_its_banner(tmp_path):
    assert server.java_major(str(fake_java(tmp_path / "17", "17.0.15"))) == 17
    assert server.java_major(str(fake_java(tmp_path / "8", "1.8.0_402"))) == 1
    assert server.java_major(str(tmp_path / "none")) == 0


def test_an_older_java_home_is_replaced_or_refused(tmp_path, monkeypatch):
    old = fake_java(tmp_path / "jdk8", "1.8.0_402").parent.parent
    new = fake_java(tmp_path / "jdk17", "17.0.15").parent.parent
    assert server.with_java({"JAVA_HOME": str(new)})["JAVA_HOME"] == str(new)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [str(new / "bin" / "java")])
    assert server.with_java({"JAVA_HOME": str(old)})["JAVA_HOME"] == str(new)
    monkeypatch.setattr(server.glob, "glob", lambda pattern: [])
    with pytest.raises(RuntimeError, match="make java"):
        server.with_java({"JAVA_HOME": str(old)})


def run_script(*arguments, path: str | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **({"PATH": path} if path else {})}
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, env=environment,
                          timeout=120)


def test_script_accepts_what_is_already_there():
    assert run_script("python", "python3").returncode == 0
    assert run_script("java").returncode == 0  # make test needs Java anyway


def test_script_names_a_python_too_old_or_missing(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")  # fails the version check like an old interpreter
    old.chmod(0o755)
    result = run_script("python", str(old))
    assert result.returncode == 1 and "needs Python >= 3.11" in result.stderr
    result = run_script("python", "no-such-python")
    assert result.returncode == 1 and "not found" in result.stderr


def test_script_without_root_or_sudo_says_what_to_install(tmp_path):
    """As a user who is not root and has no sudo, the Java step names the package instead of failing quietly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"id": "echo 1000", "java": "echo 'openjdk version \"11.0.2\"' >&2",
                       "apt-get": "exit 0"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("sed", "head", "env", "bash", "sh"):  # what the script itself runs, but no sudo
        target = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(target)
    result = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "java"], capture_output=True, text=True,
                            env={"PATH": str(bin_dir), "JVM_DIR": str(tmp_path / "jvm")}, timeout=60)
    assert result.returncode == 1 and "not root and no sudo" in result.stderr
    assert "openjdk-17-jre-headless" in result.stderr and "found: 11" in result.stdout


@pytest.mark.parametrize("requirements, lock", [("requirements.txt", "requirements.lock"),
                                                ("requirements-runtime.txt", "requirements-runtime.lock")])
def test_the_lock_pins_every_requirement_to_a_hash(requirements, lock):
    """`make lock` output stays in step with the requirements it was made from: same versions, one sha256 per
    package, and `make setup` installs it with --require-hashes."""
    def pins(text: str) -> dict[str, str]:
        found = {}
        for line in text.splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split(" ")[0].split("==")
                found[name.lower().replace("_", "-")] = version
        return found

    locked_text = (REPO / lock).read_text()
    wanted, locked = pins((REPO / requirements).read_text()), pins(locked_text)
    assert {name: locked.get(name) for name in wanted} == wanted, f"run `make lock` after changing {requirements}"
    body = [line for line in locked_text.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"\S+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in body)
    assert "--require-hashes -r requirements.lock" in (REPO / "Makefile").read_text()
