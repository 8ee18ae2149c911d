"""Which backend tables a load balancer needs: one per (pool, family, hashing).

Services that share a pool and a hashing profile share one Maglev table, so a
thousand VIPs on one pool cost one table, not a thousand.  A selector's name
is derived from its content (pool name, family and a digest of the hashing
profile), so adding an unrelated service never renames it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdsr import maglev
from kdsr.intent.model import Hashing, Intent, Pool, Service
from kdsr.intent.primes import next_prime

# Maglev needs M >> N for even shares: M >= 100*N keeps the worst share within
# about 1% of the mean (NSDI 2016, section 3.4).  N counts drained members too,
# so draining a server never changes M (a new M reshuffles every flow).
SLOTS_PER_SERVER = 100
MIN_TABLE_SIZE = 251


@dataclass(frozen=True)
class Selector:
    pool: Pool
    family: int  # 4 or 6
    hashing: Hashing
    table_size: int
    services: tuple[Service, ...]

    @property
    def name(self) -> str:
        profile = f"{self.hashing.fields}/{self.hashing.seed}/{self.table_size}"
        digest = hashlib.sha256(profile.encode()).hexdigest()[:6]
        return f"pool-{self.pool.name}-v{self.family}-{digest}"

    @property
    def pins_macs(self) -> bool:
        # verify guarantees a pool pins MACs for all members or for none.
        return bool(self.pool.members) and all(m.mac for m in self.pool.members)

    def table(self) -> tuple[str, ...]:
        """slot -> member key: the address, or the MAC when MACs are pinned."""
        backends = [
            maglev.Backend(key=str(m.address), weight=m.weight)
            for m in self.pool.members
            if m.address.version == self.family
        ]
        by_address = {str(m.address): m for m in self.pool.members}
        table = maglev.populate(backends, self.table_size, self.hashing.seed)
        if self.pins_macs:
            return tuple(by_address[a].mac for a in table)
        return table


def default_table_size(pool: Pool) -> int:
    wanted = max(SLOTS_PER_SERVER * len(pool.members), MIN_TABLE_SIZE)
    return min(next_prime(wanted), maglev.MAX_TABLE_SIZE)


def selectors_for(intent: Intent) -> list[Selector]:
    grouped: dict[tuple, list[Service]] = {}
    for service in intent.services:
        pool = intent.pool(service.pool)
        size = service.hashing.table_size or default_table_size(pool)
        key = (pool.name, service.vip.version, service.hashing.fields, service.hashing.seed, size)
        grouped.setdefault(key, []).append(service)
    selectors = []
    for (pool_name, family, _fields, _seed, size), services in sorted(grouped.items()):
        selectors.append(
            Selector(
                pool=intent.pool(pool_name),
                family=family,
                hashing=services[0].hashing,
                table_size=size,
                services=tuple(services),
            )
        )
    return selectors
