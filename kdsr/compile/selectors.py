"""Which backend tables a load balancer needs: one per (pool, family, hashing).

Services that share a pool and a hashing profile share one Maglev table, so a
thousand VIPs on one pool cost one table, not a thousand.  A selector's name
is derived from its content (pool name, family and a digest of the hashing
profile), so adding an unrelated service never renames it.

Table sizes (M for a pool of N servers, drained ones included):

- ``table_size`` from the intent, or by default the smallest rung of
  ``TABLE_SIZE_LADDER`` (primes that roughly double, 4,093 to 65,537) with
  at least 1,000 slots per server.  Two measured reasons (bench/maglev.py):
  a server change moves close to the ideal 1/N of the flows only when
  M >= ~1000 * N (at M ~ 100 * N Maglev's own reshuffle adds 1-2 points:
  docs/consistent-hashing.md has the figures),
  and a size that steps on a ladder stays put while a pool grows or shrinks
  within a rung, where a size that followed N would change on every
  membership change and re-slot every flow of the pool;
- at most ``MAX_TABLE_SIZE`` (65537) slots per table;
- at most ``SLOT_BUDGET`` slots over all the selectors of one nft table.
  When the default sizes would exceed it, the largest tables are shrunk to a
  common cap, itself a rung of the ladder (water-filling: small pools keep
  their size; the cap moves only when a rung no longer fits).  Sizes given in
  the intent are never shrunk; more of them than the budget holds is an error.

Whenever a table ends up with fewer than 100 slots per server, ``sizing_problems``
says so, and the CLI prints it as a warning (validate, plan, apply).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
from collections.abc import Callable
from dataclasses import dataclass

from kdsr import maglev
from kdsr.compile.cache import CompileCache
from kdsr.errors import IntentError, Problem
from kdsr.intent.model import Hashing, Intent, Pool, PoolMember, Service, address_text
from kdsr.intent.primes import is_prime, next_prime

# Maglev's worst share is at most 1 + 1/floor(M/N) of the mean (NSDI 2016,
# section 3.4): below 100 slots per server that exceeds 1%, and kdsr warns.
SLOTS_PER_SERVER = 100
# The default aims ten times higher, for disruption (see the module docstring).
# N counts drained members too, so draining a server never changes M.
DEFAULT_SLOTS_PER_SERVER = 1000
# Primes that roughly double.  Changing a rung, or the rule that picks one,
# changes deployed tables for the same intent: a breaking change.
TABLE_SIZE_LADDER = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65537)
MIN_DEFAULT_TABLE_SIZE = 4093
MAX_TABLE_SIZE = maglev.MAX_TABLE_SIZE
# Slot elements over all the selector maps of one nft table.  Each element
# with its counter costs kernel slab (plus per-CPU counter memory), and nft
# 1.0.6 lists every element on each read.  The kernel copes; what grows is
# kdsr's own read-back (plan, apply and show list the whole table).  2^18
# elements keep a plan within a few seconds and hold, e.g., four pools at the
# largest size, or 1,000 pools of one or two servers at the minimum (251);
# 1,000 pools of three servers get 257 slots each, with a warning.
SLOT_BUDGET = 262_144

# Why a selector has the size it has (for warnings and `kdsr maglev`).
SIZED_BY_INTENT = "table_size"
SIZED_BY_DEFAULT = "default"
SIZED_BY_MAX = "largest table"
SIZED_BY_BUDGET = "slot budget"


@dataclass(frozen=True)
class Selector:
    pool: Pool
    family: int  # 4 or 6
    hashing: Hashing
    table_size: int
    services: tuple[Service, ...]
    # The DSR mode decides what a slot holds (an address or MAC for l2, a
    # tunnel's fwmark for L3), so services of one pool in two modes need two
    # selectors.  L2 names leave the mode out (they predate L3).
    mode: str = "l2"
    sized_by: str = SIZED_BY_DEFAULT

    @functools.cached_property
    def name(self) -> str:
        profile = f"{self.hashing.fields}/{self.hashing.seed}/{self.table_size}"
        if self.mode != "l2":
            profile += f"/{self.mode}"
        if self.hashing.pinning is not None:
            # Only pinned selectors add to the profile: unpinned names (and
            # every table already deployed) stay as they were.
            profile += f"/pin/{self.hashing.pinning.timeout}"
        digest = hashlib.sha256(profile.encode()).hexdigest()[:6]
        return f"pool-{self.pool.name}-v{self.family}-{digest}"

    @property
    def pins_macs(self) -> bool:
        # verify guarantees a pool pins MACs for all members or for none.
        return bool(self.pool.members) and all(m.mac for m in self.pool.members)

    @property
    def members(self) -> tuple[PoolMember, ...]:
        """The pool's members of this selector's family, drained ones included."""
        return tuple(m for m in self.pool.members if m.address.version == self.family)

    def addresses(self, cache: CompileCache | None = None) -> tuple[str, ...]:
        """The Maglev table: slot -> member address (``cache``: where tables already built are kept)."""
        backends = tuple(maglev.Backend(key=address_text(m.address), weight=m.weight) for m in self.members)
        if cache is None:
            return maglev.build(backends, self.table_size, self.hashing.seed)
        return cache.maglev_table(backends, self.table_size, self.hashing.seed)

    def table(self, cache: CompileCache | None = None) -> tuple[str, ...]:
        """slot -> member key: the address, or the MAC when MACs are pinned."""
        table = self.addresses(cache)
        if self.pins_macs:
            by_address = {str(m.address): m for m in self.members}
            return tuple(by_address[a].mac for a in table)
        return table


def default_table_size(servers: int) -> tuple[int, str]:
    """The default size for a pool of ``servers`` members, and why (before the budget)."""
    wanted = max(DEFAULT_SLOTS_PER_SERVER * servers, MIN_DEFAULT_TABLE_SIZE)
    for rung in TABLE_SIZE_LADDER:
        if rung >= wanted:
            return rung, SIZED_BY_DEFAULT
    return MAX_TABLE_SIZE, SIZED_BY_MAX


def _prime_at_most(n: int) -> int:
    while n > 2 and not is_prime(n):
        n -= 1
    return n


def _cap_for(wanted: list[int], budget: int) -> int:
    """The largest cap c with sum(min(w, c)) <= budget (water-filling).

    c is a rung of the ladder when one fits, so that adding a pool changes
    the other pools' sizes (and re-slots their flows) only when the cap has
    to drop a rung; below the smallest rung, the largest prime that fits.
    """
    for rung in reversed(TABLE_SIZE_LADDER):
        if sum(min(w, rung) for w in wanted) <= budget:
            return rung
    low, high = 2, max(wanted)
    while low < high:  # largest integer c that fits
        mid = (low + high + 1) // 2
        if sum(min(w, mid) for w in wanted) <= budget:
            low = mid
        else:
            high = mid - 1
    # Every wanted size is prime, so min(w, prime cap) is prime too.
    return _prime_at_most(low)


def _l2_nft(service: Service) -> bool:
    return service.mode == "l2" and service.engine == "nft"


# Compile asks for the same intent's selectors more than once (whether there
# is an L2 table, then its contents), and the daemon asks again after every
# health event and reload.  At 10,000 services a fresh answer walks all of
# them, so with a CompileCache each step reuses what it last made and redoes
# only what an edit reached: the grouping, by the identity of the service
# objects (a reload reuses the unchanged ones, a health event or a drain
# keeps the whole tuple); the sizes, by what they are computed from; each
# selector, by its parts.  The selectors an edit did not reach stay the same
# objects, with the same services tuples, which is how service_maps and the
# chain cache downstream recognise them without looking inside.
@dataclass(frozen=True)
class _Groups:
    services: tuple[Service, ...]  # the intent's services they were made from
    keys: tuple[tuple | None, ...]  # per service: its group, None when not wanted
    # group -> (its services, their positions).  The order of the groups
    # does not matter: selectors are sorted by their final key, and the
    # services of merged groups by position.
    members: dict[tuple, tuple[tuple[Service, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class _Last:
    intent: Intent
    groups: _Groups
    sizing: tuple  # everything _apply_budget read
    sizes: dict[tuple, tuple[int, str]]
    selectors: tuple[Selector, ...]
    by_final: dict[tuple, Selector]


def selectors_for(
    intent: Intent,
    wanted: Callable[[Service], bool] | None = None,
    budget: int = SLOT_BUDGET,
    cache: CompileCache | None = None,
) -> list[Selector]:
    """Selectors for the services ``wanted`` picks (default: L2 services of the nft engine).

    One call sizes the selectors of one nft table, so ``budget`` is per table.
    Raises IntentError when the intent's own table sizes exceed the budget.
    """
    wanted = wanted or _l2_nft
    last: _Last | None = cache.selectors.get((wanted, budget)) if cache is not None else None
    if last is not None and last.intent is intent:
        return list(last.selectors)
    groups = _grouped(intent.services, wanted, last.groups if last is not None else None)
    # Each group's size before the budget: the intent's, or the default for
    # its pool (drained and down members count: they stay members at weight 0).
    provisional: dict[tuple, tuple[int, str]] = {}
    counts = []
    for key in groups.members:
        servers = len(intent.pool(key[0]).members)
        explicit = key[4]
        provisional[key] = (explicit, SIZED_BY_INTENT) if explicit is not None else default_table_size(servers)
        counts.append(servers)  # the budget checks each pool's size against its table
    sizing = (tuple(provisional.items()), tuple(counts))
    if last is not None and last.sizing == sizing:
        sizes = last.sizes
    else:
        sizes = _apply_budget(intent, provisional, budget)
    by_final = _selectors(intent, groups, sizes, last.by_final if last is not None else {})
    selectors = tuple(by_final.values())
    if cache is not None:
        cache.selectors.put((wanted, budget), _Last(intent, groups, sizing, sizes, selectors, by_final))
    return list(selectors)


def _group_key(service: Service) -> tuple:
    """What decides a service's table before the budget."""
    h = service.hashing
    return (service.pool, service.vip.version, h.fields, h.seed, h.table_size, service.mode, h.pinning)


