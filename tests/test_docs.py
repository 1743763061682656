"""Every `fedguard` command in the README and the guides (fenced code blocks) is one the command line accepts:
parsed by fedguard's own parser, its config and `--set` overrides validated where it names a config of this
repository; the commands that take seconds (show-config, init, --help) are run."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs" / "guide").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|/[A-Z_]+/|^RUN_DIR")  # CONFIG, DIR, RUN_DIR/adapters: the reader's


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv after `fedguard`) of each fedguard command in the file's fenced blocks."""
    out = []
    text = path.read_text(encoding="utf-8")
    for block in FENCE.finditer(text):
        line_no = text[: block.start()].count("\n") + 2
        logical, start = "", line_no
        for k, line in enumerate(block.group(1).splitlines()):
            if not logical:
                start = line_no + k
            logical += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            words, logical = shlex.split(logical, comments=True), ""
            words = [w for w in words if "=" not in w or not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=value prefixes
            if words and words[0] in (".venv/bin/fedguard", "fedguard"):
                out.append((f"{path.relative_to(REPO)}:{start}", words[1:]))
    return out


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


def test_the_docs_have_commands_to_check():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and "README.md" in where and len(where) >= 6, where


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_is_one_fedguard_accepts(where, argv, monkeypatch, tmp_path, capsys):
    from fedguard import cli
    from fedguard.config import load_config

    monkeypatch.chdir(REPO)
    try:
        args = cli._parser().parse_args(argv)
    except SystemExit as exc:
        if argv[-1:] == ["--help"] and exc.code == 0:
            return
        pytest.fail(f"{where}: `fedguard {shlex.join(argv)}` is refused: {capsys.readouterr().err.strip()}")
    config = getattr(args, "config", None)
    if config and not PLACEHOLDER.search(str(config)) and (Path(config).is_file() or "/" not in str(config)):
        load_config(config, getattr(args, "overrides", None) or [])  # field names and values, as the command would
    if args.command in ("show-config", "init"):
        if args.command == "init":
            argv = ["init", str(tmp_path / "configs")]
        assert cli.main(argv) == 0, where
