"""Safety of changes and drift on the ipvs engine, l3-ipip (full-kernel tier).

One routed lab (l3lab.py) for the module; kdsr applies an intent with one
IPVS service (10.9.0.102:80, tcp, mh) tunnelling to s1-s3.

- Identity kept on change: 50 TCP connections are held open to the VIP while
  `kdsr apply` changes a server's weight, then a scheduler flag: the intent's
  ``hashing.fields`` from source-ip-port to source-ip drops IPVS's
  ``mh-port`` flag (the only flag the intent controls; ``mh-fallback`` is
  always on).  Each apply's plan is one in-place update (``ipvsadm -e`` of a
  destination, ``ipvsadm -E`` of the service), never a delete and create;
  ipvsadm's connection counters and active connections carry over (a
  re-created service starts from zero); and every held connection does
  another exchange after each apply, answered by the server it had before.
  The IPVS mh model (bench/ipvs_mh_model.py) counts how many held
  connections the new table would have sent elsewhere had IPVS forgotten
  them, so the check is not vacuous.
- Drift: ``ipvsadm -C`` on the load balancer, ``ip link del`` of the
  tunnel link, and a strict ``rp_filter`` on a server.  With the ipvs engine
  the load balancer owns no link (IPVS's TUN transmitter encapsulates by
  itself, see ``kdsr plan`` for lb1); the tunnel link kdsr owns is each
  server's decapsulating ``kdsr-ipip``, so that is the one deleted.  Each
  time ``plan --detailed-exitcode`` exits 2 and lists exactly that drift,
  ``apply`` repairs it, the next plan exits 0, and flows are answered by all
  three servers again.  Meanwhile the flush stops every flow and the lost
  link stops s1's; ``all.rp_filter=1`` alone stops none (the kernel takes
  max(all, kdsr-ipip) = 2, still loose), but it is kdsr's key off its value,
  so it is drift all the same.  Foreign state (an IPVS service added after
  the flush, dummy links, sysctl values kdsr accepts but does not set) stays
  as it was.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import l3lab
import pytest
from test_l3_dsr import Deployment

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import ipvs_mh_model as mh  # noqa: E402

pytestmark = pytest.mark.full_kernel

PYTHON = sys.executable or "python3"
LAB_DIR = ROOT / "netns-lab"
VIP, PORT = "10.9.0.102", 80
CLIENT = "10.1.0.10"
SERVERS = l3lab.SERVERS
NAME_OF = {address: name for name, address in SERVERS.items()}
NODES = {"lb": "lb1", **{s: s for s in SERVERS}}
SERVICE = f"tcp {VIP}:{PORT}"
HELD = 50
HOLD_DEADLINE = 300.0
FOREIGN_VS = "10.2.0.2:8080"
FOREIGN_LINK = "app-dummy0"


def intent_for(weights: dict[str, int] | None = None, fields: str = "source-ip-port") -> dict:
    weights = weights or {}
    pool = {"servers": [{"node": s, "weight": weights.get(s, 1)} for s in SERVERS]}
    dsr = {"mode": "l3-ipip", "engine": "ipvs"}
    return l3lab.one_service_intent(VIP, PORT, dsr, pool, hashing={"fields": fields})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("safety-l3")
    with l3lab.L3Lab(workdir=workdir / "lab") as built:
        built.run("lb", ["modprobe", "-a", "ip_vs", "ip_vs_mh", "ipip"])
        for server in SERVERS:
            built.start_responder(server, tcp_ports=[PORT], max_seconds=3600)
        yield built


@pytest.fixture(scope="module")
def deployed(lab, tmp_path_factory):
    dep = Deployment(lab, tmp_path_factory.mktemp("ipvs-l3-ipip"), "l3-ipip", "ipvs")
    dep.intent = dep.write("intent.json", intent_for())
    dep.kdsr_on(NODES, "apply", dep.intent)
    return dep  # the lab's teardown deletes the namespaces, kdsr's state with them


# ------------------------------------------------------------------ helpers

# Holds HELD connections (netns-lab/hold.py's open/exchange), prints
# `READY {sport: server}`, then one `ROUND {sport: server or error}` per go
# file, after a further exchange on every connection still open.
HOLDER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import hold
vip, port, count, first = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
stop_at = time.monotonic() + float(sys.argv[6])
conns, seen = {}, {}
for sport in range(first, first + count):
    try:
        sock = hold.open_one(vip, port, sport, 3.0)
        seen[sport] = hold.server_of(hold.exchange(sock, os.urandom(32), time.monotonic() + 3.0))
        conns[sport] = sock
    except (OSError, ValueError) as exc:
        seen[sport] = f"error: {type(exc).__name__}: {exc}"
print("READY " + json.dumps(seen), flush=True)
for go in sys.argv[7:]:
    while not os.path.exists(go):
        if time.monotonic() > stop_at:
            sys.exit("go file never appeared")
        time.sleep(0.05)
    seen = {}
    for sport, sock in list(conns.items()):
        try:
            reply = hold.exchange(sock, os.urandom(32), min(time.monotonic() + 3.0, stop_at))
            seen[sport] = hold.server_of(reply)
        except (OSError, ValueError) as exc:
            seen[sport] = f"error: {type(exc).__name__}: {exc}"
            conns.pop(sport).close()
    print("ROUND " + json.dumps(seen), flush=True)
"""


