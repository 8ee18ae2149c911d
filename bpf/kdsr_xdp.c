// SPDX-License-Identifier: GPL-2.0
/*
 * kdsr's xdp engine, L2 DSR: the packet path of `dsr.engine: "xdp"`.
 *
 * Packet walk (the same decisions as the nft engine's netdev ingress chain,
 * nft/l2-lb.nft):
 *   1. a frame whose destination MAC is not the interface's own goes on
 *      untouched (XDP_PASS), like `meta pkttype != host accept`: a flooded,
 *      mirrored, broadcast or multicast frame is another host's;
 *   2. IPv4 (first fragments only) or IPv6 (TCP/UDP right after the fixed
 *      header) looks up VIP . protocol . destination port in `services`
 *      (single ports), then in `ranges` (the port ranges of that VIP and
 *      protocol); no match: XDP_PASS, the host keeps working;
 *   3. the service names a selector: the Maglev table kdsr compiles for the
 *      nft engine (same seed, fields, size and slot -> server map).  The
 *      slot is nft's: jhash over the same bytes nft's `jhash` expression
 *      hashes (every field in its own 32-bit register, zero padded), then
 *      reciprocal_scale (kernel net/netfilter/nft_hash.c), so an xdp and an
 *      nft balancer send each flow to the same server;
 *   4. the frame gets the server's MAC as destination and the interface's
 *      own as source and leaves where it came in (XDP_TX).  A server without
 *      a MAC in the intent is resolved by bpf_fib_lookup() (the kernel's
 *      neighbour table, as nft's `fwd ip to` does); no neighbour entry yet:
 *      XDP_PASS and a `no_neighbour` count (the stack does not forward it:
 *      the first packets to a server nobody has resolved are lost, which is
 *      why kdsr adds a managed neighbour entry per server).  A route out of
 *      another interface: XDP_REDIRECT there.
 *   A selector whose table is empty (every server drained) drops, as nft's
 *   selector chain does (its slots hold NO_SERVER).
 *
 * Atomic changes: each selector has two slot regions in `slots`; kdsr
 * writes a new table into the inactive region, then flips `active` in the
 * selector (one 4-byte field; the rest of the value is rewritten with the
 * same bytes), so a packet reads the old table or the new one, never a mix.
 * A service moves to another selector by one hash-element update, atomic
 * by RCU.
 *
 * Counters: per server (array, by server index) and per service (LRU hash
 * keyed like `services`), per CPU: packets and bytes; `kdsr show` sums them.
 *
 * Both kernels here must accept it: the host's 6.18 and Debian's 6.1 (its
 * verifier is older: only bounded loops, no kfuncs).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_SERVICES 65536
#define MAX_RANGE_KEYS 4096
#define RANGES_PER_KEY 16
#define MAX_SELECTORS 4096
#define MAX_SERVERS 4096
/* Two regions per selector: twice kdsr's slot budget (262,144 per load
 * balancer, kdsr/compile/selectors.py) plus room for one largest table. */
#define MAX_SLOTS (2 * 262144 + 2 * 65537)

#define HASH_SOURCE_IP 0
#define HASH_SOURCE_IP_PORT 1
#define HASH_FIVE_TUPLE 2

#define SERVER_HAS_MAC 1

/* An address, IPv4 in the first 4 bytes (the rest zero). */
struct svc_key {
	__u8 addr[16];
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* IPPROTO_TCP, IPPROTO_UDP */
	__u16 port;  /* host order; 0 in `ranges` keys */
};

struct svc_value {
	__u32 selector;
};

struct port_range {
	__u16 first; /* host order */
	__u16 last;
	__u32 selector;
};

struct range_value {
	__u32 count;
	struct port_range ranges[RANGES_PER_KEY];
};

struct selector {
	__u32 active; /* 0 or 1: which region packets read */
	__u32 size;   /* slots per region (the Maglev table size); 0: unused */
	__u32 seed;
	__u32 fields; /* HASH_* */
	__u32 base[2];
	char name[64]; /* kdsr/compile/selectors.py's name, read by kdsr only */
};

/* A slot of a table with no server (every member drained): drop, as the
 * nft selector chain does.  The size never changes for a selector (a new
 * size is a new selector), so a flip changes `active` only. */
#define NO_SERVER 0xffffffff

struct server {
	__u8 mac[6];
	__u8 flags;  /* SERVER_HAS_MAC */
	__u8 family;
	__u8 addr[16];
};

