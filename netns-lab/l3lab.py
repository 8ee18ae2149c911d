"""A routed lab for L3 DSR: the servers are a router hop away from the load balancers.

    client --A-- r1 --B-- lb, lb2, r2 --C-- s1, s2, s3
                   (VIPs routed to lb)

    A 10.1.0.0/24 fd00:1::/64   client .10, r1 .1
    B 10.2.0.0/24 fd00:2::/64   r1 .1, lb .2, lb2 .3, r2 .254
    C 10.3.0.0/24 fd00:3::/64   r2 .1, s1 .11, s2 .12, s3 .13

r1 routes the VIPs (10.9.0.0/24, fd00:9::/64) to one load balancer (lb by
default; ``route_vips_via("lb2")`` moves them), and the server subnet to r2.
A server's reply to the client goes s -> r2 -> r1 -> client and never
crosses a load balancer.  The segments are bridges in the ``sw`` namespace,
so every host's uplink is ``eth0`` (routers: ``eth0`` and ``eth1``), as the
examples/l3-*.json intents expect.
"""

from __future__ import annotations

from lab import Host, L2Lab, _exec

VIP_NET4, VIP_NET6 = "10.9.0.0/24", "fd00:9::/64"
SERVER_NET4, SERVER_NET6 = "10.3.0.0/24", "fd00:3::/64"
SERVERS = {"s1": "10.3.0.11", "s2": "10.3.0.12", "s3": "10.3.0.13"}


def one_service_intent(vip: str, port: int, dsr: dict, pool: dict, **service: object) -> dict:
    """An intent for this lab: one TCP service app (vip:port) on pool ``app``
    (``pool``: its servers, health...), load balancer lb1, servers s1-s3."""
    return {
        "version": 1,
        "services": {"app": {"vip": vip, "ports": port, "protocols": "tcp", "pool": "app", "dsr": dsr, **service}},
        "pools": {"app": pool},
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.2.0.2/24"]}},
        "servers": {s: {"interface": "eth0", "addresses": [f"{a}/24"]} for s, a in SERVERS.items()},
    }


class L3Lab(L2Lab):
    HOSTS = {
        "client": Host("client", "10.1.0.10/24", "fd00:1::10/64"),
        "r1": Host("r1", "10.1.0.1/24", "fd00:1::1/64"),
        "lb": Host("lb", "10.2.0.2/24", "fd00:2::2/64"),
        "lb2": Host("lb2", "10.2.0.3/24", "fd00:2::3/64"),
        "r2": Host("r2", "10.3.0.1/24", "fd00:3::1/64"),
        "s1": Host("s1", "10.3.0.11/24", "fd00:3::11/64"),
        "s2": Host("s2", "10.3.0.12/24", "fd00:3::12/64"),
        "s3": Host("s3", "10.3.0.13/24", "fd00:3::13/64"),
    }
    SERVERS = ("s1", "s2", "s3")
    LOAD_BALANCERS = ("lb", "lb2")
    # Which segment each host's eth0 is on; routers also get eth1.
    SEGMENT = {
        "client": "brA",
        "r1": "brA",
        "lb": "brB",
        "lb2": "brB",
        "r2": "brC",
        "s1": "brC",
        "s2": "brC",
        "s3": "brC",
    }
    SECOND_LEG = {"r1": ("brB", "10.2.0.1/24", "fd00:2::1/64"), "r2": ("brB", "10.2.0.254/24", "fd00:2::254/64")}

    def __init__(self, **kwargs):
        kwargs.setdefault("vips", ())
        super().__init__(**kwargs)

    def up(self) -> None:
        for name in (self.SWITCH, *self.HOSTS):
            self._add_namespace(name)
        for bridge in ("brA", "brB", "brC"):
            self.run(
                self.SWITCH, ["ip", "link", "add", bridge, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]
            )
            self.run(self.SWITCH, ["ip", "link", "set", bridge, "up"])
        for host in self.HOSTS.values():
            self._wire(host.name, "eth0", self.SEGMENT[host.name], host.ipv4, host.ipv6)
        for router, (bridge, v4, v6) in self.SECOND_LEG.items():
            self._wire(router, "eth1", bridge, v4, v6)
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                self.sysctl(router, key, 1)
        self._routes()

    def _wire(self, name: str, iface: str, bridge: str, ipv4: str, ipv6: str) -> None:
        port = f"p{name}{iface[-1]}"
        _exec(
            [
                "ip",
                "link",
                "add",
                iface,
                "netns",
                self.ns(name),
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.ns(self.SWITCH),
            ]
        )
        self.run(self.SWITCH, ["ip", "link", "set", port, "master", bridge, "up"])
        self.run(name, ["ip", "link", "set", iface, "up"])
        self.run(name, ["ip", "addr", "add", ipv4, "dev", iface])
        self.run(name, ["ip", "-6", "addr", "add", ipv6, "dev", iface, "nodad"])

    def _route(self, name: str, dst: str, via: str, replace: bool = False) -> None:
        family = ["-6"] if ":" in via else []
        self.run(name, ["ip", *family, "route", "replace" if replace else "add", dst, "via", via])

    def _routes(self) -> None:
        self._route("client", "default", "10.1.0.1")
        self._route("client", "default", "fd00:1::1")
        self._route("r1", SERVER_NET4, "10.2.0.254")
        self._route("r1", SERVER_NET6, "fd00:2::254")
        self.route_vips_via("lb")
        self._route("r2", "default", "10.2.0.1")
        self._route("r2", "default", "fd00:2::1")
        for lb in self.LOAD_BALANCERS:
            self._route(lb, "default", "10.2.0.1")
            self._route(lb, "default", "fd00:2::1")
            self._route(lb, SERVER_NET4, "10.2.0.254")
            self._route(lb, SERVER_NET6, "fd00:2::254")
        for server in self.SERVERS:
            self._route(server, "default", "10.3.0.1")
            self._route(server, "default", "fd00:3::1")

    def route_vips_via(self, lb: str) -> None:
        """Point r1's VIP routes at one load balancer (what BGP would do)."""
        host = self.HOSTS[lb]
        self._route("r1", VIP_NET4, host.addr4, replace=True)
        self._route("r1", VIP_NET6, host.addr6, replace=True)
