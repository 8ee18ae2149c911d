"""The intent front end: parse, schema, verify, model.  No root, no kernel."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import jsonschema
import pytest

from kdsr.errors import EXIT_INVALID_INTENT, IntentError, Problem, UsageError
from kdsr.intent import Intent, load_intent, parse_intent
from kdsr.intent.load import SCHEMA_ID, schema
from kdsr.intent.model import DEFAULT_HASH_SEED, DSR_MODES, ENGINE_IPVS, ENGINE_NFT, ENGINE_XDP, HASH_FIELDS, PortRange
from kdsr.intent.primes import is_prime, next_prime
from kdsr.intent.reload import same_json
from kdsr.intent.verify import verify

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "l2-web.json"
SOURCE = "examples/x.json"

# The example, written the way a YAML user would (anchors, unquoted strings).
EXAMPLE_YAML = """\
$schema: https://kdsr.dev/schemas/intent-v1.json
version: 1
services:
  web:
    vip: 10.10.0.100
    ports: [80, 443]
    protocols: tcp
    pool: web
    dsr: {mode: l2, engine: nft}
    hashing: {fields: source-ip-port}
  dns: {vip: 10.10.0.100, ports: 53, protocols: both, pool: web}
  media: {vip: 10.10.0.101, ports: 5000-5010, protocols: udp, pool: web}
  web6:
    vip: "fd00:10::100"
    ports: [80]
    protocols: [tcp, udp]
    pool: web6
pools:
  web:
    servers:
      - node: s1
      - node: s2
      - {node: s3, weight: 1}
  web6:
    servers:
      - {node: s1, address: "fd00:10::11"}
      - {node: s2, address: "fd00:10::12"}
      - {node: s3, address: "fd00:10::13"}
load_balancers:
  lb1: {interface: eth0, addresses: [10.10.0.2/24, "fd00:10::2/64"]}
servers:
  s1: &server {interface: eth0, addresses: [10.10.0.11/24, "fd00:10::11/64"]}
  s2: {<<: *server, addresses: [10.10.0.12/24, "fd00:10::12/64"]}
  s3: {<<: *server, addresses: [10.10.0.13/24, "fd00:10::13/64"]}
"""


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def problems_of(doc: dict | str, source: str = SOURCE) -> list[Problem]:
    """The problems parse_intent reports for a document (dict or text)."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(IntentError) as caught:
        parse_intent(text, source)
    assert caught.value.exit_code == EXIT_INVALID_INTENT
    assert caught.value.problems, "IntentError without problems"
    return caught.value.problems


def only_problem(doc: dict | str, source: str = SOURCE) -> Problem:
    problems = problems_of(doc, source)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def changed(**edits) -> dict:
    """The example with edits applied: {"services/web/ports/0": 70000}; None deletes."""
    doc = example()
    for path, value in edits.items():
        *parents, last = path.split("__")
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        key = int(last) if isinstance(target, list) else last
        if value is None:
            del target[key]
        elif isinstance(target, list) and key == len(target):
            target.append(value)
        else:
            target[key] = value
    return doc


# --- loading good intents -----------------------------------------------------


