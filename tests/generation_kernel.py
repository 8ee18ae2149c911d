"""The fake kernel given an nftables ruleset generation, for tests of what
kdsr decides from it (the receipt, `kdsr run`'s drift check)."""

from __future__ import annotations

from kdsr.kernel.fake import FakeKernel


class GenerationKernel(FakeKernel):
    """The fake with a ruleset generation: every transaction moves it, as does
    a hand edit (``hand_edit``); reads remember the generation they saw."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 1
        self.read_at: dict[tuple[str, str], int] = {}
        self.table_reads = 0

    def nft_read_table(self, family, name, reuse=False):
        self.read_at[(family, name)] = self.generation
        self.table_reads += 1
        return super().nft_read_table(family, name, reuse)

    def nft_apply(self, commands, check_only=False, becomes=None):
        proved = super().nft_apply(commands, check_only, becomes)
        if not check_only and commands:
            self.generation += 1
        return proved

    def nft_token(self, family, name):
        return f"gen {self.generation}", self.read_at.get((family, name)) == self.generation

    def hand_edit(self) -> None:
        self.generation += 1

    def delete_element(self, family: str, table: str, nmap: str, key=None):
        """`nft delete element` by hand: the map's first element (or ``key``); returns the key."""
        elements = self.tables[(family, table)].maps[nmap][1]
        key = next(iter(sorted(elements))) if key is None else key
        del elements[key]
        self.hand_edit()
        return key
