"""A plan saved by `kdsr plan --out FILE`, applied by `kdsr apply --plan-file FILE`.

The file carries the intent's text (editing the intent afterwards changes
nothing), the node, kdsr's record for that node and the plan in its JSON
form.  Applying plans again, from the carried intent, against the kernel as
it is then.  When that plan or kdsr's record differs from the saved ones, the
kernel changed after the plan was reviewed: the saved plan is stale and is
refused, with the differences listed, before any write.  State kdsr neither
owns nor would change (another table, an unrelated link) cannot make a plan
stale, because it never appears in one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kdsr.errors import EXIT_STALE_PLAN, EXIT_USAGE, IntentError, KdsrError
from kdsr.files import read_bounded
from kdsr.kernel.statefiles import write_atomic
from kdsr.plan_format import render_json

FORMAT = "kdsr-saved-plan"
FORMAT_VERSION = 1
DIFFERENCES_SHOWN = 10


class PlanFileError(KdsrError):
    exit_code = EXIT_USAGE


class StalePlanError(KdsrError):
    exit_code = EXIT_STALE_PLAN


@dataclass(frozen=True)
class SavedPlan:
    path: str
    source: str  # the intent file the plan was made from
    intent_text: str
    node: str
    kdsr_version: str
    state: dict
    changes: list[dict]


def kdsr_version() -> str:
    try:
        return version("kdsr")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def plan_changes(plan) -> list[dict]:
    """The plan's changes as `kdsr plan --json` gives them (every element)."""
    return json.loads(render_json(plan))["changes"]


def save(path: str, prepared, intent_text: str, source: str) -> None:
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdsr_version": kdsr_version(),
        "node": prepared.node,
        "intent": {"source": source, "text": intent_text},
        "state": prepared.state.to_json(),
        "changes": plan_changes(prepared.plan),
    }
    # 0600 by rename: the intent may carry secrets (BGP passwords later).
    write_atomic(Path(path), json.dumps(doc, indent=1, sort_keys=True) + "\n", private_dir=False)


def load(path: str) -> SavedPlan:
    try:
        raw = read_bounded(path, path)
    except IntentError as exc:
        raise PlanFileError(f"{path}: {exc.problems[0].message} Name a file written by `kdsr plan --out`.") from None
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read the saved plan: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError("not a kdsr saved plan")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {doc.get('format_version')!r}, this kdsr reads {FORMAT_VERSION}")
        saved = SavedPlan(
            path=path,
            source=str(doc["intent"]["source"]),
            intent_text=str(doc["intent"]["text"]),
            node=str(doc["node"]),
            kdsr_version=str(doc["kdsr_version"]),
            state=dict(doc["state"]),
            changes=list(doc["changes"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanFileError(f"{path}: not a plan saved by `kdsr plan --out` ({exc}); make one with it.") from None
    if saved.kdsr_version != kdsr_version():
        raise PlanFileError(
            f"{path} was made by kdsr {saved.kdsr_version}, this is kdsr {kdsr_version()}; "
            "plan again with this version (a plan is only valid for the kdsr that made it)."
        )
    return saved


def check_fresh(saved: SavedPlan, prepared) -> None:
    """Raise StalePlanError, listing what differs, unless planning now gives
    exactly the saved plan from exactly the saved record."""
    problems = _change_differences(saved.changes, plan_changes(prepared.plan))
    if saved.state != prepared.state.to_json():
        problems.insert(0, f"kdsr's record of node {saved.node} changed (another kdsr run wrote since)")
    if not problems:
        return
    shown = problems[:DIFFERENCES_SHOWN]
    if len(problems) > DIFFERENCES_SHOWN:
        shown.append(f"... and {len(problems) - DIFFERENCES_SHOWN} more")
    raise StalePlanError(
        f"{saved.path} is stale: the kernel or kdsr's record changed since the plan was made; nothing was changed.\n  "
        + "\n  ".join(shown)
        + f"\nReview a new plan: kdsr plan {saved.source} --node {saved.node} --out {saved.path}"
    )


def _change_differences(saved: list[dict], now: list[dict]) -> list[str]:
    def key(change: dict) -> tuple[str, str, str]:
        return (change["action"], change["kind"], change["id"])

    before = {key(c): c for c in saved}
    after = {key(c): c for c in now}
    lines = []
    for k, change in before.items():
        if k not in after:
            lines.append(f"no longer planned: {k[0]} {k[1]} {k[2]}")
        elif after[k] != change:
            lines.append(f"planned differently now: {k[0]} {k[1]} {k[2]}")
    lines += [f"planned now, not in the saved plan: {k[0]} {k[1]} {k[2]}" for k in after if k not in before]
    return lines