def test_example_loads():
    intent = load_intent(EXAMPLE)
    assert isinstance(intent, Intent)
    assert intent.source == str(EXAMPLE)
    assert [s.name for s in intent.services] == ["dns", "media", "web", "web6"]
    assert [p.name for p in intent.pools] == ["web", "web6"]
    assert [n.name for n in intent.load_balancers] == ["lb1"]
    assert [n.name for n in intent.servers] == ["s1", "s2", "s3"]

    web = next(s for s in intent.services if s.name == "web")
    assert web.vip == ipaddress.ip_address("10.10.0.100")
    assert web.ports == (PortRange(80, 80), PortRange(443, 443))
    assert [p.pointer for p in web.ports] == ["/services/web/ports/0", "/services/web/ports/1"]
    assert web.protocols == ("tcp",)
    assert (web.mode, web.engine) == ("l2", "nft")
    assert web.hashing.fields == "source-ip-port"
    assert web.hashing.seed == DEFAULT_HASH_SEED
    assert web.hashing.table_size is None
    assert web.pointer == "/services/web"
    assert web.hashing.pointer == "/services/web/hashing"

    dns = next(s for s in intent.services if s.name == "dns")
    assert dns.protocols == ("tcp", "udp")
    assert dns.ports[0].pointer == "/services/dns/ports"
    media = next(s for s in intent.services if s.name == "media")
    assert media.ports == (PortRange(5000, 5010),)

    # Members resolve to the node's first address unless one is given.
    pool = intent.pool("web")
    assert [str(m.address) for m in pool.members] == ["10.10.0.11", "10.10.0.12", "10.10.0.13"]
    assert [m.pointer for m in pool.members][0] == "/pools/web/servers/0"
    assert all(m.weight == 1 and m.mac is None for m in pool.members)
    assert [str(m.address) for m in intent.pool("web6").members][0] == "fd00:10::11"

    lb1 = intent.load_balancer("lb1")
    assert lb1.addresses == (ipaddress.ip_interface("10.10.0.2/24"), ipaddress.ip_interface("fd00:10::2/64"))
    assert lb1.pointer == "/load_balancers/lb1"
    assert intent.server("s1").pointer == "/servers/s1"


def test_yaml_equivalent_loads_to_an_equal_intent():
    from_json = load_intent(EXAMPLE)
    from_yaml = parse_intent(EXAMPLE_YAML, "examples/l2-web.yaml")
    assert from_yaml.services == from_json.services
    assert from_yaml.pools == from_json.pools
    assert from_yaml.load_balancers == from_json.load_balancers
    assert from_yaml.servers == from_json.servers


def test_yaml_file_loads(tmp_path):
    path = tmp_path / "intent.yml"
    path.write_text(EXAMPLE_YAML)
    assert load_intent(path).pools == load_intent(EXAMPLE).pools


def test_ports_are_sorted_and_keep_their_pointers():
    intent = parse_intent(json.dumps(changed(services__web__ports=[443, "8000-8010", 80])), SOURCE)
    web = next(s for s in intent.services if s.name == "web")
    assert [(str(p), p.pointer) for p in web.ports] == [
        ("80", "/services/web/ports/2"),
        ("443", "/services/web/ports/0"),
        ("8000-8010", "/services/web/ports/1"),
    ]


def test_defaults_and_normalisation():
    doc = changed(
        services__web__hashing={"fields": "five-tuple", "seed": 7, "table_size": 251},
        services__web__protocols=["udp", "tcp"],
        servers=None,
        pools__web__servers=[
            {"address": "10.10.0.11", "mac": "AA:BB:CC:DD:EE:01", "weight": 0},
            {"address": "10.10.0.12", "mac": "aa:bb:cc:dd:ee:02", "weight": 0},
        ],
        pools__web6__servers=[{"address": "fd00:10::11"}],
    )
    intent = parse_intent(json.dumps(doc), SOURCE)
    web = next(s for s in intent.services if s.name == "web")
    assert web.protocols == ("tcp", "udp")
    assert (web.hashing.fields, web.hashing.seed, web.hashing.table_size) == ("five-tuple", 7, 251)
    assert intent.servers == ()
    members = intent.pool("web").members
    assert [m.mac for m in members] == ["aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"]
    assert [m.node for m in members] == [None, None]


def test_integral_floats_are_integers():
    # JSON Schema counts 80.0 as an integer; the model must not hold floats.
    doc = changed(services__web__ports=[80.0], pools__web__servers__0__weight=2.0)
    intent = parse_intent(json.dumps(doc), SOURCE)
    web = next(s for s in intent.services if s.name == "web")
    assert type(web.ports[0].first) is int and type(intent.pool("web").members[0].weight) is int


@pytest.mark.parametrize("name", ["l2-web.json", "l2-bgp-ha.json", "l3-gre-ipvs.json", "l3-ip6tnl.json"])
def test_the_json_fast_path_reads_what_the_careful_walk_reads(name):
    from kdsr.intent import load

    text = (EXAMPLE.parent / name).read_text().replace('"version": 1', '"version": 1.0')
    fast, (careful, problems) = load._parse_json_fast(text), load._parse(text, SOURCE, load.JSON)
    assert problems == [] and same_json(fast, careful) and fast["version"] == 1


