#!/usr/bin/env python3
"""The BGP lab: three load balancers announce VIPs over BGP (BIRD 2) to a
router that spreads client flows over them with ECMP.

    client --(direct veth)-- router --(bridge in `sw`)-- lb1, lb2, lb3, s1, s2, s3

    client link   10.20.0.0/24 fd00:20::/64   client .2 (eth0), router .1 (eth1)
    segment       10.10.0.0/24 fd00:10::/64   router .1, lb1 .2, lb2 .3, lb3 .4,
                                              s1 .11, s2 .12, s3 .13   (all eth0)

The router forwards with an L4 multipath hash, so flows from different
source ports take different next hops (MULTIPATH_HASH_POLICY says what it
hashes), and runs BIRD: one eBGP session per load balancer (AS 65000 <- AS
65001); everything learned goes into its kernel FIB with `merge paths on`,
so equal routes from several load balancers become one multipath route.
The servers' default route is the router, so a DSR reply from a VIP goes
server -> router -> client and never crosses a load balancer.

Each load balancer runs BIRD on a *main* config that plays the operator's
part (log, `protocol device`) and includes a fragment file that the load
balancer's BGP owner writes: kdsr, or a test by hand (`write_fragment`).  The
lab starts every fragment as a comment, so a fresh load balancer announces
nothing.

    with BgpLab() as lab:
        lab.write_fragment("lb1", "...")          # then `birdc configure`
        lab.wait_nexthops(VIP_PREFIX, {"10.10.0.2"}, timeout=5)
        lab.kill_lb("lb1")                        # eth0 gone, BIRD SIGKILLed
        lab.reboot_lb("lb2")                      # a fresh namespace, every file kept; nothing started

The L2Lab API (run, spawn, start_responder, probe, next_sports, capture, mac,
sysctl, host) works unchanged: the client namespace is `client`, responders
answer with their host name (s1..s3).  `python3 bgplab.py` (as root) builds
the lab and leaves it up.

BIRD runs in the foreground, started through `setpriv --pdeathsig TERM`
(exec'd in place, so the pid is BIRD's own): if the Python process that
started it dies, even by SIGKILL, BIRD is told to stop (BIRD has no time
limit of its own, unlike the lab's other helpers).  Start BIRDs from the main
thread: the signal follows the thread that forked.  A kept lab (keep=True)
starts BIRD without it, so the daemons stay up with the namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from daemonlab import DaemonLab
from lab import READY_TIMEOUT, Host, LabError, LabProcess, _exec, lab_unavailable_reason

ROUTER_ASN, LB_ASN = 65000, 65001
# The router's BGP timers (seconds); tests bound failover times with them.
HOLD_TIME = 3  # BIRD accepts 0 or 3..65535
KEEPALIVE_TIME = 1
CONNECT_RETRY_TIME = 1  # an attempt that gets no answer is retried after this
CONNECT_DELAY_TIME = 1  # before the first attempt, and after a refused one (BIRD's default: 5)
ERROR_WAIT_TIME = (1, 2)  # min, max before an errored session restarts

VIP = "10.0.0.100"
VIP_PREFIX = f"{VIP}/32"
ROUTER_ADDRESS = "10.10.0.1"  # the load balancers' BGP neighbour
CLIENT_ADDRESS = "10.20.0.2"
ROUTER_CLIENT_IFACE = "eth1"  # the router's client-side link
LOAD_BALANCERS = ("lb1", "lb2", "lb3")
SERVERS = ("s1", "s2", "s3")
BIRD_NODES = ("router", *LOAD_BALANCERS)
# The router's ECMP hash: policy 3 with fields 0x37 (addresses, protocol,
# ports) hashes every packet's headers, as a hardware router would, so
# `ip route get ... sport N dport M ipproto tcp` (ecmp_choices) says which load
# balancer a flow goes through.  Policy 1 is not that over veth: a packet that
# already carries an L4 hash keeps it, and a packet from a connected socket
# (TCP, connected UDP) carries its socket's random hash into the router, so
# the next hop is per socket, not per 5-tuple (only unconnected UDP follows
# `ip route get`).  Policy 3 needs Linux 5.12.
MULTIPATH_HASH_POLICY = 3
MULTIPATH_HASH_FIELDS = "0x0037"  # used with policy 3

BIRD = shutil.which("bird") or "/usr/sbin/bird"
BIRDC = shutil.which("birdc") or "/usr/sbin/birdc"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
POLL = 0.05
BIRDC_TIMEOUT = 10.0


def bird_unavailable_reason() -> str | None:
    """Why BIRD cannot run here (None: it can); the namespace checks are lab.lab_unavailable_reason's."""
    missing = [tool for tool in (BIRD, BIRDC) if not os.access(tool, os.X_OK)]
    return f"the BGP lab needs BIRD 2 ({', '.join(missing)} missing: apt-get install bird2)" if missing else None


