"""The layers of kdsr run one way (the table in kdsr/__init__.py).

Read from the source with ``ast``: every import, at module level, under
``if TYPE_CHECKING`` and inside functions alike, so an import cannot dodge
the rules by moving into a function.  Imports inside functions are allowed
only where they keep a command's start-up short, and each is listed below
with its reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "kdsr"

# Layer: the modules in it (a name and everything under it), and the layers
# it may import besides its own.  Bottom first.  A module belongs to the
# layer with the longest name that starts it.  kdsr/__init__.py has the
# same table for readers.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Errors, file and process helpers, and the names kdsr gives kernel objects.
    "base": (
        (
            "kdsr.errors",
            "kdsr.wording",
            "kdsr.files",
            "kdsr.collector",
            "kdsr.faults",
            "kdsr.privilege",
            "kdsr.naming",
            "kdsr.memo",
        ),
        (),
    ),
    "intent": (("kdsr.intent",), ("base",)),
    # The state types, Maglev, and the BIRD fragment's text: what compile
    # makes and the kernel layer reads and writes.
    "model": (
        ("kdsr.model", "kdsr.model_xdp", "kdsr.maglev", "kdsr.fragment_text", "kdsr.bird_text", "kdsr.keepalived_text"),
        ("base",),
    ),
    "compile": (("kdsr.compile",), ("base", "intent", "model")),
    "kernel": (("kdsr.kernel",), ("base", "model")),
    "diff": (("kdsr.diff",), ("base", "model")),
    "runtime state": (("kdsr.health.state", "kdsr.health.status", "kdsr.health.control"), ("base", "kernel")),
    "plan": (
        ("kdsr.plan_format", "kdsr.service_view", "kdsr.saved_plan"),
        ("base", "model", "compile", "kernel", "diff"),
    ),
    "apply": (
        ("kdsr.apply", "kdsr.receipt", "kdsr.vrrp_apply", "kdsr.ipvs_apply", "kdsr.step"),
        ("base", "model", "kernel", "diff", "runtime state"),
    ),
    "operations": (
        ("kdsr.operations",),
        ("base", "intent", "model", "compile", "kernel", "diff", "runtime state", "plan", "apply"),
    ),
    "daemon": (
        ("kdsr.health", "kdsr.commands"),
        ("base", "intent", "model", "compile", "kernel", "diff", "runtime state", "plan", "apply", "operations"),
    ),
    "cli": (("kdsr.cli", "kdsr.__main__"), ("*",)),
}

# Imports inside a function, each to keep start-up short: the command that
# needs the module pays for it, the others do not.
STARTUP_EXCEPTIONS = {
    ("kdsr.cli", "kdsr.intent"): "jsonschema, yaml and the schema: show, drain and destroy --node read no intent",
    ("kdsr.cli", "kdsr.intent.load"): "as kdsr.intent",
    ("kdsr.cli", "kdsr.intent.reload"): "only kdsr run reloads; the JSON entry parser comes with it",
    ("kdsr.cli", "kdsr.commands.health"): "the daemon, its metrics server and probes: only kdsr run and health",
    ("kdsr.cli", "kdsr.kernel.system"): "the real kernel (netlink, libnftables): not for validate or maglev",
    ("kdsr.cli", "kdsr.saved_plan"): "only plan --out and apply --plan-file",
    ("kdsr.kernel.system", "kdsr.kernel.xdp"): "ctypes and the libbpf binding: only a node with an xdp service",
    ("kdsr.intent", "kdsr.intent.load"): "the package's lazy attribute: loading pulls in jsonschema",
    ("kdsr.intent", "kdsr.intent.model"): "the package's lazy attribute (with load_intent)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str) -> list[tuple[str, bool]]:
    """(kdsr module imported, whether inside a function) for every import in ``name``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names if alias.name.startswith("kdsr"))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("kdsr"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in MODULES else child.module, in_function))
            visit(child, inner)

    visit(ast.parse(MODULES[name].read_text()), False)
    return found


def layer_of(name: str) -> str:
    best = max(
        ((prefix, layer) for layer, (prefixes, _) in LAYERS.items() for prefix in prefixes if _starts(name, prefix)),
        key=lambda found: len(found[0]),
        default=None,
    )
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and kdsr/__init__.py)"
    return best[1]


def _starts(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "kdsr":
            layer_of(name)


def test_imports_go_down_the_layers():
    wrong = []
    for name in MODULES:
        if name == "kdsr":
            continue
        here = layer_of(name)
        allowed = LAYERS[here][1]
        for target, _inner in imports(name):
            there = layer_of(target)
            if there != here and "*" not in allowed and there not in allowed:
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(set(wrong)))