def test_the_json_fast_path_leaves_duplicate_keys_to_the_careful_walk():
    from kdsr.intent import load

    assert load._parse_json_fast('{"version": 1, "version": 1}') is load._UNREADABLE


def test_a_pool_with_all_weights_zero_is_allowed():
    doc = example()
    for member in doc["pools"]["web"]["servers"]:
        member["weight"] = 0
    intent = parse_intent(json.dumps(doc), SOURCE)
    assert {m.weight for m in intent.pool("web").members} == {0}


# --- reporting ----------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    doc = changed(
        services__web__ports__0=70000,
        pools__web__servers__0__weight=-1,
        load_balancers__lb1__interface="x" * 16,
    )
    problems = problems_of(doc)
    assert [p.pointer for p in problems] == [
        "/services/web/ports/0",
        "/pools/web/servers/0/weight",
        "/load_balancers/lb1/interface",
    ]


def test_all_verify_problems_are_reported_at_once():
    doc = changed(
        services__web__pool="nope",
        services__web__hashing={"table_size": 100},
        pools__web__servers__0__port=8080,
    )
    assert {p.pointer for p in problems_of(doc)} == {
        "/services/web/pool",
        "/services/web/hashing/table_size",
        "/pools/web/servers/0/port",
    }


def test_every_problem_names_the_file_and_the_pointer():
    doc = changed(
        services__web__ports__0=70000,
        services__web__dsr__mode="l4-magic",
        services__web__colour="red",
        pools__web__servers=[],
        servers__s1__interface="..",
    )
    problems = problems_of(doc)
    assert len(problems) == 5
    for problem in problems:
        assert problem.pointer.startswith("/")
        assert str(problem).startswith(f"{SOURCE}: {problem.pointer}: ")


def test_the_style_guide_example():
    problem = only_problem(changed(services__web__ports__0=70000))
    assert str(problem) == "examples/x.json: /services/web/ports/0: 70000 is greater than 65535. " + problem.hint
    assert problem.hint.startswith("Ports are 1-65535")


def test_intent_error_message_has_one_line_per_problem():
    doc = changed(services__web__ports__0=0, pools__web__servers__1__weight=10001)
    with pytest.raises(IntentError) as caught:
        parse_intent(json.dumps(doc), SOURCE)
    assert len(str(caught.value).splitlines()) == 2


# --- parse errors -------------------------------------------------------------


def test_malformed_json_names_line_and_column():
    problem = only_problem('{\n  "version": 1\n  "services": {}\n}', "bad.json")
    assert "line 3, column 3" in problem.message
    assert str(problem).startswith("bad.json: /: invalid JSON")


def test_malformed_yaml_names_line_and_column():
    problem = only_problem("version: 1\nservices: [1\npools: {}\n", "bad.yaml")
    assert "invalid YAML at line 3" in problem.message


def test_duplicate_json_key():
    text = EXAMPLE.read_text().replace('"vip": "10.10.0.100",', '"vip": "10.10.0.100", "vip": "10.10.0.7",', 1)
    problem = only_problem(text)
    assert problem.pointer == "/services/web/vip"
    assert "twice" in problem.message


def test_duplicate_yaml_key_names_the_line():
    text = EXAMPLE_YAML.replace("    pool: web6\n", "    pool: web6\n    pool: web6\n")
    problem = only_problem(text, "x.yaml")
    assert problem.pointer == "/services/web6/pool"
    assert "(line 18)" in problem.message


def test_yaml_merge_keys_may_override_without_being_duplicates():
    # s2 overrides the merged "addresses": that is YAML merge, not a duplicate.
    assert parse_intent(EXAMPLE_YAML, "x.yaml").server("s2").addresses[0] == ipaddress.ip_interface("10.10.0.12/24")


def test_yaml_non_text_key():
    text = EXAMPLE_YAML.replace("  dns:", "  on:")
    problems = problems_of(text, "x.yaml")
    assert problems[0].pointer == "/services/True"
    assert "not text" in problems[0].message


