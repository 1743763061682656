"""The structure as a checked contract: fedguard's layers import downward with no cycles (pyproject.toml's
import-linter contracts), a lazy import says what start-up time it saves, and the model loader loads the path
it is given."""

import ast

import pytest

from conftest import REPO, tiny_config

SRC = REPO / "src" / "fedguard"
# Modules whose imports of fedguard sit inside functions by design: each says why in its docstring.
LAZY_MODULES = {"cli.py"}


def test_the_layers_import_downward_without_cycles(capsys):
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 kept, 0 broken" in out, out


def _function_imports(tree: ast.Module):
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in top and node.level == 0 \
                and (node.module or "").startswith("fedguard"):
            yield node
        elif isinstance(node, ast.Import) and id(node) not in top \
                and any(a.name.startswith("fedguard") for a in node.names):
            yield node


def test_a_lazy_import_of_fedguard_says_what_it_saves():
    """An import inside a function hides a dependency from whoever reads the module's imports; one stays only
    where it saves start-up time, with a ``# lazy:`` comment on the line above saying what it saves."""
    unexplained = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in LAZY_MODULES or "/proto/" in f"/{rel}":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        type_checking = {id(n) for block in tree.body if isinstance(block, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in _function_imports(tree):
            if id(node) in type_checking:
                continue
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if not above.startswith("# lazy:"):
                unexplained.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)
    assert "lazy" in (SRC / "cli.py").read_text(encoding="utf-8").split('"""')[1]  # cli.py says why in its docstring


def test_the_loader_loads_the_path_it_is_given():
    """Which model a run starts from is the assembler's choice (alignment.load_start_model): the loader refuses
    to guess for an aligned config, and loads exactly the folder it is given."""
    from fedguard.alignment import start_model_path
    from fedguard.model.loading import load_base_model
    from fedguard.model.registry import resolve_model_path

    cfg = tiny_config(model={"aligned": True, "precision": "fp32"}).model
    with pytest.raises(ValueError, match="load_start_model"):
        load_base_model(cfg)
    plain = cfg.model_copy(update={"aligned": False})
    assert start_model_path(plain) == resolve_model_path(plain.name_or_path)
    assert load_base_model(cfg, start_model_path(plain)).path == resolve_model_path(plain.name_or_path)
