"""A validating in-memory kernel for unit tests: one fake per backend
(nft.py, links.py, ipvs.py, bird.py, keepalived.py, sysctl.py; the xdp
engine's is xdp.FakeIO), each refusing what the real subsystem refuses.

They share one FakeLog: every write any of them received, in order
(``ops``), and the fault to inject (``fail_at``: the k-th write fails), so
a test can fail any step of an apply and check the rollback.
"""

from __future__ import annotations

from kdsr.kernel.fake.bird import FakeBird
from kdsr.kernel.fake.ipvs import FakeIpvs
from kdsr.kernel.fake.keepalived import FakeKeepalived
from kdsr.kernel.fake.links import FakeLinks
from kdsr.kernel.fake.log import FakeLog
from kdsr.kernel.fake.nft import FakeNftables
from kdsr.kernel.fake.sysctl import FakeSysctl
from kdsr.kernel.xdp import FakeIO, XdpBackend


class FakeKernel:
    def __init__(self, interfaces: tuple[str, ...] = ("lo", "eth0"), local: tuple[str, ...] = ()) -> None:
        self.log = FakeLog()
        self.sysctl = FakeSysctl(self.log)
        self.links = FakeLinks(self.log, interfaces, local, self.sysctl.values)
        self.nft = FakeNftables(self.log, self.links.link_exists)
        self.ipvs = FakeIpvs(self.log)
        self.bird = FakeBird(self.log)
        self.keepalived = FakeKeepalived(self.log)
        # kdsr's XDP program and maps, in memory (kdsr/kernel/xdp.py FakeIO)
        self.xdp = XdpBackend(FakeIO({name: f"02:00:00:00:00:{i + 1:02x}" for i, name in enumerate(interfaces)}))
        self.modules: set[str] | None = None  # None: every module is there

    @property
    def writes(self) -> int:
        return self.log.writes + self.xdp.writes

    @property
    def ops(self) -> list[str]:
        return self.log.ops

    @property
    def fail_at(self) -> int | None:
        return self.log.fail_at

    @fail_at.setter
    def fail_at(self, number: int | None) -> None:
        """Fail the write with this 1-based number (counted over the fakes' log)."""
        self.log.fail_at = number

    def modules_missing(self, names: tuple[str, ...]) -> list[str]:
        return [] if self.modules is None else [n for n in names if n not in self.modules]

    def close(self) -> None:
        pass
