"""The GETGEN request and answer (kdsr/kernel/nft_generation.py), byte by byte."""

from __future__ import annotations

import struct

from kdsr.kernel import nft_generation as gen


def answer(gen_id: int, extra_first: bool = False) -> bytes:
    attrs = b""
    if extra_first:  # NFTA_GEN_PROC_PID (2), u32, before the id
        attrs += struct.pack("=HH", 8, 2) + struct.pack(">I", 4242)
    attrs += struct.pack("=HH", 8, gen.NFTA_GEN_ID) + struct.pack(">I", gen_id)
    body = struct.pack("=BBH", 0, 0, 0) + attrs
    kind = (gen.NFNL_SUBSYS_NFTABLES << 8) | 15  # NFT_MSG_NEWGEN
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 7, 0) + body


def test_request_is_one_getgen_message():
    data = gen.request(7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert length == len(data) == 20 and kind == (10 << 8) | 16 and flags == 1 and seq == 7


def test_the_generation_is_read_big_endian_wherever_the_attribute_is():
    assert gen.parse_reply(answer(0x01020304)) == 0x01020304
    assert gen.parse_reply(answer(5, extra_first=True)) == 5


def test_errors_and_short_answers_give_none():
    error = struct.pack("=IHHII", 36, gen.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -1) + b"\0" * 16
    assert gen.parse_reply(error) is None
    assert gen.parse_reply(b"\0" * 10) is None
    assert gen.parse_reply(answer(9)[:-8]) is None  # the attribute cut off
