"""Turn a veth's transmit checksum offload off (``ethtool -K IF tx off``, without ethtool).

A veth sends TCP/UDP with the checksum left to "hardware" (CHECKSUM_PARTIAL)
and the receiving skb carries that promise; an XDP program on the peer that
sends the frame on with XDP_TX turns it into a bare frame and the promise is
lost, so the server receives a wrong checksum and drops it.  A real NIC
delivers finished checksums: this is a lab artefact, for the client's veth.
Usage: python txcsum.py IFNAME (run inside the namespace).
"""

import fcntl
import socket
import struct
import sys

SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x00000017


def tx_checksum_off(ifname: str) -> None:
    value = struct.pack("II", ETHTOOL_STXCSUM, 0)
    buf = bytearray(value)
    import ctypes

    holder = ctypes.create_string_buffer(bytes(buf), len(buf))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(holder))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


if __name__ == "__main__":
    tx_checksum_off(sys.argv[1])