class BgpLab(DaemonLab):
    HOSTS = {
        "client": Host("client", "10.20.0.2/24", "fd00:20::2/64"),
        "router": Host("router", "10.10.0.1/24", "fd00:10::1/64"),
        "lb1": Host("lb1", "10.10.0.2/24", "fd00:10::2/64"),
        "lb2": Host("lb2", "10.10.0.3/24", "fd00:10::3/64"),
        "lb3": Host("lb3", "10.10.0.4/24", "fd00:10::4/64"),
        "s1": Host("s1", "10.10.0.11/24", "fd00:10::11/64"),
        "s2": Host("s2", "10.10.0.12/24", "fd00:10::12/64"),
        "s3": Host("s3", "10.10.0.13/24", "fd00:10::13/64"),
    }
    # The router's second leg, to the client (not on the bridge).
    ROUTER_CLIENT_SIDE = Host("router", "10.20.0.1/24", "fd00:20::1/64")
    SERVERS = SERVERS
    LOAD_BALANCERS = LOAD_BALANCERS

    def __init__(self, start_birds: bool = True, multipath_hash_policy: int = MULTIPATH_HASH_POLICY, **kwargs):
        """kwargs as L2Lab (keep, prefix, workdir, vips); ``start_birds=False``
        builds the network and writes the BIRD configs without starting BIRD;
        ``multipath_hash_policy``: the router's (1 or 3, see MULTIPATH_HASH_POLICY)."""
        kwargs.setdefault("vips", (VIP,))
        super().__init__(**kwargs)
        self.start_birds = start_birds
        self.multipath_hash_policy = multipath_hash_policy
        self._birds: dict[str, LabProcess] = {}
        # BIRD's files live in the workdir unless its control sockets would not
        # fit a unix socket path there: then in a short directory of our own.
        self.bird_dir = self.workdir
        self._own_bird_dir = len(str(self.workdir / "router" / "bird.ctl")) > UNIX_PATH_MAX
        if self._own_bird_dir:
            self.bird_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-bird-"))

    def down(self) -> None:
        try:
            super().down()
        finally:
            if self._own_bird_dir:
                shutil.rmtree(self.bird_dir, ignore_errors=True)

    def keep_instructions(self) -> str:
        extra = f"\n  BIRD files   : {self.bird_dir}  (rm -r it when done)" if self._own_bird_dir else ""
        return super().keep_instructions() + extra

    # --- building ------------------------------------------------------------

    def up(self) -> None:
        for name in (self.SWITCH, *self.HOSTS):
            self._add_namespace(name)
        self._build_switch()
        for host in self.HOSTS.values():
            if host.name != "client":
                self._attach(host)
        self._link_client()
        self._routing()
        self._write_bird_configs()
        if self.start_birds:
            for name in BIRD_NODES:
                self.start_bird(name)

    def _link_client(self) -> None:
        router, client = self.ns("router"), self.ns("client")
        _exec(
            ["ip", "link", "add", ROUTER_CLIENT_IFACE, "netns", router, "type", "veth"]
            + ["peer", "name", "eth0", "netns", client]
        )
        for name, iface, host in (
            ("router", ROUTER_CLIENT_IFACE, self.ROUTER_CLIENT_SIDE),
            ("client", "eth0", self.HOSTS["client"]),
        ):
            self.run(name, ["ip", "link", "set", iface, "up"])
            self.run(name, ["ip", "addr", "add", host.ipv4, "dev", iface])
            self.run(name, ["ip", "-6", "addr", "add", host.ipv6, "dev", iface, "nodad"])

    def _routing(self) -> None:
        for key, value in (
            ("net.ipv4.ip_forward", 1),
            ("net.ipv6.conf.all.forwarding", 1),
            ("net.ipv4.fib_multipath_hash_policy", self.multipath_hash_policy),  # L4: ports spread flows
            # A namespace inherits the host's rp_filter; DSR replies from a VIP
            # must never depend on it.
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.eth0.rp_filter", 0),
            (f"net.ipv4.conf.{ROUTER_CLIENT_IFACE}.rp_filter", 0),
        ):
            self.sysctl("router", key, value)
        if self.multipath_hash_policy == 3:
            self.sysctl("router", "net.ipv4.fib_multipath_hash_fields", MULTIPATH_HASH_FIELDS)
        self.run("client", ["ip", "route", "add", "default", "via", self.ROUTER_CLIENT_SIDE.addr4])
        self.run("client", ["ip", "-6", "route", "add", "default", "via", self.ROUTER_CLIENT_SIDE.addr6])
        for server in self.SERVERS:
            self.run(server, ["ip", "route", "add", "default", "via", self.HOSTS["router"].addr4])
            self.run(server, ["ip", "-6", "route", "add", "default", "via", self.HOSTS["router"].addr6])

    # --- BIRD configuration ----------------------------------------------------

    def bird_paths(self, name: str) -> dict[str, Path]:
        """config, socket, pidfile, log (and, on a load balancer, fragment: the
        file its main config includes and its BGP owner rewrites)."""
        if name not in BIRD_NODES:
            raise KeyError(f"no BIRD on {name!r}; BIRD runs on {', '.join(BIRD_NODES)}")
        base = self.bird_dir / name
        paths = {
            "config": base / "bird.conf",
            "socket": base / "bird.ctl",
            "pidfile": base / "bird.pid",
            "log": base / "bird.log",
        }
        if name != "router":
            paths["fragment"] = base / "kdsr.conf"
        return paths

    def _write_bird_configs(self) -> None:
        for name in BIRD_NODES:
            paths = self.bird_paths(name)
            if len(str(paths["socket"])) > UNIX_PATH_MAX:
                raise LabError(f"BIRD control socket path too long for a unix socket: {paths['socket']}")
            paths["config"].parent.mkdir(parents=True, exist_ok=True)
            if name == "router":
                paths["config"].write_text(self.router_config())
            else:
                paths["config"].write_text(self.lb_main_config(name))
                paths["fragment"].write_text("# BGP for this load balancer: kdsr (or a test) rewrites this file.\n")

    def router_config(self) -> str:
        sessions = "".join(
            f"""
protocol bgp {lb} {{
  local {ROUTER_ADDRESS} as {ROUTER_ASN};
  neighbor {self.HOSTS[lb].addr4} as {LB_ASN};
  hold time {HOLD_TIME};
  keepalive time {KEEPALIVE_TIME};
  connect retry time {CONNECT_RETRY_TIME};
  connect delay time {CONNECT_DELAY_TIME};
  error wait time {ERROR_WAIT_TIME[0]},{ERROR_WAIT_TIME[1]};
  ipv4 {{ import all; export none; }};
}}
"""
            for lb in self.LOAD_BALANCERS
        )
        return f"""# The lab's router: learns VIPs from every load balancer, installs ECMP routes.
log "{self.bird_paths("router")["log"]}" all;
router id {ROUTER_ADDRESS};
protocol device {{}}
protocol kernel {{
  ipv4 {{ import none; export all; }};
  merge paths on;
}}
{sessions}"""

    def lb_main_config(self, lb: str) -> str:
        paths = self.bird_paths(lb)
        return f"""# The operator's part of {lb}'s BIRD config; BGP comes from the fragment.
log "{paths["log"]}" all;
protocol device {{}}
include "{paths["fragment"]}";
"""

    def write_fragment(self, lb: str, text: str, configure: bool = True) -> str | None:
        """Replace lb's fragment (atomically, as a careful owner would), then
        `birdc configure` unless told not to; returns birdc's answer."""
        fragment = self.bird_paths(lb)["fragment"]
        tmp = fragment.with_name(fragment.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, fragment)
        return self.configure(lb) if configure else None

    def configure(self, name: str) -> str:
        """`birdc configure`; raises LabError with BIRD's message when the config is refused."""
        out = self.birdc(name, "configure")  # exits 1, with file:line:column and the error, on a bad config
        if not any(ok in out for ok in ("Reconfigured", "Reconfiguration in progress", "already in progress")):
            raise LabError(f"birdc configure in {name} refused:\n{out.strip()}")
        return out

    # --- BIRD processes ----------------------------------------------------------

    def start_bird(self, name: str, timeout: float = READY_TIMEOUT) -> LabProcess:
        """Start BIRD on `name` (router or a load balancer); returns once it answers birdc."""
        paths = self.bird_paths(name)
        argv = [BIRD, "-f", "-c", str(paths["config"]), "-s", str(paths["socket"]), "-P", str(paths["pidfile"])]

        def ready(_proc: LabProcess) -> bool:
            if not paths["socket"].exists():
                return False
            status = self.run(name, [BIRDC, "-s", str(paths["socket"]), "show", "status"], check=False, timeout=5)
            return "Daemon is up and running" in status.stdout

        return self._start_daemon(self._birds, name, "BIRD", argv, ready, timeout, POLL)

    def bird(self, name: str) -> LabProcess:
        return self._birds[name]

    def stop_bird(self, name: str) -> int:
        """Graceful stop (SIGTERM: BIRD sends its peers a Cease); returns BIRD's exit code."""
        return self._birds[name].stop(signal.SIGTERM)

    def kill_lb(self, lb: str) -> None:
        """A load balancer dies: its eth0 deleted (gone from the segment), then
        BIRD SIGKILLed, so the router hears nothing (no Cease, no withdrawal)
        and only notices when its hold timer expires.

        The link goes first: a killed BIRD's TCP socket is closed by the
        kernel, and a FIN that reached the router would end the session at once.
        """
        if lb not in self.LOAD_BALANCERS:
            raise KeyError(f"{lb!r} is not a load balancer")
        self.run(lb, ["ip", "link", "del", "eth0"])
        self._birds[lb].stop(signal.SIGKILL)

    def revive_lb(self, lb: str) -> LabProcess:
        """Undo kill_lb: a fresh eth0 on the segment (new MAC), then BIRD on its
        current config and fragment."""
        self._attach(self.HOSTS[lb])
        return self.start_bird(lb)

    def reboot_lb(self, lb: str) -> None:
        """A load balancer loses power and comes back: every process of ours
        in it SIGKILLed (its link first, as kill_lb), its network namespace
        deleted and made again with a fresh eth0 on the segment, so the
        kernel state of the last boot (nftables, routes of every table,
        addresses, sysctls) is gone.  Every file stays: the state directory,
        BIRD's config and fragment, even BIRD's control socket and pid file
        (a real reboot clears /run; a gate on a file there would pass here).
        Nothing is started: the caller starts BIRD (start_bird) and kdsr, in
        the order a boot would.
        """
        if lb not in self.LOAD_BALANCERS:
            raise KeyError(f"{lb!r} is not a load balancer")
        self.run(lb, ["ip", "link", "del", "eth0"], check=False)
        for proc in [p for p in self._processes if p.host == lb]:
            proc.stop(signal.SIGKILL)
            self._processes.remove(proc)
        self._birds.pop(lb, None)
        self._renew_namespace(lb)

    def birdc(self, name: str, *args: str) -> str:
        """`birdc -s <socket> args...` in that host; its stdout (raises if birdc fails)."""
        socket_path = str(self.bird_paths(name)["socket"])
        result = self.run(name, [BIRDC, "-s", socket_path, *args], check=False, timeout=BIRDC_TIMEOUT)
        if result.returncode != 0:  # e.g. 1 when `configure` finds an error; the message is on stdout
            raise LabError(
                f"birdc {' '.join(args)} in {name} exited {result.returncode}:\n{result.stdout.strip()}"
                f"\n{result.stderr.strip()}".rstrip()
            )
        return result.stdout

    # --- the router's view -------------------------------------------------------

    def router_nexthops(self, prefix: str) -> set[str]:
        """Gateways of the router's FIB route for exactly `prefix` (empty: no route)."""
        out = self.run("router", ["ip", "-j", "route", "show", prefix]).stdout.strip()
        gateways: set[str] = set()
        for route in json.loads(out or "[]"):
            if "gateway" in route:
                gateways.add(route["gateway"])
            gateways.update(hop["gateway"] for hop in route.get("nexthops", []) if "gateway" in hop)
        return gateways

    def wait_nexthops(self, prefix: str, expected: Iterable[str], timeout: float) -> float:
        """Poll (every 50 ms) until the router's next hops for `prefix` are
        exactly `expected`; returns the seconds it took."""
        expected = set(expected)
        started = time.monotonic()
        seen: set[str] = set()
        for _ in range(int(timeout / POLL) + 2):
            seen = self.router_nexthops(prefix)
            if seen == expected:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                break
            time.sleep(POLL)
        raise AssertionError(
            f"router next hops for {prefix}: {sorted(seen)}, expected {sorted(expected)} "
            f"within {timeout:g} s\n{self.router_diagnostics()}"
        )

    def router_diagnostics(self) -> str:
        parts = []
        for title, argv in (
            ("birdc show protocols", [BIRDC, "-s", str(self.bird_paths("router")["socket"]), "show", "protocols"]),
            ("birdc show route all", [BIRDC, "-s", str(self.bird_paths("router")["socket"]), "show", "route", "all"]),
            ("ip route", ["ip", "route"]),
        ):
            result = self.run("router", argv, check=False, timeout=BIRDC_TIMEOUT)
            parts.append(f"--- router: {title}\n{result.stdout.strip()}{result.stderr.strip()}")
        return "\n".join(parts)

    def ecmp_choices(
        self,
        dst: str,
        sports: Iterable[int],
        dport: int = 80,
        proto: str = "tcp",
        src: str = CLIENT_ADDRESS,
        iif: str = ROUTER_CLIENT_IFACE,
    ) -> dict[int, str | None]:
        """The next hop the router's FIB picks for each source port of a flow
        src:sport -> dst:dport arriving on iif (`ip route get`, batched).

        With hash policy 1 this is where packets without an L4 hash go
        (unconnected UDP, raw sockets); TCP flows follow it only with policy 3
        (see MULTIPATH_HASH_POLICY)."""
        sports = list(sports)
        batch = "".join(
            f"route get {dst} from {src} iif {iif} ipproto {proto} sport {sport} dport {dport}\n" for sport in sports
        )
        out = self.run("router", ["ip", "-j", "-batch", "-"], input=batch).stdout
        answers = [json.loads(line)[0] for line in out.splitlines() if line.strip()]
        if len(answers) != len(sports):
            raise LabError(f"ip route get: {len(answers)} answers for {len(sports)} flows:\n{out}")
        return {sport: answer.get("gateway") for sport, answer in zip(sports, answers, strict=True)}


def main() -> int:
    reason = lab_unavailable_reason() or bird_unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with BgpLab(keep=True) as lab:
        print(f"BGP lab up (suffix {lab.suffix}); BIRD sockets:", file=sys.stderr)
        for name in BIRD_NODES:
            print(f"  {name:6}: {lab.bird_paths(name)['socket']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
