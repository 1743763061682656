"""fedguard as a user installs it: the lock matches pyproject.toml, and the wheel works in a clean venv."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import lockfile  # noqa: E402

# The project's own uv (make installs it from the lock); under `make test-latest/oldest` the suite runs in another
# venv, but the lock it installs here is still the project's.
UV = next((p for p in (REPO / ".venv" / "bin" / "uv", Path(sys.executable).parent / "uv") if p.exists()),
          REPO / ".venv" / "bin" / "uv")


def test_the_lock_is_made_from_this_pyproject():
    assert lockfile.check() is None


def test_a_dependency_added_without_refreshing_the_lock_is_named_in_one_line(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (REPO / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"tomli-w>=1.0",', '"tomli-w>=1.0",\n    "requests>=2",'))
    problem = lockfile.check(REPO / "requirements.lock", pyproject)
    assert problem is not None and "\n" not in problem and "make lock" in problem
    # a comment is not a dependency: the lock stays valid
    pyproject.write_text(text.replace("[project]", "# a comment\n[project]"))
    assert lockfile.check(REPO / "requirements.lock", pyproject) is None
    # and make refuses before installing anything
    stale = tmp_path / "stale.lock"
    locked = (REPO / "requirements.lock").read_text()
    stale.write_text(locked.replace(lockfile.STAMP_PREFIX, lockfile.STAMP_PREFIX + "0"))
    assert "out of date" in lockfile.check(stale)


def test_every_locked_requirement_is_pinned_with_a_hash():
    entries = [line for line in (REPO / "requirements.lock").read_text().splitlines()
               if line and not line.startswith((" ", "#"))]
    assert len(entries) > 50
    for line in entries:
        assert "==" in line and line.endswith("\\"), line  # name==version, hashes on the next lines
    assert "uv" in lockfile.extract("uv") and "--hash=sha256:" in lockfile.extract("torch")


@pytest.mark.skipif(not UV.exists(), reason="uv is installed by `make setup`")
def test_the_wheel_installs_into_a_clean_venv_and_runs_a_shipped_config_by_name(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # no build isolation: the build backend (setuptools) is the locked one, nothing resolves
    subprocess.run([UV, "build", "--python", sys.executable, "--wheel", "--no-build-isolation", "--quiet",
                    "--out-dir", dist, str(REPO)], check=True, cwd=tmp_path)
    wheel, = dist.glob("fedguard-*.whl")
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True)
    python = venv / "bin" / "python"
    # the locked packages (from uv's cache, which make filled), without the model wheel installed --no-deps,
    # then the wheel; uv's check then proves the wheel's declared dependencies are all there
    locked = (REPO / "requirements.lock").read_text().split(lockfile.NO_DEPS_MARKER)[0]
    (tmp_path / "deps.txt").write_text(locked)
    uv_pip = [UV, "pip", "--quiet"]
    subprocess.run([*uv_pip, "sync", "--offline", "--require-hashes", "--python", python, "--find-links",
                    lockfile.TORCH_FIND_LINKS, tmp_path / "deps.txt"], check=True)
    subprocess.run([*uv_pip, "install", "--offline", "--no-deps", "--python", python, wheel], check=True)
    check = subprocess.run([UV, "pip", "check", "--python", python], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def fedguard(*args):
        proc = subprocess.run([venv / "bin" / "fedguard", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    where = subprocess.run([python, "-c", "import fedguard; print(fedguard.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where  # the installed copy, not the checkout
    assert "init" in fedguard("--help")
    shown = fedguard("show-config", "tiny")
    assert "name_or_path: tiny-llama" in shown
    fedguard("run", "tiny", "--run-dir", "run", "--quiet", "--set", "federation.rounds=1")
    assert (elsewhere / "run" / "final_adapter" / "adapter_model.safetensors").exists()
    assert (elsewhere / "run" / "report.md").exists()
    fedguard("init", "mine")
    assert (elsewhere / "mine" / "tiny.yaml").read_text() == (REPO / "configs" / "tiny.yaml").read_text()
    assert "name_or_path: tiny-llama" in fedguard("show-config", "mine/tiny.yaml")


def test_a_config_that_is_neither_a_file_nor_a_shipped_name_is_refused_with_the_names(tmp_path, monkeypatch):
    from fedguard.config import ConfigError, load_config, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert {"tiny", "default"} <= set(shipped_configs())
    assert load_config("tiny.yaml").model.name_or_path == "tiny-llama"
    with pytest.raises(ConfigError, match="shipped configs, usable by name: .*tiny"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="not found: sub/tiny.yaml"):
        load_config("sub/tiny.yaml")  # a path is a path: no fallback to the shipped one
    (tmp_path / "tiny.yaml").write_text("name: mine\nmodel: {name_or_path: tiny-llama}\n")
    assert load_config("tiny.yaml").name == "mine"  # a local file wins over the shipped name
