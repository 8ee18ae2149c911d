// SPDX-License-Identifier: GPL-2.0
/*
 * XDP_DROP, nothing else: bench/fast_path.py's "sink-xdp" row, a first hop
 * that takes every frame off an XDP veth and drops it, so what the sender
 * emits into that kind of hop is the only limit (the sender's ceiling for
 * the xdp rows).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