struct config {
	__u8 mac[6]; /* the interface's own: frames for other MACs pass */
	__u8 pad[2];
	__u32 ifindex;
	__u8 object[8]; /* the object file's SHA-256, first 8 bytes: kdsr spots a program older than its object */
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU event counts, by index. */
#define EV_PASS 0
#define EV_NOT_FOR_HOST 1
#define EV_NO_SERVER 2
#define EV_NO_NEIGHBOUR 3
#define EV_REDIRECT 4
#define EV_MAX 8

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_RANGE_KEYS);
	__type(key, struct svc_key);
	__type(value, struct range_value);
} ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SELECTORS);
	__type(key, __u32);
	__type(value, struct selector);
} selectors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32); /* server index */
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVERS);
	__type(key, __u32);
	__type(value, struct server);
} servers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVERS);
	__type(key, __u32);
	__type(value, struct counter);
} server_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct counter);
} service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EV_MAX);
	__type(key, __u32);
	__type(value, __u64);
} events SEC(".maps");

/* The kernel's jhash (include/linux/jhash.h), on 32-bit words. */
#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define __jhash_mix(a, b, c)                \
	{                                   \
		a -= c; a ^= rol32(c, 4);  c += b; \
		b -= a; b ^= rol32(a, 6);  a += c; \
		c -= b; c ^= rol32(b, 8);  b += a; \
		a -= c; a ^= rol32(c, 16); c += b; \
		b -= a; b ^= rol32(a, 19); a += c; \
		c -= b; c ^= rol32(b, 4);  b += a; \
	}

#define __jhash_final(a, b, c)              \
	{                                   \
		c ^= b; c -= rol32(b, 14); \
		a ^= c; a -= rol32(c, 11); \
		b ^= a; b -= rol32(a, 25); \
		c ^= b; c -= rol32(b, 16); \
		a ^= c; a -= rol32(c, 4);  \
		b ^= a; b -= rol32(a, 14); \
		c ^= b; c -= rol32(b, 24); \
	}

#define MAX_WORDS 11 /* five-tuple over IPv6: 4 + 4 + 1 + 1 + 1 */

/* jhash(key, 4 * n, seed) of the kernel, whose byte loads on a
 * little-endian CPU read each 4 bytes as one u32: the words here are the
 * packet's bytes loaded the same way.  n is 1..MAX_WORDS. */
static __always_inline __u32 jhash_words(const __u32 *k, __u32 n, __u32 seed)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (n << 2) + seed;
	for (int i = 0; i < 3; i++) { /* at most 3 full rounds of 3 words before the tail */
		if (n <= 3)
			break;
		a += k[0];
		b += k[1];
		c += k[2];
		__jhash_mix(a, b, c);
		n -= 3;
		k += 3;
	}
	switch (n) {
	case 3:
		c += k[2];
		/* fall through */
	case 2:
		b += k[1];
		/* fall through */
	case 1:
		a += k[0];
		__jhash_final(a, b, c);
		break;
	}
	return c;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

static __always_inline void count_event(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&events, &which);

	if (n)
		*n += 1;
}

static __always_inline void count(struct counter *c, __u64 bytes)
{
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline void count_service(struct svc_key *key, __u64 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&service_stats, key);

	if (!c) {
		struct counter zero = {};

		bpf_map_update_elem(&service_stats, key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&service_stats, key);
	}
	count(c, bytes);
}

struct flow {
	__u32 words[MAX_WORDS];
	__u32 n;
};

/* nft's registers for `jhash <fields>`: an IPv4 address one word, IPv6
 * four, l4proto one (nft_reg_store8 zeroes the rest of the register), a
 * port one (nft_payload zeroes the register's last word before a 2-byte
 * load: the port's two bytes, then two zero bytes). */
static __always_inline void flow_words(struct flow *f, __u32 fields, int v6, const __u32 *saddr, const __u32 *daddr,
				       __u8 proto, __u16 sport_raw, __u16 dport_raw)
{
	__u32 n = 0;

	f->words[n++] = saddr[0];
	if (v6) {
		f->words[n++] = saddr[1];
		f->words[n++] = saddr[2];
		f->words[n++] = saddr[3];
	}
	if (fields == HASH_FIVE_TUPLE) {
		f->words[n++] = daddr[0];
		if (v6) {
			f->words[n++] = daddr[1];
			f->words[n++] = daddr[2];
			f->words[n++] = daddr[3];
		}
		f->words[n++] = proto;
	}
	if (fields != HASH_SOURCE_IP)
		f->words[n++] = sport_raw;
	if (fields == HASH_FIVE_TUPLE)
		f->words[n++] = dport_raw;
	f->n = n;
}

static __always_inline int lookup_service(struct svc_key *key, __u16 port, __u32 *selector)
{
	struct svc_value *v;
	struct range_value *r;

	key->port = port;
	v = bpf_map_lookup_elem(&services, key);
	if (v) {
		*selector = v->selector;
		return 1;
	}
	key->port = 0;
	r = bpf_map_lookup_elem(&ranges, key);
	if (!r)
		return 0;
#pragma unroll
	for (int i = 0; i < RANGES_PER_KEY; i++) {
		if (i >= r->count)
			break;
		if (port >= r->ranges[i].first && port <= r->ranges[i].last) {
			key->port = r->ranges[i].first; /* the service's counter key */
			*selector = r->ranges[i].selector;
			return 1;
		}
	}
	return 0;
}

