// SPDX-License-Identifier: GPL-2.0
/*
 * XDP_REDIRECT of every frame to the one device in slot 0 of its devmap:
 * bench/fast_path.py's sender stage.  The sender's socket buffers arrive on
 * the veth this runs on (on the sender's CPU), veth copies each into a
 * page-pool page with full headroom (they have less than XDP_PACKET_HEADROOM)
 * and this program redirects the copy into the veth facing the row's first
 * hop, whose ndo_xdp_xmit hands it over as an XDP frame: the first hop gets
 * what a NIC in native XDP mode delivers, and the copy is the sender's cost.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tx SEC(".maps");

SEC("xdp")
int xdp_redirect_tx(struct xdp_md *ctx)
{
	return bpf_redirect_map(&tx, 0, XDP_DROP);
}

char _license[] SEC("license") = "GPL";
