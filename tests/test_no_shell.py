"""No shell ever sees intent data, and nft text cannot be broken out of.

- The source of kdsr/ never asks for a shell (shell=True, os.system,
  os.popen, getoutput) and runs every subprocess with an argument list.
- nftables commands go as libnftables JSON (data, not text), except the
  flow-pinning batch that libnftables 1.0.6 cannot take as JSON; its text
  renderer quotes only printable ASCII without `"` or `\\`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kdsr.kernel import KernelError, nft_text

SOURCE = Path(__file__).resolve().parents[1] / "kdsr"
FILES = sorted(SOURCE.rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_shell_and_argument_lists_only(path):
    tree = ast.parse(path.read_text(), str(path))
    for call in calls(tree):
        name = dotted(call.func)
        where = f"{path.relative_to(SOURCE)}:{call.lineno}"
        assert name not in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"), where
        assert not any(k.arg == "shell" for k in call.keywords), f"{where}: shell= is never passed"
        if name.startswith("subprocess.") and call.args:
            first = call.args[0]
            assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), f"{where}: a command string"


def test_the_test_above_sees_subprocess_calls():
    found = [c for p in FILES for c in calls(ast.parse(p.read_text())) if dotted(c.func).startswith("subprocess.")]
    assert found, "no subprocess call found: the check above proves nothing"


@pytest.mark.parametrize("text", ['a"b', "a\nb", "a\\b", "a\x00b", "caf\xe9", "a\tb"])
def test_nft_text_refuses_to_quote_what_could_escape(text):
    with pytest.raises(KernelError):
        nft_text._quoted(text)


def test_nft_text_quotes_kdsr_comments():
    comment = "kdsr:3a7346a2fbdc /services/web~1x/hashing"
    assert nft_text._quoted(comment) == comment