def test_yaml_unquoted_number_for_a_string_gets_a_quoting_hint():
    problem = only_problem(EXAMPLE_YAML.replace("pool: web6", "pool: 6"), "x.yaml")
    assert problem.pointer == "/services/web6/pool"
    assert "quotes" in problem.hint


def test_empty_yaml_file():
    assert "empty" in only_problem("# nothing yet\n", "x.yaml").message


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as caught:
        load_intent(tmp_path / "missing.json")
    assert f"{tmp_path / 'missing.json'}: no such file" in str(caught.value)


def test_an_unreadable_file(tmp_path):
    with pytest.raises(IntentError) as caught:
        load_intent(tmp_path)  # a directory
    assert "is a directory" in caught.value.problems[0].message


def test_format_is_guessed_without_a_known_suffix():
    assert parse_intent(EXAMPLE.read_text(), "<stdin>").pools == load_intent(EXAMPLE).pools
    assert parse_intent(EXAMPLE_YAML, "<stdin>").pools == load_intent(EXAMPLE).pools


# --- schema errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "pointer", "text"),
    [
        ({"services__web__ports__0": 70000}, "/services/web/ports/0", "70000 is greater than 65535"),
        ({"services__web__ports__0": 0}, "/services/web/ports/0", "0 is less than 1"),
        ({"services__dns__ports": 65536}, "/services/dns/ports", "65536 is greater than 65535"),
        ({"services__web__ports": []}, "/services/web/ports", "empty"),
        ({"services__web__ports__0": "80"}, "/services/web/ports/0", "as a number (80)"),
        ({"services__web__ports__0": "http"}, "/services/web/ports/0", "not a port range"),
        ({"pools__web__servers__0__weight": -1}, "/pools/web/servers/0/weight", "-1 is less than 0"),
        ({"pools__web__servers__0__weight": 10001}, "/pools/web/servers/0/weight", "greater than 10000"),
        ({"services__web__protocols": "sctp"}, "/services/web/protocols", '"tcp", "udp", "both"'),
        ({"services__web__protocols": ["tcp", "both"]}, "/services/web/protocols/1", '"tcp", "udp"'),
        ({"services__web__protocols": []}, "/services/web/protocols", "empty"),
        ({"services__web__hashing__fields": "dst"}, "/services/web/hashing/fields", '"five-tuple"'),
        ({"services__web__hashing__seed": 2**32}, "/services/web/hashing/seed", "greater than 4294967295"),
        ({"services__web__hashing__table_size": 5}, "/services/web/hashing/table_size", "less than 7"),
        ({"version": 2}, "/version", "2 is not supported"),
        ({"services__web__vip": 5}, "/services/web/vip", "5 is an integer, expected a string"),
        ({"pools__web__servers__0": {"weight": 1}}, "/pools/web/servers/0", "needs 'node' or 'address'"),
        ({"pools__web__servers__0__mac": "aa-bb-cc-dd-ee-ff"}, "/pools/web/servers/0/mac", "not a MAC address"),
        ({"load_balancers": {}}, "/load_balancers", "no load balancers"),
        ({"services": {}}, "/services", "no services"),
    ],
)
def test_schema_errors(edits, pointer, text):
    problem = only_problem(changed(**edits))
    assert problem.pointer == pointer
    assert text in str(problem)
    assert problem.hint, "every problem says how to fix it"


def test_enum_errors_list_supported_values():
    mode = only_problem(changed(services__web__dsr__mode="l3-vxlan"))
    assert mode.pointer == "/services/web/dsr/mode"
    assert 'Supported values: "l2", "l3-ipip", "l3-gre", "l3-ip6tnl"' in mode.message
    assert "l3-ip6tnl" in mode.hint
    engine = only_problem(changed(services__web__dsr__engine="ebpf"))
    assert 'Supported values: "nft", "ipvs", "xdp"' in engine.message


