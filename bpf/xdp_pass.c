// SPDX-License-Identifier: GPL-2.0
/*
 * XDP_PASS, nothing else: the lab attaches it to the veth peer of a
 * balancer running kdsr's xdp engine.  A frame a veth's XDP program sends
 * back out (XDP_TX) goes to the peer by veth_xdp_xmit(), which drops it
 * unless the peer runs XDP itself (its NAPI is only set up then); GRO
 * alone does not do on 6.1 and 6.18 (issue 32).  A hardware NIC needs none.
 * bench/fast_path.py's redirect sender also attaches it to every first hop
 * without an XDP program of its own: XDP frames redirected into a veth
 * reach its peer the same way, and XDP_PASS builds the socket buffer there.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