def _grouped(services: tuple[Service, ...], wanted: Callable[[Service], bool], last: _Groups | None) -> _Groups:
    if last is not None:
        if last.services is services:
            return last
        if len(last.services) == len(services):
            changed = [i for i, (a, b) in enumerate(zip(last.services, services, strict=True)) if a is not b]
            if len(changed) * 8 <= len(services):
                return _regrouped(last, services, wanted, changed)
    keys = tuple(_group_key(s) if wanted(s) else None for s in services)
    positions: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            positions.setdefault(key, []).append(i)
    members = {}
    for key, at in positions.items():
        grouped = tuple(services[i] for i in at)
        old = last.members.get(key) if last is not None else None
        if old is not None and len(old[0]) == len(grouped) and all(map(operator.is_, old[0], grouped)):
            grouped = old[0]  # the same services: the same tuple, for the cache downstream
        members[key] = (grouped, tuple(at))
    return _Groups(services, keys, members)


def _regrouped(
    last: _Groups, services: tuple[Service, ...], wanted: Callable[[Service], bool], changed: list[int]
) -> _Groups:
    """``last`` with the services at ``changed`` positions (the others are the same objects) regrouped."""
    keys = list(last.keys)
    touched = set()
    for i in changed:
        touched.add(keys[i])
        keys[i] = _group_key(services[i]) if wanted(services[i]) else None
        touched.add(keys[i])
    touched.discard(None)
    moved = set(changed)
    members = dict(last.members)
    for key in touched:
        kept = [i for i in members[key][1] if i not in moved] if key in members else []
        at = sorted(kept + [i for i in changed if keys[i] == key])
        if at:
            members[key] = (tuple(services[i] for i in at), tuple(at))
        else:
            del members[key]
    return _Groups(services, tuple(keys), members)


