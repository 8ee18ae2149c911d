"""kernel/nft_cache.py: the on-disk table record and when it may be used."""

from kdsr.compile import compile_node
from kdsr.intent import load_intent
from kdsr.kernel import nft_cache
from kdsr.kernel.nft_cache import TableCache, decode_table, encode_table_text
from kdsr.model import NftElement, NftMap, NftTable


def test_round_trip_of_a_compiled_table_is_exact(example_path):
    for table in compile_node(load_intent(example_path), "lb1").tables:
        assert decode_table(encode_table_text(table))[0] == table
        again = decode_table(encode_table_text(table))[0]
        assert [m.elements for m in again.maps] == [m.elements for m in table.maps]


def test_concatenated_and_range_keys_come_back_as_tuples():
    nmap = NftMap(
        name="services-v4",
        key_type=("ipv4_addr", "inet_proto", "inet_service"),
        data_type="verdict",
        flags=("interval",),
        elements=(
            (("10.0.0.1", "tcp", (80, 80)), NftElement(value=("jump", "pool-a"), comment="/services/a/ports/0")),
            (("10.0.0.1", "udp", (5000, 5010)), NftElement(value=("jump", "pool-b"))),
        ),
    )
    table = NftTable(family="netdev", name="kdsr", chains=(), maps=(nmap,))
    assert decode_table(encode_table_text(table))[0] == table


def _table(value: str = "10.0.0.11") -> NftTable:
    slots = tuple((i, NftElement(value=value)) for i in range(7))
    return NftTable("netdev", "kdsr", (), (NftMap("pool", ("mark",), "ipv4_addr", elements=slots),))


def test_a_record_is_used_only_at_its_generation_and_chain_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    cache = TableCache(tmp_path)
    cache.save(7, "chains A", _table())
    assert cache.load("netdev", "kdsr", 7, "chains A") == _table()
    assert cache.load("netdev", "kdsr", 8, "chains A") is None  # someone committed since
    assert cache.load("netdev", "kdsr", 7, "chains B") is None  # a hook went with its device
    assert cache.load("inet", "kdsr", 7, "chains A") is None
    (path,) = (tmp_path / "cache").iterdir()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"


def test_another_namespace_boot_or_code_misses(tmp_path, monkeypatch):
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    TableCache(tmp_path).save(7, "c", _table())
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 43)
    assert TableCache(tmp_path).load("netdev", "kdsr", 7, "c") is None
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    monkeypatch.setattr(nft_cache, "boot_id", lambda: "another boot")
    assert TableCache(tmp_path).load("netdev", "kdsr", 7, "c") is None


def test_a_damaged_record_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    cache = TableCache(tmp_path)
    cache.save(7, "c", _table())
    (path,) = (tmp_path / "cache").iterdir()
    path.write_text(path.read_text()[:100])
    assert cache.load("netdev", "kdsr", 7, "c") is None
    cache.forget("netdev", "kdsr")
    assert not path.exists()


def test_without_a_netns_cookie_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: None)
    cache = TableCache(tmp_path)
    cache.save(7, "c", _table())
    assert not (tmp_path / "cache").exists()
    assert cache.load("netdev", "kdsr", 7, "c") is None


def test_a_table_listed_from_the_kernel_is_not_kept_alive_by_its_record(tmp_path, monkeypatch):
    """The record's text caches keep compiled maps (the next compile hands
    them back); a listing's maps are new objects every time: kept, each
    re-listing (after any other program's commit, each metrics scrape)
    would keep a whole table's elements alive, up to 4,096 maps."""
    import gc
    import weakref

    from kdsr.kernel import nft

    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    generation = [1]
    monkeypatch.setattr(nft, "read_generation", lambda: generation[0])
    tables = nft.Nftables(tmp_path)
    monkeypatch.setattr(tables, "_chain_fingerprint", lambda family: "chains")
    monkeypatch.setattr(tables, "_list_table", lambda family, name: (generation[0], _table(f"10.0.0.{generation[0]}")))
    first = tables.read_table("netdev", "kdsr", reuse=True)
    listed = weakref.ref(first.maps[0])
    assert (tmp_path / "cache").exists(), "the listing was recorded"
    generation[0] += 1
    second = tables.read_table("netdev", "kdsr", reuse=True)  # another generation: listed again
    assert second.maps[0].elements[0][1].value != first.maps[0].elements[0][1].value
    del first
    gc.collect()
    assert listed() is None, "the first listing's map is still alive"


def _three_maps(changed: str = "10.0.0.11") -> NftTable:
    def slots(value: str) -> tuple:
        return tuple((i, NftElement(value=value)) for i in range(7))

    maps = tuple(
        NftMap(name, ("mark",), "ipv4_addr", elements=slots(v))
        for name, v in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", changed))
    )
    return NftTable("netdev", "kdsr", (), maps)


def _counting_encodes(monkeypatch) -> list:
    calls = []
    real = nft_cache._encode_elements
    monkeypatch.setattr(nft_cache, "_encode_elements", lambda elements: calls.append(1) or real(elements))
    return calls


def test_a_record_loaded_by_a_new_process_is_not_encoded_again(tmp_path, monkeypatch):
    """A new process (the CLI, a restarted daemon) loads the record, then
    records the table after one change: only the changed map is encoded;
    the others keep their record lines, and the record reads back right."""
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    TableCache(tmp_path).save(7, "c", _three_maps())
    later = TableCache(tmp_path)
    assert later.load("netdev", "kdsr", 7, "c") == _three_maps()
    encodes = _counting_encodes(monkeypatch)
    later.save(8, "c", _three_maps(changed="10.0.0.99"))  # new objects, equal but for map c
    assert len(encodes) == 1
    assert TableCache(tmp_path).load("netdev", "kdsr", 8, "c") == _three_maps(changed="10.0.0.99")


def test_an_adopted_table_is_recorded_without_encoding(tmp_path, monkeypatch):
    """The daemon's first apply after a start found the kernel equal to its
    compiled table and adopted it: recording that table encodes nothing."""
    monkeypatch.setattr(nft_cache, "netns_cookie", lambda: 42)
    TableCache(tmp_path).save(7, "c", _three_maps())
    daemon = TableCache(tmp_path)
    read = daemon.load("netdev", "kdsr", 7, "c")
    compiled = _three_maps()
    daemon.adopt(read, compiled)
    encodes = _counting_encodes(monkeypatch)
    daemon.save(8, "c", compiled)
    assert encodes == []
    assert TableCache(tmp_path).load("netdev", "kdsr", 8, "c") == compiled
