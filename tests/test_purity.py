"""compile/ and maglev stay pure: no kernel libraries, no subprocesses."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "kdsr"
FORBIDDEN = {"pyroute2", "nftables", "subprocess", "socket", "os", "kdsr.kernel"}
PURE = list((PKG / "compile").glob("*.py")) + [PKG / "maglev.py", PKG / "diff.py", PKG / "model.py"]
PURE += list((PKG / "intent").glob("*.py")) + [PKG / "bird_text.py", PKG / "keepalived_text.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pure_modules_import_nothing_with_side_effects():
    offenders = {}
    for path in PURE:
        bad = {
            m
            for m in imported_modules(path)
            if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN or m.startswith("kdsr.kernel")
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"pure modules import side-effecting modules: {offenders}"


def test_nothing_imports_cli():
    for path in PKG.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert "kdsr.cli" not in imported_modules(path), path