def _selectors(
    intent: Intent, groups: _Groups, sizes: dict[tuple, tuple[int, str]], before: dict[tuple, Selector]
) -> dict[tuple, Selector]:
    """The selectors by their final key, sorted; those of ``before`` reused where nothing of theirs changed."""
    # Group the groups by their final size (a default that equals an
    # explicit size is one table).
    grouped: dict[tuple, list[tuple[tuple[Service, ...], tuple[int, ...]]]] = {}
    reasons: dict[tuple, str] = {}
    for key, (services, at) in groups.members.items():
        size, reason = sizes[key]
        pool_name, family, fields, seed, _explicit, mode, _pinning = key
        final = (pool_name, family, fields, seed, size, mode, _pinning_key(services[0].hashing))
        grouped.setdefault(final, []).append((services, at))
        # The intent's word wins when a default lands on the same size.
        if reasons.get(final) != SIZED_BY_INTENT:
            reasons[final] = reason
    selectors = {}
    for final, parts in sorted(grouped.items()):
        if len(parts) == 1:
            services = parts[0][0]
        else:  # a merged group lists its services in the intent's order too
            placed = sorted((i, s) for part, at in parts for i, s in zip(at, part, strict=True))
            services = tuple(s for _, s in placed)
        pool_name, family, _fields, _seed, size, mode, _pin = final
        pool = intent.pool(pool_name)
        old = before.get(final)
        if old is not None and old.services is services and old.sized_by == reasons[final]:
            sel = old if old.pool is pool else dataclasses.replace(old, pool=pool)
        else:
            sel = Selector(
                pool=pool,
                family=family,
                hashing=services[0].hashing,
                table_size=size,
                services=services,
                mode=mode,
                sized_by=reasons[final],
            )
        selectors[final] = sel
    return selectors


