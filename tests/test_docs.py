"""The documentation says what the code does: the intent reference is the
schema's, the README's example is the example file, and its sample plan is
what `kdsr plan` prints for it; every relative link points at a file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from cli_in_process import install_kernel, run_kdsr

from kdsr import cli
from kdsr.kernel.fake import FakeKernel

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "l2-web.yaml"
PLAN_COMMAND = "kdsr plan examples/l2-web.yaml --node lb1"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fenced_after(text: str, marker: str, lang: str = "") -> str:
    """The first fenced block (```lang) after ``marker`` in ``text``."""
    assert marker in text, f"README.md no longer mentions {marker!r}"
    found = re.search(rf"^```{lang}\n(.*?)^```$", text.split(marker, 1)[1], re.M | re.S)
    assert found, f"no ```{lang} block after {marker!r} in README.md"
    return found.group(1)


def test_the_intent_reference_is_the_schemas():
    reference = _script("intent_reference")
    expected = reference.reference(reference.json.loads(reference.SCHEMA.read_text()))
    assert (ROOT / "docs" / "intent-reference.md").read_text() == expected, (
        "docs/intent-reference.md differs from kdsr/data/intent.schema.json; "
        "regenerate it: make docs (.venv/bin/python scripts/intent_reference.py)"
    )


def test_every_schema_field_has_a_description():
    reference = _script("intent_reference")
    schema = reference.json.loads(reference.SCHEMA.read_text())
    for name, prop in schema["properties"].items():
        for path, node, _required in [(name, prop, False), *reference.man.children(prop, schema, name, 0)]:
            assert reference.man._resolve(node, schema).get("description"), f"{path} has no description"


def test_the_readme_example_is_the_example_file():
    shown = fenced_after(README.read_text(), "This is `examples/l2-web.yaml`", "yaml")
    text = EXAMPLE.read_text()
    assert shown == text[text.index("version: 1") :], "README.md's example differs from examples/l2-web.yaml"


def test_the_readme_plan_is_what_kdsr_prints(tmp_path, monkeypatch):
    install_kernel(monkeypatch, FakeKernel())  # a load balancer kdsr has not touched
    monkeypatch.chdir(ROOT)  # the plan names the file as given
    result = run_kdsr(tmp_path, *PLAN_COMMAND.split()[1:])
    assert result.exit_code == 0, result.output
    shown = fenced_after(README.read_text(), f"`{PLAN_COMMAND}`")
    assert shown == result.output, f"README.md's sample plan is not what `{PLAN_COMMAND}` prints now:\n{result.output}"


def test_the_readme_lists_every_exit_code():
    table = README.read_text().split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = [int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)]
    codes = sorted({int(code) for code in re.findall(r"(?:^\s*|, )(\d+) ", cli.EPILOG_EXIT_CODES.split(":", 1)[1])})
    assert listed == codes == list(range(len(codes)))


def test_relative_links_point_at_files():
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        prose = re.sub(r"`[^`\n]*`", "", page.read_text())  # not inside code
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    # A newcomer reads it in minutes; the detail goes to docs/.
    assert len(README.read_text().splitlines()) <= 330, "README.md is for a five-minute read: move detail to docs/"
