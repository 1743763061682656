"""The structure as a checked contract: fedguard's layers import downward with no cycles (pyproject.toml's
import-linter contracts), a lazy import says what start-up time it saves, and the model loader loads the path
it is given."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config

SRC = REPO / "src" / "fedguard"


def test_the_layers_import_downward_without_cycles():
    """pyproject.toml's import-linter contracts, run as `lint-imports` is (in its own process: it reconfigures
    logging, which would silence fedguard's loggers in this one)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout, run.stdout


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
    where it saves start-up time, with a ``# lazy:`` comment above it (or above the block of imports it is in)
    saying what it saves."""
    unexplained = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if "/proto/" in f"/{rel}":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        import_lines = {ln for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                        for ln in range(n.lineno, n.end_lineno + 1)}
        type_checking = {id(n) for block in tree.body if isinstance(block, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in _function_imports(tree):
            if id(node) in type_checking:
                continue
            k = node.lineno - 2  # the line above; over the imports (and blank lines) of the same block
            while k >= 0 and (k + 1 in import_lines or not lines[k].strip()):
                k -= 1
            if k < 0 or not lines[k].strip().startswith("# lazy:"):
                unexplained.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)


def test_the_command_line_imports_no_torch_until_a_command_runs():
    """`fedguard --help` and config errors stay fast: building the parser of every command family imports
    neither torch nor Flower, gRPC or cryptography."""
    code = ("import sys; from fedguard import cli; cli._parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'flwr', 'grpc', "
            "'cryptography'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
