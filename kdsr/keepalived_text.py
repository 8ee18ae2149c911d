"""keepalived fragment text: kdsr's fragment written (``render``) and read
back (``parse_model``), and the line behind a keepalived error
(``pointer_at``).  What goes in it is compile/keepalived.py's.

Everything kdsr declares is named ``kdsr_*``.  Only values the schema and the
rules have validated reach the text: addresses and numbers as Python renders
them, interface names (the schema's name pattern) and absolute paths.  The
first line carries the model as JSON, so the file read back is enough to
diff against.
"""

from __future__ import annotations

import json

from kdsr import fragment_text
from kdsr.fragment_text import FragmentText
from kdsr.model import KeepalivedConfig, VrrpInstance

MODEL_MARK = "# kdsr-keepalived-model "


def model_json(instances: tuple[VrrpInstance, ...]) -> str:
    return json.dumps(
        {"instances": [{k: v for k, v in i.__dict__.items() if k != "pointer"} for i in instances]},
        sort_keys=True,
        separators=(",", ":"),
    )


def _seconds(value: float) -> str:
    """keepalived reads VRRPv3 intervals as seconds with up to two decimals."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def render(node: str, source: str, instances: tuple[VrrpInstance, ...]) -> tuple[str, list[tuple[int, int, str]]]:
    text = FragmentText(MODEL_MARK + model_json(instances), node, source)
    block = text.block
    for instance in instances:
        track = f"{instance.name}_gate"
        lines = [
            "",
            f"# kdsr writes 0 into {instance.track_file} once this boot's fast path for {instance.vip} is in,",
            "# and 1 to give the VIP up (no serving server); keepalived creates it as 1.",
            f"track_file {track} {{",
            f"  file {instance.track_file}",
            "  weight 0",
            "  init_file 1",
            "}",
            f"vrrp_instance {instance.name} {{",
            # BACKUP: a starting keepalived waits for the current owner's
            # advertisements instead of claiming the VIP at once.
            "  state BACKUP",
            f"  interface {instance.interface}",
            "  version 3",
            f"  virtual_router_id {instance.virtual_router_id}",
            f"  priority {instance.priority}",
            f"  advert_int {_seconds(instance.advert_interval)}",
        ]
        if not instance.preempt:
            lines.append("  nopreempt")
        # keepalived 2.2.7's config test refuses unicast without peers (a
        # group of one): that instance advertises to nobody, by multicast.
        if instance.unicast_source is not None and instance.unicast_peers:
            lines.append(f"  unicast_src_ip {instance.unicast_source}")
            lines.append("  unicast_peer {")
            lines += [f"    {peer}" for peer in instance.unicast_peers]
            lines.append("  }")
        lines += [
            "  track_file {",
            f"    {track} weight 0",
            "  }",
            "  virtual_ipaddress {",
            f"    {instance.vip} dev {instance.interface}",
            "  }",
            "}",
        ]
        block(instance.pointer, *lines)
    return text.done()


def parse_model(text: str, config: str, fragment: str, pid_file: str) -> KeepalivedConfig | None:
    """The KeepalivedConfig a fragment file describes (its first line), or
    None if it is not one kdsr wrote."""
    first = text.split("\n", 1)[0]
    if not first.startswith(MODEL_MARK):
        return None
    try:
        data = json.loads(first[len(MODEL_MARK) :])
        instances = tuple(
            VrrpInstance(**{**i, "unicast_peers": tuple(i.get("unicast_peers", ()))}) for i in data["instances"]
        )
    except (ValueError, KeyError, TypeError):
        return None
    return KeepalivedConfig(config, fragment, pid_file, instances, text)


def pointer_at(config: KeepalivedConfig, line: int) -> str:
    """The intent path behind a line of the fragment (keepalived's error position)."""
    return fragment_text.pointer_at(config.lines, line)
