// SPDX-License-Identifier: GPL-2.0
/*
 * The fast-path bench's sender stage (bench/fast_path.py --host, loaded by
 * bench/xdp_fanout_load.c): the sender's socket buffers arrive on the veth
 * this runs on, on the sender's CPU; veth copies each into a page-pool page
 * with full headroom (they have less than XDP_PACKET_HEADROOM), and
 * xdp_fanout broadcasts it to every slot of its devmap, each holding the
 * veth that faces the row's first hop: FANOUT frames per socket buffer,
 * handed over by veth's ndo_xdp_xmit as XDP frames, the way a NIC in native
 * XDP mode delivers (no socket buffer, no copy on the path's CPU).  One
 * socket buffer costs the sender far more than a frame's clone, so the
 * fan-out is what lets one CPU send faster than a balancer forwards.
 *
 * xdp_flow runs in each slot on each frame before it is sent and writes its
 * UDP source port: one step per frame over [sport_min, sport_min + flows),
 * as pktgen's does, so consecutive frames are different flows.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define FANOUT_MAX 64
#define SPORT_OFF 34 /* Ethernet + IPv4 (ihl 5) */

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, FANOUT_MAX);
	__type(key, __u32);
	__type(value, struct bpf_devmap_val);
} tx SEC(".maps");

/* Set by the loader before load (its only .rodata variable; the loader
 * declares the same struct). */
struct fanout_cfg {
	__u16 sport_min; /* host order */
	__u16 flows;
};
const volatile struct fanout_cfg cfg = {.sport_min = 1024, .flows = 1};

/* One CPU runs the stage (the sender's): a plain global is enough. */
__u32 next_flow;

SEC("xdp")
int xdp_fanout(struct xdp_md *ctx)
{
	return bpf_redirect_map(&tx, 0, BPF_F_BROADCAST);
}

SEC("xdp/devmap")
int xdp_flow(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 *sport = data + SPORT_OFF;

	if ((void *)(sport + 1) > end)
		return XDP_DROP;
	__u32 n = next_flow;
	*sport = bpf_htons((__u16)(cfg.sport_min + n));
	next_flow = n + 1 >= cfg.flows ? 0 : n + 1;
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