def test_imports_inside_functions_only_for_start_up():
    hidden = sorted(
        {f"{name} imports {target}" for name in MODULES for target, inner in imports(name) if inner}
        - {f"{a} imports {b}" for a, b in STARTUP_EXCEPTIONS}
    )
    assert not hidden, "imports inside functions (hoist them, or list a start-up reason):\n" + "\n".join(hidden)


def test_no_import_cycles():
    graph = {name: {t for t, _ in imports(name) if t in MODULES and t != name} for name in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# The kernel layer is one backend per subsystem (kdsr/kernel/__init__.py):
# a backend's modules are its class, its helpers and its fake, by name
# (``kdsr.kernel.<name>`` and ``kdsr.kernel.fake.<name>``).  No backend's
# modules import another backend's; what they share is listed here, and only
# the composition of them all (the kernel handles, the readers) imports more
# than one backend.
BACKENDS = {
    "nft": r"nft(_\w+)?",
    "links": r"links|rtnl_\w+",
    "ipvs": r"ipvs(adm)?",
    "bird": r"bird",
    "keepalived": r"keepalived",
    "sysctl": r"sysctl",
    "xdp": r"xdp",
}
KERNEL_SHARED = {
    "kdsr.kernel": "KernelError and the backends' interfaces",
    "kdsr.kernel.netlink": "the netlink message layout (nftables' generation, rtnetlink)",
    "kdsr.kernel.fragment_file": "a daemon's config fragment, checked in place (BIRD, keepalived)",
    "kdsr.kernel.statefiles": "kdsr's own files, no symlinks followed",
    "kdsr.kernel.fake.log": "the writes every fake backend received",
}
KERNEL_WHOLE = {
    "kdsr.kernel.system": "the real kernel: one of each backend",
    "kdsr.kernel.fake": "the fake kernel: one of each fake",
    "kdsr.kernel.observe": "reads every backend into Observed",
    "kdsr.kernel.state": "kdsr's ownership records",
}


def backend_of(name: str) -> str | None:
    match = re.fullmatch(r"kdsr\.kernel\.(?:fake\.)?(\w+)", name)
    if match is None or name in KERNEL_SHARED or name in KERNEL_WHOLE:
        return None
    return next((b for b, pattern in BACKENDS.items() if re.fullmatch(pattern, match.group(1))), None)


def test_every_kernel_module_is_a_backends_or_listed():
    kernel = [n for n in MODULES if _starts(n, "kdsr.kernel")]
    unplaced = [n for n in kernel if n not in KERNEL_SHARED and n not in KERNEL_WHOLE and backend_of(n) is None]
    assert not unplaced, "kernel modules of no backend (name them after one, or list them):\n" + "\n".join(unplaced)


def test_backends_do_not_import_each_other():
    wrong = []
    for name in MODULES:
        here = backend_of(name)
        if here is None:
            continue
        for target, _inner in imports(name):
            there = backend_of(target)
            if there is not None and there != here:
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert not wrong, "a backend imports another:\n" + "\n".join(sorted(set(wrong)))


def test_the_kernel_is_composed_not_inherited():
    """No mixins: a class in kdsr/kernel/ has at most one base, and reaches
    into no other class through ``type: ignore``."""
    found = []
    for name, path in MODULES.items():
        if not _starts(name, "kdsr.kernel"):
            continue
        text = path.read_text()
        if "type: ignore" in text:
            found.append(f"{name}: type: ignore")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and len(node.bases) > 1:
                found.append(f"{name}: class {node.name} has {len(node.bases)} bases")
    assert not found, "\n".join(found)


def test_the_rules_catch_what_they_are_for(tmp_path, monkeypatch):
    """The checks themselves: a circle hidden in a function, and an import up the layers, are found."""
    fake = {
        "kdsr.intent.a": "def f():\n    from kdsr.intent import b\n",
        "kdsr.intent.b": "from kdsr.intent import a\n",
        "kdsr.kernel.c": "from kdsr.diff import Plan\n",
        "kdsr.kernel.nft_d": "from kdsr.kernel.links import Links\n",
        "kdsr.kernel.e": "class Both(A, B):\n    pass\n",
    }
    for name, text in fake.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        monkeypatch.setitem(MODULES, name, path)
    for check in (
        test_no_import_cycles,
        test_imports_go_down_the_layers,
        test_imports_inside_functions_only_for_start_up,
        test_backends_do_not_import_each_other,
        test_every_kernel_module_is_a_backends_or_listed,
        test_the_kernel_is_composed_not_inherited,
    ):
        try:
            check()
        except AssertionError as exc:
            assert any(
                name in str(exc) for name in ("kdsr.intent", "kdsr.kernel.c", "kdsr.kernel.nft_d", "kdsr.kernel.e")
            )
        else:
            raise AssertionError(f"{check.__name__} found nothing")