def start_holder(lab, go_files: list[Path]):
    argv = [PYTHON, "-c", HOLDER, str(LAB_DIR), VIP, str(PORT), str(HELD), str(lab.next_sports(HELD))]
    argv += [str(HOLD_DEADLINE), *map(str, go_files)]
    return lab.spawn("client", argv, tag="hold", ready_marker="READY", ready_timeout=180)


def _holder_lines(proc, prefix: str) -> list[dict[int, str]]:
    return [
        {int(k): v for k, v in json.loads(line[len(prefix) :]).items()}
        for line in proc.stdout().splitlines()
        if line.startswith(prefix)
    ]


def holder_round(proc, number: int, seconds: float = 120.0) -> dict[int, str]:
    """The holder's `number`-th ROUND (1-based), waited for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = proc.running()
        rounds = _holder_lines(proc, "ROUND ")
        if len(rounds) >= number:
            return rounds[number - 1]
        assert alive, f"the holder exited after {len(rounds)} rounds:\n{proc.stdout()}\n{proc.stderr()}"
        time.sleep(0.1)
    raise AssertionError(f"no ROUND {number} from the holder within {seconds:g} s:\n{proc.stderr()}")


def ipvs_figures(lab) -> dict:
    """The service as ipvsadm shows it: flags, total Conns and InPkts, and
    per destination its weight, ActiveConn, InActConn and Conns."""
    target = ["-t", f"{VIP}:{PORT}"]
    listing = lab.run("lb", ["ipvsadm", "-L", "-n", "--exact", *target]).stdout
    stats = lab.run("lb", ["ipvsadm", "-L", "-n", "--stats", "--exact", *target]).stdout
    figures: dict = {"flags": "", "conns": None, "inpkts": None, "dests": {}, "text": listing + stats}
    for line in listing.splitlines():
        words = line.split()
        if words[:1] == ["TCP"]:
            figures["flags"] = " ".join(words[2:])
        elif words[:1] == ["->"] and words[1][:1].isdigit():
            address = words[1].rsplit(":", 1)[0]
            figures["dests"][NAME_OF[address]] = {
                "weight": int(words[3]),
                "active": int(words[4]),
                "inactive": int(words[5]),
            }
    for line in stats.splitlines():
        words = line.split()
        if words[:1] == ["TCP"]:
            figures["conns"], figures["inpkts"] = int(words[2]), int(words[3])
        elif words[:1] == ["->"] and words[1][:1].isdigit():
            figures["dests"][NAME_OF[words[1].rsplit(":", 1)[0]]]["conns"] = int(words[2])
    assert figures["conns"] is not None and len(figures["dests"]) == 3, figures["text"]
    return figures


def ipvs_figures_counted(lab, conns: int, seconds: float = 20) -> dict:
    """ipvs_figures once the service's Conns counter shows ``conns``.

    ipvsadm --stats reads totals the kernel's rate estimator folds in from the
    per-CPU counters on its own timer (every 2 s on 6.1), so right after the
    connections opened it can still show 0: wait for it, bounded."""
    deadline = time.monotonic() + seconds
    while True:
        figures = ipvs_figures(lab)
        if figures["conns"] >= conns or time.monotonic() > deadline:
            return figures
        time.sleep(0.5)


def model_servers(weights: dict[str, int], sports, mh_port: bool) -> dict[int, str]:
    """Where IPVS mh would send a *new* flow from each client port (kdsr's list order)."""
    dests = mh.kdsr_order(mh.MhDest(a, PORT, weights.get(s, 1)) for s, a in SERVERS.items())
    table = mh.MhTable(dests)
    return {p: NAME_OF[table.schedule(CLIENT, p, mh_port=mh_port, fallback=True)] for p in sports}


def per_server(by_sport: dict[int, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in by_sport.values():
        counts[server] = counts.get(server, 0) + 1
    return dict(sorted(counts.items()))


def apply_lb(dep, name: str, doc: dict) -> list[tuple]:
    """`kdsr apply --json` on the load balancer; its plan's changes as (action, kind, id, reason)."""
    path = dep.write(name, doc)
    plan = json.loads(dep.kdsr("lb", "apply", str(path), "--node", "lb1", "--json").stdout)
    return [(c["action"], c["kind"], c["id"], c["reason"]) for c in plan["changes"]]


# ------------------------------------------------------- identity on change


def test_ipvs_service_identity_survives_weight_and_flag_edits_50_connections(deployed):
    dep, lab = deployed, deployed.lab
    go = [dep.workdir / "go-after-weight", dep.workdir / "go-after-flags"]
    holder = start_holder(lab, go)
    try:
        before = _holder_lines(holder, "READY ")[0]
        failed = {p: s for p, s in before.items() if s not in SERVERS}
        assert not failed, f"{len(failed)} of {HELD} connections failed to open: {list(failed.items())[:3]}"
        spread = per_server(before)
        assert len(spread) >= 2, spread
        base = model_servers({}, before, mh_port=True)
        agree = sum(base[p] == s for p, s in before.items())
        figures0 = ipvs_figures_counted(lab, HELD)
        print(
            f"\nheld {HELD} connections, per server {spread} "
            f"(the mh model predicts {agree}/{HELD} of these picks); ipvsadm: Conns {figures0['conns']}, "
            f"active { ({s: d['active'] for s, d in figures0['dests'].items()}) }, flags {figures0['flags']}"
        )
        assert figures0["conns"] >= HELD and sum(d["active"] for d in figures0["dests"].values()) >= HELD

        steps = [
            # (what, weights, hashing fields, the one change the plan must hold)
            (
                "weight s1 1 -> 4",
                {"s1": 4},
                "source-ip-port",
                ("update", "ipvs dest", f"{SERVICE} -> 10.3.0.11:80", "weight"),
            ),
            ("mh-port off", {"s1": 4}, "source-ip", ("update", "ipvs service", SERVICE, "scheduler/flags")),
        ]
        previous = figures0
        for number, (what, weights, fields, change) in enumerate(steps, 1):
            fresh = model_servers(weights, before, mh_port=fields == "source-ip-port")
            would_move = sum(fresh[p] != s for p, s in before.items())
            assert would_move > 0, f"{what}: the new table keeps every held connection: the check proves nothing"
            changes = apply_lb(dep, f"step-{number}.json", intent_for(weights, fields))
            assert changes == [change], f"{what}: the plan is not one in-place edit: {changes}"
            figures = ipvs_figures(lab)
            # Not re-created: the counters go on from where they were, and the
            # connection table still holds every held connection.
            assert figures["conns"] >= previous["conns"] and figures["inpkts"] >= previous["inpkts"], figures["text"]
            for server, dest in figures["dests"].items():
                assert dest["active"] == previous["dests"][server]["active"], (what, previous["text"], figures["text"])
                assert dest["conns"] >= previous["dests"][server]["conns"], (what, previous["text"], figures["text"])
            go[number - 1].touch()
            after = holder_round(holder, number)
            survived = sum(after.get(p) == s for p, s in before.items())
            lost = {p: (s, after.get(p)) for p, s in before.items() if after.get(p) != s}
            print(
                f"{what}: plan {changes[0][0]} {changes[0][1]} ({changes[0][3]}); {survived}/{HELD} held connections "
                f"answered by the same server ({would_move} would have moved as new flows); ipvsadm: Conns "
                f"{previous['conns']} -> {figures['conns']}, InPkts {previous['inpkts']} -> {figures['inpkts']}, "
                f"weights { ({s: d['weight'] for s, d in figures['dests'].items()}) }, flags {figures['flags']}"
            )
            assert survived == HELD, f"{what}: {len(lost)} connections lost or moved: {list(lost.items())[:5]}"
            previous = figures
        assert "mh-port" in figures0["flags"] and "mh-port" not in previous["flags"], (figures0["flags"], previous)

        # The edit took: without mh-port every new flow of one client picks one server.
        expected = set(model_servers({"s1": 4}, [0], mh_port=False).values())
        report = lab.probe(VIP, "tcp", PORT, flows=12, first_sport=lab.next_sports(12), timeout=3.0)
        assert report.all_ok and set(report.by_server()) == expected, (report.by_server(), expected)
        print(f"new flows after the flag edit: {report.by_server()} (source-ip hashing), the held ones stayed put")
    finally:
        for path in go:
            path.touch()  # let the holder finish, whatever happened
        holder.popen.wait(timeout=HOLD_DEADLINE)


# -------------------------------------------------------------------- drift


def plan_exit(dep, host: str) -> tuple[int, str]:
    result = dep.kdsr(host, "plan", str(dep.intent), "--node", NODES[host], "--detailed-exitcode", check=False)
    assert result.returncode in (0, 2), result.stdout + result.stderr
    return result.returncode, result.stdout


def change_lines(text: str) -> list[str]:
    """The plan's object lines, without the intent pointer."""
    return sorted(
        line.strip().split("  # ", 1)[0]
        for line in text.splitlines()
        if line.startswith("  ") and not line.startswith("    ")
    )


def foreign(lab) -> dict[str, str | list[str]]:
    def sysctl(host: str, key: str) -> str:
        return lab.run(host, ["sysctl", "-n", key]).stdout.strip()

    def link(host: str) -> str:
        return lab.run(host, ["ip", "-d", "-o", "link", "show", "dev", FOREIGN_LINK]).stdout

    return {
        "lb ipvs": [line for line in lab.run("lb", ["ipvsadm", "-S", "-n"]).stdout.splitlines() if FOREIGN_VS in line],
        "lb link": link("lb"),
        "s1 link": link("s1"),
        "lb net.ipv4.vs.sloppy_sctp": sysctl("lb", "net.ipv4.vs.sloppy_sctp"),
        "s2 net.ipv4.conf.eth0.rp_filter": sysctl("s2", "net.ipv4.conf.eth0.rp_filter"),
        "s2 net.ipv4.conf.eth0.arp_ignore": sysctl("s2", "net.ipv4.conf.eth0.arp_ignore"),
    }


DESTS = [f"+ ipvs dest {SERVICE} -> {a}:80: tunnel ipip, weight 1" for a in SERVERS.values()]
DRIFTS = [
    # (host, what, commands, the plan's lines, its summary, servers that stop answering meanwhile;
    # None: not probed, nothing stops: the kernel takes max(all, kdsr-ipip) = 2, still loose)
    (
        "lb",
        "ipvsadm -C",
        [["ipvsadm", "-C"]],
        [f"+ ipvs service {SERVICE}: mh (mh-fallback,mh-port), 3 destinations", *DESTS],
        "Plan: 4 to add, 0 to change, 0 to replace, 0 to destroy.",
        set(SERVERS),
    ),
    (
        "s1",
        "ip link del kdsr-ipip",
        [["ip", "link", "del", "kdsr-ipip"]],
        [
            "+ link kdsr-ipip: ipip local 10.3.0.11 remote any ttl 64",
            f"+ address kdsr-ipip {VIP}/32: label kdsr-ipip:kdsr",
            "~ sysctl net.ipv4.conf.kdsr-ipip.rp_filter: (absent) -> 2",
        ],
        "Plan: 2 to add, 1 to change, 0 to replace, 0 to destroy.",
        {"s1"},
    ),
    (
        "s2",
        "rp_filter=1 (strict)",
        [["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"]],
        ["~ sysctl net.ipv4.conf.all.rp_filter: 1 -> 2"],
        "Plan: 0 to add, 1 to change, 0 to replace, 0 to destroy.",
        None,
    ),
]


def test_ipvs_and_tunnel_drift_is_planned_exactly_and_repaired_foreign_state_untouched(deployed):
    dep, lab = deployed, deployed.lab
    dep.kdsr("lb", "apply", str(dep.intent), "--node", "lb1")  # back to the intent, whatever ran before
    for host in ("lb", "s1"):
        lab.run(host, ["ip", "link", "add", FOREIGN_LINK, "type", "dummy"])
    lab.sysctl("lb", "net.ipv4.vs.sloppy_sctp", 1)  # an IPVS knob kdsr does not set
    lab.sysctl("s2", "net.ipv4.conf.eth0.rp_filter", 0)  # off does for kdsr (loose or off): it must stay 0
    lab.sysctl("s2", "net.ipv4.conf.eth0.arp_ignore", 2)  # stricter than kdsr's at-least 1: it must stay 2
    code, text = plan_exit(dep, "lb")
    assert code == 0, text
    expected = foreign(lab)
    for host, what, commands, lines, summary, down in DRIFTS:
        for command in commands:
            lab.run(host, command)
        if host == "lb":
            # Added after the flush, on another VIP:port: not kdsr's.
            lab.run("lb", ["ipvsadm", "-A", "-t", FOREIGN_VS, "-s", "rr"])
            lab.run("lb", ["ipvsadm", "-a", "-t", FOREIGN_VS, "-r", "10.3.0.11:8080", "-g"])
            expected = foreign(lab)
            assert expected["lb ipvs"], expected
        if down is not None:
            during = lab.probe(VIP, "tcp", PORT, flows=12, first_sport=lab.next_sports(12), timeout=1.0)
            answered = during.by_server()
            assert not set(answered) & down, f"{what}: {sorted(down)} still answered: {answered}"
            print(f"\n{host}: {what}: flows answered meanwhile {answered} of 12")
        code, text = plan_exit(dep, host)
        print(f"\n{host}: {what}: plan exit {code}:\n{text}")
        assert code == 2, text
        assert change_lines(text) == sorted(lines), text
        assert summary in text, text
        for name in (FOREIGN_VS, FOREIGN_LINK, "sloppy_sctp", "eth0.rp_filter", "eth0.arp_ignore"):
            assert name not in text, (name, text)

        dep.kdsr(host, "apply", str(dep.intent), "--node", NODES[host])
        with ThreadPoolExecutor(max_workers=2) as pool:  # two independent reads: halves the wait under TCG
            replan = pool.submit(plan_exit, dep, host)
            report = lab.probe(VIP, "tcp", PORT, flows=24, first_sport=lab.next_sports(24), timeout=3.0)
            code, text = replan.result()
        assert code == 0, text
        assert report.all_ok, report.describe_failures()
        assert set(report.by_server()) == set(SERVERS), report.by_server()
        assert foreign(lab) == expected, (foreign(lab), expected)
        print(f"{host}: repaired; next plan exit 0; flows {report.by_server()}; foreign state as it was")
    print(f"foreign state kept: {json.dumps(expected)}")