def test_unknown_field_names_it_and_lists_the_allowed_ones():
    problem = only_problem(changed(services__web__prot="tcp"))
    assert problem.pointer == "/services/web/prot"
    assert 'unknown field "prot"' in problem.message
    assert 'Did you mean "ports"?' in problem.hint
    assert "Allowed fields: vip, ports, protocols, pool, dsr, hashing, health, announce." in problem.hint


def test_unknown_top_level_field():
    assert only_problem(changed(health={})).pointer == "/health"


def test_missing_required_field():
    problem = only_problem(changed(services__web__vip=None))
    assert problem.pointer == "/services/web"
    assert 'missing required field "vip"' in problem.message


def test_bad_name_says_the_rule():
    doc = example()
    doc["services"]["Web_1"] = doc["services"].pop("web")
    problem = only_problem(doc)
    assert problem.pointer == "/services/Web_1"
    assert "lower-case" in problem.hint and "22" in problem.hint


def test_name_too_long():
    doc = example()
    doc["pools"]["p" * 24] = doc["pools"]["web6"]
    assert only_problem(doc).pointer == "/pools/" + "p" * 24


def test_pool_with_no_servers():
    problem = only_problem(changed(pools__web__servers=[]))
    assert problem.pointer == "/pools/web/servers"
    assert "a pool with no servers" in problem.message


@pytest.mark.parametrize(
    ("interface", "text"),
    [
        ("averyveryverylongname", "21 bytes long"),
        ("..", "not a usable name"),
        (".", "not a usable name"),
        ("eth/0", "not allowed in an interface name"),
        ("", "empty"),
    ],
)
def test_interface_names(interface, text):
    problem = only_problem(changed(load_balancers__lb1__interface=interface))
    assert problem.pointer == "/load_balancers/lb1/interface"
    assert text in problem.message
    assert "15 bytes (IFNAMSIZ)" in problem.hint


def test_interface_of_fifteen_bytes_is_fine():
    parse_intent(json.dumps(changed(servers__s1__interface="a" * 15)), SOURCE)


@pytest.mark.parametrize(
    ("edits", "pointer", "text"),
    [
        ({"services__web__vip": "10.10.0.300"}, "/services/web/vip", "not an IPv4 or IPv6 address"),
        ({"services__web__vip": "10.10.0.100/32"}, "/services/web/vip", "prefix length"),
        ({"pools__web__servers__3": {"address": "fd00::zz"}}, "/pools/web/servers/3/address", "not an IPv4 or IPv6"),
        ({"load_balancers__lb1__addresses__0": "10.10.0.2"}, "/load_balancers/lb1/addresses/0", "no prefix length"),
        ({"servers__s1__addresses__1": "fd00:10::11/129"}, "/servers/s1/addresses/1", "with prefix length"),
    ],
)
def test_invalid_addresses(edits, pointer, text):
    # The schema checks them with ipaddress too, so they come with
    # every other schema error.
    problem = only_problem(changed(**edits))
    assert problem.pointer == pointer
    assert text in problem.message


def test_schema_and_address_errors_together():
    doc = changed(services__web__vip="10.0.0.300", services__web__ports__0=0)
    assert [p.pointer for p in problems_of(doc)] == ["/services/web/vip", "/services/web/ports/0"]


# --- semantic rules (verify) --------------------------------------------------


def test_duplicate_vip_port_protocol_across_services():
    problem = only_problem(
        changed(services__media__vip="10.10.0.100", services__media__ports=[443], services__media__protocols="tcp")
    )
    assert problem.pointer == "/services/media/ports/0"
    assert "service web" in problem.message and "/services/web/ports/1" in problem.message


def test_overlapping_port_ranges_count():
    doc = changed(services__media__vip="10.10.0.100", services__media__protocols="both", services__media__ports="40-60")
    problem = only_problem(doc)
    assert problem.pointer == "/services/media/ports"
    assert "10.10.0.100 tcp/udp ports 40-60 overlap port 53 of service dns" in problem.message


def test_same_port_on_other_protocol_or_vip_is_fine():
    parse_intent(json.dumps(changed(services__media__vip="10.10.0.100", services__media__ports=80)), SOURCE)