SEC("xdp")
int kdsr_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct svc_key key = {};
	struct flow f = {};
	__u32 zero = 0, sel_id, slot, region, *server_index;
	__u16 sport_raw, dport_raw;
	__u64 bytes = data_end - data;
	struct config *cfg;
	struct selector *sel;
	struct server *srv;
	void *l4;
	int v6;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_PASS;
	if (!same_mac(eth->h_dest, cfg->mac)) {
		count_event(EV_NOT_FOR_HOST);
		return XDP_PASS;
	}

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end || iph->ihl < 5)
			return XDP_PASS;
		/* Non-first fragments carry no ports: nft's `th dport` fails
		 * for them and they are not load-balanced there either. */
		if (iph->frag_off & bpf_htons(0x1fff))
			return XDP_PASS;
		if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
			return XDP_PASS;
		l4 = (void *)iph + iph->ihl * 4;
		if (l4 + 4 > data_end)
			return XDP_PASS;
		v6 = 0;
		key.family = 4;
		key.proto = iph->protocol;
		__builtin_memcpy(key.addr, &iph->daddr, 4);
		sport_raw = *(__u16 *)l4;
		dport_raw = *(__u16 *)(l4 + 2);
		if (!lookup_service(&key, bpf_ntohs(dport_raw), &sel_id))
			goto pass;
		sel = bpf_map_lookup_elem(&selectors, &sel_id);
		if (!sel)
			goto pass;
		flow_words(&f, sel->fields, 0, &iph->saddr, &iph->daddr, iph->protocol, sport_raw, dport_raw);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		__u32 saddr[4], daddr[4];

		if ((void *)(ip6h + 1) > data_end)
			return XDP_PASS;
		/* Extension headers: not parsed here; such packets pass to the
		 * stack (nft's `meta l4proto` walks them: a difference). */
		if (ip6h->nexthdr != IPPROTO_TCP && ip6h->nexthdr != IPPROTO_UDP)
			return XDP_PASS;
		l4 = (void *)(ip6h + 1);
		if (l4 + 4 > data_end)
			return XDP_PASS;
		v6 = 1;
		key.family = 6;
		key.proto = ip6h->nexthdr;
		__builtin_memcpy(key.addr, &ip6h->daddr, 16);
		__builtin_memcpy(saddr, &ip6h->saddr, 16);
		__builtin_memcpy(daddr, &ip6h->daddr, 16);
		sport_raw = *(__u16 *)l4;
		dport_raw = *(__u16 *)(l4 + 2);
		if (!lookup_service(&key, bpf_ntohs(dport_raw), &sel_id))
			goto pass;
		sel = bpf_map_lookup_elem(&selectors, &sel_id);
		if (!sel)
			goto pass;
		flow_words(&f, sel->fields, 1, saddr, daddr, ip6h->nexthdr, sport_raw, dport_raw);
	} else {
		return XDP_PASS;
	}

	count_service(&key, bytes);
	if (sel->size == 0 || f.n == 0 || f.n > MAX_WORDS)
		goto pass;
	/* nft: slot = reciprocal_scale(jhash(...), size) */
	slot = (__u32)(((__u64)jhash_words(f.words, f.n, sel->seed) * sel->size) >> 32);
	region = sel->base[sel->active & 1] + slot;
	server_index = bpf_map_lookup_elem(&slots, &region);
	if (!server_index)
		goto pass;
	if (*server_index == NO_SERVER) {
		count_event(EV_NO_SERVER);
		return XDP_DROP;
	}
	srv = bpf_map_lookup_elem(&servers, server_index);
	if (!srv)
		goto pass;

	if (srv->flags & SERVER_HAS_MAC) {
		__builtin_memcpy(eth->h_dest, srv->mac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, cfg->mac, ETH_ALEN);
		count(bpf_map_lookup_elem(&server_stats, server_index), bytes);
		return XDP_TX;
	} else {
		struct bpf_fib_lookup fib = {};
		int rc;

		fib.ifindex = ctx->ingress_ifindex;
		if (v6) {
			fib.family = 10; /* AF_INET6 */
			__builtin_memcpy(fib.ipv6_dst, srv->addr, 16);
		} else {
			fib.family = 2; /* AF_INET */
			__builtin_memcpy(&fib.ipv4_dst, srv->addr, 4);
		}
		rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			count_event(EV_NO_NEIGHBOUR);
			goto pass;
		}
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
		count(bpf_map_lookup_elem(&server_stats, server_index), bytes);
		if (fib.ifindex == ctx->ingress_ifindex)
			return XDP_TX;
		count_event(EV_REDIRECT);
		return bpf_redirect(fib.ifindex, 0);
	}

pass:
	count_event(EV_PASS);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