def _pinning_key(hashing: Hashing) -> tuple:
    return () if hashing.pinning is None else (hashing.pinning.timeout, hashing.pinning.max_flows)


def _apply_budget(intent: Intent, provisional: dict[tuple, tuple[int, str]], budget: int) -> dict:
    explicit = {k: v for k, v in provisional.items() if v[1] == SIZED_BY_INTENT}
    chosen = {k: v for k, v in provisional.items() if v[1] != SIZED_BY_INTENT}
    explicit_total = sum(size for size, _ in explicit.values())
    if explicit_total > budget:
        listed = ", ".join(f"{key[0]} ({size})" for key, (size, _) in sorted(explicit.items(), key=str))
        raise IntentError(
            [
                Problem(
                    intent.source,
                    "/services",
                    f"the table sizes set with table_size add up to {explicit_total} slots, more than one "
                    f"load balancer's budget of {budget} ({listed}).",
                    "Use smaller table sizes, or leave table_size out so kdsr sizes the tables within the budget.",
                )
            ]
        )
    left = budget - explicit_total
    if sum(size for size, _ in chosen.values()) <= left:
        return provisional
    keys = sorted(chosen, key=str)
    cap = _cap_for([chosen[k][0] for k in keys], left)
    result = dict(explicit)
    problems = []
    for key in keys:
        size, reason = chosen[key]
        if size > cap:
            size, reason = cap, SIZED_BY_BUDGET
        pool = intent.pool(key[0])
        if size < len(pool.members):
            problems.append(
                Problem(
                    intent.source,
                    pool.pointer,
                    f"pool {pool.name} has {len(pool.members)} servers but the slot budget of {budget} per load "
                    f"balancer leaves its table {size} slots.",
                    "Use fewer or smaller pools per load balancer, or set table_size on fewer services.",
                )
            )
        result[key] = (size, reason)
    if problems:
        raise IntentError(problems)
    return result