def test_duplicate_port_within_a_service():
    problem = only_problem(changed(services__web__ports=[80, "70-90"]))
    assert problem.pointer == "/services/web/ports/1"
    assert "this service" in problem.message


@pytest.mark.parametrize(
    ("vip", "owner"),
    [("10.10.0.11", "server s1"), ("10.10.0.2", "load balancer lb1"), ("10.10.0.50", "pool web member 3")],
)
def test_vip_is_someone_elses_address(vip, owner):
    doc = changed(services__media__vip=vip, pools__web__servers__3={"address": "10.10.0.50"})
    problem = only_problem(doc)
    assert problem.pointer == "/services/media/vip"
    assert owner in problem.message


def test_mixed_address_family():
    problem = only_problem(changed(services__web6__pool="web"))
    assert problem.pointer == "/services/web6/pool"
    assert "IPv6 VIP" in problem.message and "IPv4 members" in problem.message


def test_unknown_pool():
    problem = only_problem(changed(services__web__pool="wbe"))
    assert problem.pointer == "/services/web/pool"
    assert 'unknown pool "wbe"' in problem.message
    assert 'Did you mean "web"?' in problem.hint


def test_unknown_server_node():
    problem = only_problem(changed(pools__web__servers__0__node="s9"))
    assert problem.pointer == "/pools/web/servers/0/node"
    assert "s1, s2, s3" in problem.hint


def test_member_naming_a_load_balancer():
    assert "is a load balancer" in only_problem(changed(pools__web__servers__0__node="lb1")).message


def test_member_address_must_belong_to_its_node():
    problem = only_problem(changed(pools__web6__servers__0__address="fd00:10::99"))
    assert problem.pointer == "/pools/web6/servers/0/address"
    assert "not an address of server s1" in problem.message


def test_l2_server_off_the_load_balancer_segment():
    doc = changed(
        servers__s4={"interface": "eth0", "addresses": ["10.9.0.5/24"]}, pools__web__servers__3={"node": "s4"}
    )
    problem = only_problem(doc)
    assert problem.pointer == "/pools/web/servers/3/node"
    assert str(problem) == (
        "examples/x.json: /pools/web/servers/3/node: server 10.9.0.5 is not on a subnet connected to "
        "load balancer lb1 (10.10.0.0/24, fd00:10::/64). L2 DSR needs servers on the LB's segment; "
        'use a server on that segment or an L3 mode ("l3-ipip", "l3-gre" or "l3-ip6tnl") for servers behind '
        "routers."
    )


def test_l2_server_must_reach_every_load_balancer():
    doc = changed(load_balancers__lb2={"interface": "eth1", "addresses": ["10.20.0.2/24", "fd00:10::3/64"]})
    problems = problems_of(doc)
    # Every IPv4 member of pool web is off lb2's segment; the IPv6 ones are on it.
    assert [p.pointer for p in problems] == [f"/pools/web/servers/{i}/node" for i in range(3)]
    assert all("load balancer lb2" in p.message for p in problems)


def test_mac_pinned_on_some_members_only():
    problem = only_problem(changed(pools__web__servers__0__mac="AA:BB:CC:DD:EE:FF"))
    assert problem.pointer == "/pools/web/servers"
    assert "member 0 pins" in problem.message and "members 1, 2 do not" in problem.message


def test_multicast_mac():
    doc = changed(pools__web6__servers=[{"address": "fd00:10::11", "mac": "01:00:5e:00:00:01"}])
    assert only_problem(doc).pointer == "/pools/web6/servers/0/mac"


def test_duplicate_member_address():
    problem = only_problem(changed(pools__web__servers__3={"address": "10.10.0.11"}))
    assert problem.pointer == "/pools/web/servers/3/address"
    assert "/pools/web/servers/0" in problem.message


def test_table_size_must_be_prime():
    problem = only_problem(changed(services__web__hashing__table_size=100))
    assert problem.pointer == "/services/web/hashing/table_size"
    assert "try 101" in problem.hint


def test_prime_table_size_is_fine():
    intent = parse_intent(json.dumps(changed(services__web__hashing__table_size=65537)), SOURCE)
    assert next(s for s in intent.services if s.name == "web").hashing.table_size == 65537


