"""The fake kernel given an nftables ruleset generation, for tests of what
kdsr decides from it (the receipt, `kdsr run`'s drift check)."""

from __future__ import annotations

from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.fake.nft import FakeNftables


class GenerationNftables(FakeNftables):
    """The nftables fake with a ruleset generation: every transaction moves
    it, as does a hand edit; reads remember the generation they saw."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.generation = 1
        self.read_at: dict[tuple[str, str], int] = {}
        self.table_reads = 0

    def read_table(self, family, name, reuse=False):
        self.read_at[(family, name)] = self.generation
        self.table_reads += 1
        return super().read_table(family, name, reuse)

    def apply(self, commands, check_only=False, becomes=None):
        proved = super().apply(commands, check_only, becomes)
        if not check_only and commands:
            self.generation += 1
        return proved

    def token(self, family, name):
        return f"gen {self.generation}", self.read_at.get((family, name)) == self.generation


class GenerationKernel(FakeKernel):
    """The fake kernel with GenerationNftables."""

    def __init__(self) -> None:
        super().__init__()
        self.nft = GenerationNftables(self.log, self.links.link_exists)

    @property
    def table_reads(self) -> int:
        return self.nft.table_reads

    def hand_edit(self) -> None:
        """A commit by someone else (`nft` by hand, another table): the generation moves."""
        self.nft.generation += 1

    def delete_element(self, family: str, table: str, nmap: str, key=None):
        """`nft delete element` by hand: the map's first element (or ``key``); returns the key."""
        elements = self.nft.tables[(family, table)].maps[nmap][1]
        key = next(iter(sorted(elements))) if key is None else key
        del elements[key]
        self.hand_edit()
        return key
