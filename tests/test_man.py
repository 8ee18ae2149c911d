"""The manual pages and shell completion made at package build (scripts/man.py,
scripts/completion.py): every command, option and intent field is in them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from kdsr import cli

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


man = _script("man")
completion = _script("completion")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    assert man.main(["man.py", str(out)]) == 0
    return {path.name: path.read_text() for path in out.iterdir()}


def plain(roff: str) -> str:
    """What the words look like in the page's source, unescaped."""
    return roff.replace("\\-", "-").replace("\\e", "\\")


def test_kdsr_8_has_every_command_with_every_option(pages):
    text = plain(pages["kdsr.8"])
    ctx = click.Context(cli.main, info_name="kdsr")
    names = cli.main.list_commands(ctx)
    assert {"apply", "destroy", "drain", "maglev", "plan", "run", "show", "undrain", "validate"} <= set(names)
    for name in names:
        command = cli.main.get_command(ctx, name)
        assert f'.SS "kdsr {name}"' in text, name
        section = text.split(f'.SS "kdsr {name}"', 1)[1].split(".SS ", 1)[0]
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("state_dir", "wait"):
                assert any(opt in section for opt in param.opts), (name, param.opts)
    for option in ("--state-dir", "--wait", "--version", "--log-format"):
        assert option in text


def test_kdsr_8_lists_every_exit_code_once(pages):
    text = pages["kdsr.8"]
    status = text.split('.SH "EXIT STATUS"', 1)[1].split(".SH ", 1)[0]
    assert re.findall(r"\\fB(\d+)\\fR", status) == [str(code) for code in range(11)]
    assert text.count("Exit codes:") == 0  # the epilog's sentence became that section


def all_fields(node, root, found: set[str]) -> set[str]:
    """Every property name anywhere in the schema."""
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            found.add(name)
            all_fields(prop, root, found)
        for value in node.values():
            if isinstance(value, (dict, list)):
                all_fields(value, root, found)
    elif isinstance(node, list):
        for value in node:
            all_fields(value, root, found)
    return found


def test_kdsr_intent_5_has_every_top_level_and_nested_field(pages):
    schema = json.loads((ROOT / "schemas" / "intent.schema.json").read_text())
    text = plain(pages["kdsr-intent.5"])
    entries = re.findall(r"^\\fB([^\\]+)\\fR \(", text, re.M)
    for name in schema["properties"]:
        assert name in entries, name
    leaves = {entry.rsplit(".", 1)[-1].removesuffix("[]") for entry in entries}
    assert all_fields(schema, schema, set()) - leaves == set()
    # Fields reached through a $ref into another definition's properties too.
    assert "load_balancers.NAME.interface" in entries and "pools.NAME.servers[].weight" in entries
    for required in schema["required"]:
        assert re.search(rf"^\\fB{required}\\fR \([^)]*required", text, re.M), required


def test_the_pages_are_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    man.main(["man.py", str(tmp_path / "a")])
    man.main(["man.py", str(tmp_path / "b")])
    for name in ("kdsr.8", "kdsr-intent.5"):
        first = (tmp_path / "a" / name).read_text()
        assert first == (tmp_path / "b" / name).read_text()
        assert '"2023-11-14"' in first.splitlines()[1]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (Debian: groff-base)")
def test_groff_renders_the_pages_without_a_warning(pages, tmp_path):
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            ["groff", "-man", "-ww", "-z", "-Tutf8", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)


def test_completion_scripts_are_clicks(tmp_path):
    assert completion.main(["completion.py", str(tmp_path)]) == 0
    bash, zsh = (tmp_path / "kdsr.bash").read_text(), (tmp_path / "_kdsr").read_text()
    assert "_KDSR_COMPLETE=bash_complete" in bash and "complete -o nosort -F _kdsr_completion kdsr" in bash
    assert zsh.startswith("#compdef kdsr") and "_KDSR_COMPLETE=zsh_complete" in zsh


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (["kdsr", "ap"], {"apply"}),
        (["kdsr", "run", "x.json", "--log-format", ""], {"text", "json"}),
        (["kdsr", "plan", "x.json", "--det"], {"--detailed-exitcode"}),
    ],
)
def test_bash_completion_offers_commands_options_and_choices(tmp_path, words, offered):
    completion.main(["completion.py", str(tmp_path)])
    # A `kdsr` on PATH that runs this checkout (click names the completion variable after it).
    wrapper = tmp_path / "bin" / "kdsr"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom kdsr.cli import run\nrun()\n"
    )
    wrapper.chmod(0o755)
    quoted = " ".join(f"'{w}'" for w in words)
    script = (
        f"source {tmp_path / 'kdsr.bash'}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        '_kdsr_completion kdsr; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = {**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert set(result.stdout.split()) == offered, result.stderr