def test_node_both_load_balancer_and_server():
    problem = only_problem(changed(servers__lb1={"interface": "eth0", "addresses": ["10.10.0.50/24"]}))
    assert problem.pointer == "/servers/lb1"


def test_member_port_is_rejected_with_the_reason():
    problem = only_problem(changed(pools__web__servers__0__port=8080))
    assert problem.pointer == "/pools/web/servers/0/port"
    assert "DSR forwards packets unchanged" in problem.hint and "remove this field" in problem.hint


def test_backwards_port_range():
    problem = only_problem(changed(services__media__ports="5010-5000"))
    assert problem.pointer == "/services/media/ports"
    assert "5000-5010" in problem.message


def test_port_range_out_of_bounds():
    assert "70000" in only_problem(changed(services__media__ports=["5000-70000"])).message


def test_address_shared_by_two_nodes():
    problems = problems_of(changed(servers__s3__addresses__1="fd00:10::12/64"))
    assert "/servers/s3/addresses/1" in [p.pointer for p in problems]


def test_verify_directly_returns_problems():
    doc = changed(services__web__pool="nope")
    assert [p.pointer for p in verify(doc, "a.json")] == ["/services/web/pool"]
    assert verify(example(), "a.json") == []


# --- the schema file ----------------------------------------------------------


def test_schema_copies_are_identical():
    canonical = ROOT / "kdsr" / "data" / "intent.schema.json"
    assert (ROOT / "schemas" / "intent.schema.json").read_bytes() == canonical.read_bytes()


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["$id"] == SCHEMA_ID == "https://kdsr.dev/schemas/intent-v1.json"
    assert example()["$schema"] == SCHEMA_ID


def _object_schemas(node: object, where: str = ""):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield where, node
        for key, value in node.items():
            yield from _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _object_schemas(value, f"{where}/{i}")


def test_schema_closes_every_object_and_describes_every_property():
    for where, node in _object_schemas(schema()):
        # A "$ref" node is closed by the definition it refers to (checked on its own).
        assert "additionalProperties" in node or "$ref" in node, f"{where} lets unknown fields through"
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{where}/properties/{name} has no description"


def test_schema_agrees_with_the_code():
    defs = schema()["$defs"]
    dsr = defs["service"]["properties"]["dsr"]["properties"]
    assert tuple(dsr["mode"]["enum"]) == DSR_MODES
    assert tuple(dsr["engine"]["enum"]) == (ENGINE_NFT, ENGINE_IPVS, ENGINE_XDP)
    hashing = defs["service"]["properties"]["hashing"]["properties"]
    assert tuple(hashing["fields"]["enum"]) == HASH_FIELDS
    assert hashing["seed"]["default"] == DEFAULT_HASH_SEED


# --- primes -------------------------------------------------------------------


def test_is_prime():
    assert [n for n in range(-3, 30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and is_prime(999983)
    assert not is_prime(65535) and not is_prime(1_000_000) and not is_prime(25)


def test_next_prime():
    assert [next_prime(n) for n in (-5, 0, 2, 3, 4, 100, 65536, 65537)] == [2, 2, 2, 3, 5, 101, 65537, 65537]
    assert next_prime(999_984) == 1_000_003


def test_table_smaller_than_pool_is_refused():
    doc = json.loads(EXAMPLE.read_text())
    doc["pools"]["web"]["servers"] = [{"address": f"10.10.0.{20 + i}"} for i in range(11)]
    doc["services"]["web"]["hashing"] = {"table_size": 7}
    with pytest.raises(IntentError) as info:
        parse_intent(json.dumps(doc), SOURCE)
    (problem,) = info.value.problems
    assert problem.pointer == "/services/web/hashing/table_size"
    assert "smaller than pool 'web'" in problem.message and "1103" in problem.hint


def test_yaml_example_equals_json_example():
    import dataclasses

    from_json = load_intent(EXAMPLE)
    from_yaml = load_intent(EXAMPLE.with_suffix(".yaml"))
    assert dataclasses.replace(from_yaml, source=from_json.source) == from_json