def sizing_problems(
    intent: Intent, wanted: Callable[[Service], bool] | None = None, cache: CompileCache | None = None
) -> list[Problem]:
    """Warnings (not errors): tables with fewer than 100 slots per server.

    Maglev's worst share is at most 1 + 1/floor(M/N) of the mean; below 100
    slots per server that is more than 1% (NSDI 2016, 3.4).
    """
    problems, squeezed = [], []
    for sel in selectors_for(intent, wanted, cache=cache):
        servers = len(sel.members)
        if not servers or sel.table_size >= SLOTS_PER_SERVER * servers:
            continue
        spread = _spread(sel)
        each = f"{_per_server(sel)} slots each (fewer than 100)"
        pool = f"pool {sel.pool.name}'s {servers} servers"
        better = next_prime(SLOTS_PER_SERVER * servers)
        if sel.sized_by == SIZED_BY_INTENT:
            service = sel.services[0]
            pointer = f"{service.hashing.pointer or service.pointer + '/hashing'}/table_size"
            hint = (
                f"Use a prime of at least 100 x the servers ({better})"
                if better <= MAX_TABLE_SIZE
                else "Split the pool"
            )
            message = f"table_size {sel.table_size} gives {pool} {each}: {spread}."
            problems.append(Problem(intent.source, pointer, message, f"{hint}, or leave table_size out."))
        elif sel.sized_by == SIZED_BY_MAX:
            message = f"the largest table ({sel.table_size} slots) gives {pool} {each}: {spread}."
            hint = "Split the pool into smaller pools if the spread matters."
            problems.append(Problem(intent.source, sel.pool.pointer, message, hint))
        else:  # SIZED_BY_BUDGET
            squeezed.append(sel)
    return problems + _budget_problems(intent, squeezed)


# Up to this many pools squeezed by the slot budget get a warning each; more
# get one warning for all (1,000 pools would otherwise print 1,000 lines).
BUDGET_WARNINGS_EACH = 3
_BUDGET_HINT = (
    "The size shrinks further as pools are added, and a new size moves every flow of the pool; "
    "set table_size on its services to fix it, or spread the pools over more load balancers."
)


def _budget_problems(intent: Intent, squeezed: list[Selector]) -> list[Problem]:
    """The warnings for pools the slot budget leaves fewer than 100 slots per server."""
    budget = f"the slot budget of a load balancer ({SLOT_BUDGET} over all its tables)"
    if len(squeezed) <= BUDGET_WARNINGS_EACH:
        return [
            Problem(
                intent.source,
                sel.pool.pointer,
                f"{budget} leaves pool {sel.pool.name}'s {len(sel.members)} servers {sel.table_size} slots, "
                f"{_per_server(sel)} slots each (fewer than 100): {_spread(sel)}.",
                _BUDGET_HINT,
            )
            for sel in squeezed
        ]
    pools = sorted({sel.pool.name for sel in squeezed})
    worst = min(squeezed, key=lambda sel: (_per_server(sel), sel.pool.name))
    shown = f"{', '.join(pools[:BUDGET_WARNINGS_EACH])} and {len(pools) - BUDGET_WARNINGS_EACH} more"
    message = (
        f"{budget} leaves {len(pools)} pools fewer than 100 slots per server ({shown}); "
        f"the fewest is pool {worst.pool.name}'s: {worst.table_size} slots for {len(worst.members)} servers, "
        f"{_per_server(worst)} each, so {_spread(worst)}."
    )
    return [Problem(intent.source, "/pools", message, _BUDGET_HINT)]


def _per_server(sel: Selector) -> int:
    return sel.table_size // len(sel.members)


def _spread(sel: Selector) -> str:
    return f"a server's share of flows can be up to {100 / max(_per_server(sel), 1):.1f}% above the mean"


def server_id(member: PoolMember) -> int:
    """A 32-bit name for a server that stays the same across table changes.

    Slots hold it, the pool's servers map keys its forwarding data and
    counter by it, and flow pinning stores it per flow, so it must not
    depend on the pool's other members or their order.  IPv4: the address itself; IPv6: the first
    32 bits of its BLAKE2b digest (``server_ids`` rejects a collision in a pool).
    """
    if member.address.version == 4:
        return int(member.address)
    return int.from_bytes(hashlib.blake2b(member.address.packed, digest_size=4).digest(), "big")


def server_ids(sel: Selector, source: str) -> dict[str, int]:
    """member address -> server_id; IntentError on a collision."""
    ids: dict[int, str] = {}
    for member in sel.members:
        ident = server_id(member)
        other = ids.setdefault(ident, str(member.address))
        if other != str(member.address):
            raise IntentError(
                [
                    Problem(
                        source,
                        sel.pool.pointer,
                        f"kdsr names IPv6 servers by a 32-bit digest of their address, and {other} and "
                        f"{member.address} share one ({ident:#010x}).",
                        "Give one of them another address.",
                    )
                ]
            )
    return {address: ident for ident, address in ids.items()}
