// SPDX-License-Identifier: GPL-2.0
/*
 * kdsr's xdp engine: the packet path of `dsr.engine: "xdp"`, L2 and L3 DSR.
 *
 * Packet walk (the same decisions as the nft engine's netdev ingress chains,
 * nft/l2-lb.nft and kdsr/compile/lb_nft_l3.py):
 *   1. a frame whose destination MAC is not the interface's own goes on
 *      untouched (XDP_PASS), like `meta pkttype != host accept`: a flooded,
 *      mirrored, broadcast or multicast frame is another host's;
 *   2. IPv4 (first fragments only) or IPv6 (TCP/UDP, past the extension
 *      headers nft walks: ipv6_upper_layer()) looks up VIP . protocol . destination port in `services`
 *      (single ports), then in `ranges` (the port ranges of that VIP and
 *      protocol); no match: XDP_PASS, the host keeps working;
 *   3. the service names a selector: the Maglev table kdsr compiles for the
 *      nft engine (same seed, fields, size and slot -> server map).  The
 *      slot is nft's: jhash over the same bytes nft's `jhash` expression
 *      hashes (every field in its own 32-bit register, zero padded), then
 *      reciprocal_scale (kernel net/netfilter/nft_hash.c), so an xdp and an
 *      nft balancer send each flow to the same server;
 *   4. L2 (the selector's encap is ENCAP_NONE): the frame gets the server's
 *      MAC as destination and the interface's own as source and leaves
 *      where it came in (XDP_TX).  A server without a MAC in the intent is
 *      resolved by bpf_fib_lookup() (the kernel's neighbour table, as nft's
 *      `fwd ip to` does); no neighbour entry yet: XDP_PASS and a
 *      `no_neighbour` count (the stack does not forward it: the first
 *      packets to a server nobody has resolved are lost, which is why kdsr
 *      adds a managed neighbour entry per server).  A route out of another
 *      interface: XDP_REDIRECT there;
 *   5. L3 (ENCAP_IPIP, ENCAP_GRE, ENCAP_IP6TNL): the unchanged packet gets
 *      the outer header kdsr's tunnel links would give it (tunnel() below:
 *      outer source the balancer's tunnel source, destination the server,
 *      ttl 64, DF, the inner ECN bits; GRE without key, checksum or
 *      sequence), and goes to the next hop bpf_fib_lookup() names for the
 *      server.  The servers' decap links (remote any) take it as they take
 *      the nft engine's.
 *   A selector whose table is empty (every server drained) drops, as nft's
 *   selector chain does (its slots hold NO_SERVER).
 *
 * L3, too long for the tunnel (more than the selector's path MTU, or the
 * route's MTU bpf_fib_lookup() reports, once encapsulated): the nft engine
 * hands such a packet to the IP stack, which answers "fragmentation needed"
 * for DF or fragments it.  Here (too_big() and tunnel()): IPv6, and IPv4
 * with DF, get that ICMP error from the program itself, toward the client,
 * quoting as much of the packet as the kernel's own icmp_send() and
 * icmp6_send() do (576 / 1280 bytes in all); IPv4 without DF is
 * encapsulated without DF and, when the route's MTU is exceeded, handed to
 * the stack, which fragments the outer packet (the server reassembles it
 * before decapsulation).
 *
 * L3, no neighbour entry for the next hop yet: the encapsulated packet goes
 * to the stack (XDP_PASS), which forwards it to the server and resolves the
 * neighbour; later packets find it.  Its source is the balancer's own
 * address, which IPv4 input drops as a martian unless the interface has
 * accept_local (kdsr sets it for xdp L3 pools; IPv6 has no such check).
 *
 * ICMP errors about a flow (IPv4 destination unreachable, IPv6 packet too
 * big) addressed to an L3 VIP carry the flow's header reversed: the
 * service and slot are found from that header, and the error goes to the
 * flow's server, as the nft engine's `l3-icmp` maps send it.
 *
 * Atomic changes: each selector has two slot regions in `slots`; kdsr
 * writes a new table into the inactive region, then flips `active` in the
 * selector (one 4-byte field; the rest of the value is rewritten with the
 * same bytes), so a packet reads the old table or the new one, never a mix.
 * A service moves to another selector by one hash-element update, atomic
 * by RCU.
 *
 * Counters: per server (array, by server index) and per service (LRU hash
 * keyed like `services`), per CPU: packets and bytes (the IP packet's, as
 * nft counters count at ingress); `kdsr show` and the metrics sum them.
 *
 * Both kernels here must accept it: the host's 6.18 and Debian's 6.1 (its
 * verifier is older: only bounded loops, no kfuncs).
 */
#include <linux/bpf.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
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
/* Two regions per selector, for the L2 and the L3 selectors (each sized
 * within kdsr's slot budget of 262,144, kdsr/compile/selectors.py, as the
 * nft engine's L2 and L3 tables are), plus room for one largest table. */
#define MAX_SLOTS (4 * 262144 + 2 * 65537)

#define HASH_SOURCE_IP 0
#define HASH_SOURCE_IP_PORT 1
#define HASH_FIVE_TUPLE 2

#define SERVER_HAS_MAC 1

/* How a selector's packets reach their server: MAC rewrite (l2) or an outer
 * header (kdsr/intent/model.py L3_TUNNELS: ipip 20 bytes, gre 24, ip6tnl 40). */
#define ENCAP_NONE 0
#define ENCAP_IPIP 1
#define ENCAP_GRE 2
#define ENCAP_IP6TNL 3

/* kdsr's tunnel links' ttl (kdsr/model.py Link.ttl): the outer header's. */
#define TUNNEL_TTL 64
#define IP_DF 0x4000
#define IPV6_MIN_MTU 1280
/* What an ICMP error quotes of the packet: as much as the kernel's
 * icmp_send() (576 bytes in all, RFC 1812) and icmp6_send() (1280, RFC
 * 4443) put in theirs. */
#define ICMP4_QUOTE (576 - 20 - 8)
#define ICMP6_QUOTE (IPV6_MIN_MTU - 40 - 8)

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
	__u32 encap; /* ENCAP_* */
	__u32 mtu;   /* L3: the path MTU toward the servers (the intent's path_mtu) */
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
	__u8 source4[4];  /* L3: the outer source of IPv4 tunnels (the nft engine's tunnel links' local) */
	__u8 source6[16]; /* and of IPv6 ones */
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU event counts, by index (kdsr/kernel/xdp.py EVENTS). */
#define EV_PASS 0
#define EV_NOT_FOR_HOST 1
#define EV_NO_SERVER 2
#define EV_NO_NEIGHBOUR 3
#define EV_REDIRECT 4
#define EV_TOO_BIG 5	/* an ICMP error "too big" sent toward the client */
#define EV_TO_STACK 6	/* L3: encapsulated, handed to the stack to forward */
#define EV_NO_ROUTE 7	/* L3: no route toward the server: dropped */
#define EV_ICMP_ERROR 8 /* an ICMP error about a flow, sent to the flow's server */
#define EV_MAX 16

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
	/* kdsr reads a million slots on every change: mapped, that is a copy of
	 * memory instead of a million element copies through bpf() (Linux 5.5) */
	__uint(map_flags, BPF_F_MMAPABLE);
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

/* An IPv6 fragment header (the kernel's struct frag_hdr is not uapi). */
struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

#define IPV6_EXT_MAX 4 /* extension headers walked before giving the packet to the stack */

/* The upper-layer protocol of an IPv6 packet and where its header starts,
 * past the extension headers nft's `meta l4proto` and `th` walk
 * (ipv6_find_hdr(): hop-by-hop, routing, destination options, and the
 * fragment header of a first fragment), so a packet that carries one is
 * balanced as the nft engine balances it.  -1: a non-first fragment (no
 * ports: nft's `th dport` fails too), a truncated header, or a chain
 * longer than IPV6_EXT_MAX; the caller passes those to the stack.  AH, ESP
 * and the rest end the walk as the protocol itself, which no service has. */
static __always_inline int ipv6_upper_layer(struct ipv6hdr *ip6h, void **l4, void *data_end)
{
	void *p = ip6h + 1;
	__u8 nexthdr = ip6h->nexthdr;
	int i;

#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS) {
			struct ipv6_opt_hdr *opt = p;

			if ((void *)(opt + 1) > data_end)
				return -1;
			nexthdr = opt->nexthdr;
			p += (opt->hdrlen + 1) * 8;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag_hdr *frag = p;

			if ((void *)(frag + 1) > data_end || (frag->frag_off & bpf_htons(0xfff8)))
				return -1;
			nexthdr = frag->nexthdr;
			p = frag + 1;
		} else {
			*l4 = p;
			return nexthdr;
		}
	}
	return -1;
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

static __always_inline void count_server(__u32 index, __u64 bytes)
{
	count(bpf_map_lookup_elem(&server_stats, &index), bytes);
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

static __always_inline __u16 csum_fold(__u64 sum)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *iph)
{
	__u16 *word = (__u16 *)iph;
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*iph) / 2; i++)
		sum += word[i];
	return csum_fold(sum);
}

/* The ECN bits an outer header takes from the inner one (the kernel's
 * INET_ECN_encapsulate(), which its tunnels apply): ECT copied, CE as ECT(0). */
static __always_inline __u8 ecn_outer(__u8 inner_dsfield)
{
	__u8 ecn = inner_dsfield & 3;

	return ecn == 3 ? 2 : ecn;
}

/* The frame's destination MAC and source MAC (the previous hop), before a
 * header is pushed over them. */
struct macs {
	__u8 dst[ETH_ALEN];
	__u8 src[ETH_ALEN];
};

static __always_inline void set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src, __u16 proto)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	eth->h_proto = bpf_htons(proto);
}

/* "Fragmentation needed" (IPv4) or "packet too big" (IPv6) toward the
 * client, with ``mtu`` (what fits the tunnel), from the balancer's tunnel
 * source address, out where the packet came in (XDP_TX): the packet is cut
 * to the quote, and the new IP and ICMP headers are pushed in front of it.
 * The caller checked that the packet is longer than the quote. */
static __always_inline int too_big(struct xdp_md *ctx, struct config *cfg, const struct macs *macs, int v6, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int quote = v6 ? ICMP6_QUOTE : ICMP4_QUOTE;
	int frame = data_end - data;
	__u64 sum;

	if (bpf_xdp_adjust_tail(ctx, ETH_HLEN + quote - frame))
		return XDP_DROP;
	count_event(EV_TOO_BIG);
	if (v6) {
		struct ipv6hdr *ip6h, *orig;
		struct icmp6hdr *icmp;
		struct {
			__u8 saddr[16];
			__u8 daddr[16];
			__be32 len;
			__be32 nexthdr;
		} pseudo = {};

		if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(*ip6h) + sizeof(*icmp))))
			return XDP_DROP;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + ETH_HLEN + sizeof(*ip6h) + sizeof(*icmp) + ICMP6_QUOTE > data_end)
			return XDP_DROP;
		ip6h = data + ETH_HLEN;
		icmp = (void *)(ip6h + 1);
		orig = (void *)(icmp + 1);
		set_macs(data, macs->src, macs->dst, ETH_P_IPV6);
		*(__be32 *)ip6h = bpf_htonl(6 << 28);
		ip6h->payload_len = bpf_htons(sizeof(*icmp) + ICMP6_QUOTE);
		ip6h->nexthdr = IPPROTO_ICMPV6;
		ip6h->hop_limit = 64;
		__builtin_memcpy(&ip6h->saddr, cfg->source6, 16);
		__builtin_memcpy(&ip6h->daddr, &orig->saddr, 16);
		icmp->icmp6_type = ICMPV6_PKT_TOOBIG;
		icmp->icmp6_code = 0;
		icmp->icmp6_cksum = 0;
		icmp->icmp6_mtu = bpf_htonl(mtu);
		__builtin_memcpy(pseudo.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(pseudo.daddr, &ip6h->daddr, 16);
		pseudo.len = bpf_htonl(sizeof(*icmp) + ICMP6_QUOTE);
		pseudo.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
		/* bpf_csum_diff() sums at most 512 bytes a call */
		sum = bpf_csum_diff(0, 0, (void *)&pseudo, sizeof(pseudo), 0);
		sum = bpf_csum_diff(0, 0, (void *)icmp, 512, sum);
		sum = bpf_csum_diff(0, 0, (void *)icmp + 512, 512, sum);
		sum = bpf_csum_diff(0, 0, (void *)icmp + 1024, sizeof(*icmp) + ICMP6_QUOTE - 1024, sum);
		icmp->icmp6_cksum = csum_fold(sum);
		return XDP_TX;
	} else {
		struct iphdr *iph, *orig;
		struct icmphdr *icmp;

		if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(*iph) + sizeof(*icmp))))
			return XDP_DROP;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + ETH_HLEN + sizeof(*iph) + sizeof(*icmp) + ICMP4_QUOTE > data_end)
			return XDP_DROP;
		iph = data + ETH_HLEN;
		icmp = (void *)(iph + 1);
		orig = (void *)(icmp + 1);
		set_macs(data, macs->src, macs->dst, ETH_P_IP);
		iph->version = 4;
		iph->ihl = 5;
		iph->tos = 0xc0; /* IPTOS_PREC_INTERNETCONTROL, as icmp_send() */
		iph->tot_len = bpf_htons(sizeof(*iph) + sizeof(*icmp) + ICMP4_QUOTE);
		iph->id = 0;
		iph->frag_off = 0;
		iph->ttl = 64;
		iph->protocol = IPPROTO_ICMP;
		iph->check = 0;
		__builtin_memcpy(&iph->saddr, cfg->source4, 4);
		iph->daddr = orig->saddr;
		iph->check = ipv4_checksum(iph);
		icmp->type = ICMP_DEST_UNREACH;
		icmp->code = ICMP_FRAG_NEEDED;
		icmp->checksum = 0;
		icmp->un.frag.__unused = 0;
		icmp->un.frag.mtu = bpf_htons(mtu);
		sum = bpf_csum_diff(0, 0, (void *)icmp, 512, 0);
		sum = bpf_csum_diff(0, 0, (void *)icmp + 512, sizeof(*icmp) + ICMP4_QUOTE - 512, sum);
		icmp->checksum = csum_fold(sum);
		return XDP_TX;
	}
}

/* Push the outer header (and GRE's) in front of the IP packet of
 * ``inner_len`` bytes, with the Ethernet header moved in front of it
 * (its MACs are the caller's to set).  ``df``: an IPv4 outer header's DF,
 * set as the kernel's tunnels set it (pmtudisc, their default) but for a
 * packet the stack or a router must fragment.  0, or -1 when the frame
 * cannot grow. */
static __always_inline int push_outer(struct xdp_md *ctx, struct config *cfg, struct server *srv, __u32 encap,
				      __u32 inner_len, __u8 inner_dsfield, int inner_v6, int df, __u32 hash)
{
	void *data, *data_end;

	if (encap == ENCAP_IP6TNL) {
		struct ipv6hdr *o6;

		if (bpf_xdp_adjust_head(ctx, -(int)sizeof(*o6)))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		o6 = data + ETH_HLEN;
		if ((void *)(o6 + 1) > data_end)
			return -1;
		/* Traffic class: the inner ECN; flow label: the flow's hash (the
		 * kernel's tunnels give one from the skb hash, auto_flowlabels),
		 * so routers on the way spread flows as they would. */
		*(__be32 *)o6 = bpf_htonl((6 << 28) | ((__u32)ecn_outer(inner_dsfield) << 20) | (hash & 0xfffff));
		o6->payload_len = bpf_htons(inner_len);
		o6->nexthdr = inner_v6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
		o6->hop_limit = TUNNEL_TTL;
		__builtin_memcpy(&o6->saddr, cfg->source6, 16);
		__builtin_memcpy(&o6->daddr, srv->addr, 16);
		((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IPV6);
		return 0;
	} else {
		struct iphdr *o4;
		int gre = encap == ENCAP_GRE;
		int grow = sizeof(*o4) + (gre ? 4 : 0);

		if (bpf_xdp_adjust_head(ctx, -grow))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		o4 = data + ETH_HLEN;
		if ((void *)(o4 + 1) + 4 > data_end)
			return -1;
		o4->version = 4;
		o4->ihl = 5;
		o4->tos = ecn_outer(inner_dsfield);
		o4->tot_len = bpf_htons(inner_len + grow);
		/* With DF the ID identifies nothing (RFC 6864); without it the
		 * stack may fragment this packet, and fragments of different
		 * packets must not share one. */
		o4->id = df ? 0 : bpf_htons(bpf_get_prandom_u32() & 0xffff);
		o4->frag_off = df ? bpf_htons(IP_DF) : 0;
		o4->ttl = TUNNEL_TTL;
		o4->protocol = gre ? IPPROTO_GRE : IPPROTO_IPIP;
		o4->check = 0;
		__builtin_memcpy(&o4->saddr, cfg->source4, 4);
		__builtin_memcpy(&o4->daddr, srv->addr, 4);
		o4->check = ipv4_checksum(o4);
		if (gre) {
			__be16 *gre_header = (void *)(o4 + 1);

			gre_header[0] = 0; /* no checksum, key or sequence; version 0 */
			gre_header[1] = bpf_htons(inner_v6 ? ETH_P_IPV6 : ETH_P_IP);
		}
		((struct ethhdr *)data)->h_proto = bpf_htons(ETH_P_IP);
		return 0;
	}
}

/* L3: the packet (an IP packet of ``inner_len`` bytes after the Ethernet
 * header) to ``srv`` through the selector's tunnel.  ``icmp_error``: the
 * packet is an ICMP error about a flow, never answered with another. */
static __always_inline int tunnel(struct xdp_md *ctx, struct config *cfg, struct selector *sel, struct server *srv,
				  __u32 server_index, __u32 ifindex, int v6, __u32 inner_len, __u8 dsfield, int df,
				  __u32 hash, __u64 bytes, int icmp_error)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {};
	__u32 encap = sel->encap, overhead, outer_len, limit, answer;
	int outer_v6 = encap == ENCAP_IP6TNL, route_too_small = 0, outer_df = 1, rc;
	struct macs macs;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(macs.dst, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(macs.src, eth->h_source, ETH_ALEN);
	overhead = outer_v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr) + (encap == ENCAP_GRE ? 4 : 0);
	outer_len = inner_len + overhead;

	fib.ifindex = ifindex;
	fib.tot_len = outer_len;
	if (outer_v6) {
		fib.family = 10; /* AF_INET6 */
		fib.l4_protocol = v6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
		__builtin_memcpy(fib.ipv6_src, cfg->source6, 16);
		__builtin_memcpy(fib.ipv6_dst, srv->addr, 16);
	} else {
		fib.family = 2; /* AF_INET */
		fib.l4_protocol = encap == ENCAP_GRE ? IPPROTO_GRE : IPPROTO_IPIP;
		__builtin_memcpy(&fib.ipv4_src, cfg->source4, 4);
		__builtin_memcpy(&fib.ipv4_dst, srv->addr, 4);
	}
	/* With tot_len set, an outer packet longer than the route's MTU is
	 * BPF_FIB_LKUP_RET_FRAG_NEEDED, the MTU in mtu_result (net/core/filter.c,
	 * 6.1 and 6.18).  The helper rewrites ipv4_dst / ipv6_dst with the next
	 * hop: the outer destination is srv->addr, never those. */
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	limit = sel->mtu ? sel->mtu : 0xffff;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		route_too_small = 1;
		if (fib.mtu_result < limit)
			limit = fib.mtu_result;
	} else if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		count_event(EV_NO_ROUTE);
		return XDP_DROP;
	}
	if (outer_len > limit) {
		answer = limit > overhead ? limit - overhead : 0;
		if (!v6 && !df) {
			/* No DF: the nft engine's stack fragments it; here the outer
			 * packet goes without DF, and through the stack when the
			 * route cannot carry it whole. */
			outer_df = 0;
			if (route_too_small)
				rc = BPF_FIB_LKUP_RET_NO_NEIGH;
		} else if (!icmp_error && answer >= (v6 ? IPV6_MIN_MTU : 68) &&
			   inner_len > (__u32)(v6 ? ICMP6_QUOTE : ICMP4_QUOTE)) {
			return too_big(ctx, cfg, &macs, v6, answer);
		} else if (route_too_small) {
			/* Nothing to answer with (an ICMP error is never answered
			 * with another; IPv6 below its minimum MTU) and no way out. */
			count_event(EV_TOO_BIG);
			return XDP_DROP;
		}
		/* else: longer than path_mtu only; it fits the route: sent as is */
	}

	if (push_outer(ctx, cfg, srv, encap, inner_len, dsfield, v6, outer_df, hash))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	count_server(server_index, bytes);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
		if (fib.ifindex == ifindex)
			return XDP_TX;
		count_event(EV_REDIRECT);
		return bpf_redirect(fib.ifindex, 0);
	}
	/* To the stack, addressed to this interface (the frame was), which
	 * forwards it toward srv->addr: resolving the next hop's neighbour
	 * entry, or fragmenting the outer packet. */
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH && !route_too_small)
		count_event(EV_NO_NEIGHBOUR);
	count_event(EV_TO_STACK);
	__builtin_memcpy(eth->h_dest, macs.dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, macs.src, ETH_ALEN);
	return XDP_PASS;
}

SEC("xdp")
int kdsr_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct svc_key key = {};
	struct flow f = {};
	__u32 zero = 0, sel_id, slot, region, index, hash, inner_len;
	__u16 sport_raw, dport_raw;
	__u64 bytes = data_end - data - ETH_HLEN;
	/* Read once: clang may otherwise keep &ctx->ingress_ifindex in a
	 * register and load through it later, which the verifier refuses
	 * ("dereference of modified ctx ptr"). */
	__u32 ifindex = ctx->ingress_ifindex;
	struct config *cfg;
	struct selector *sel;
	struct server *srv;
	__u32 *server_index;
	int v6, icmp_error = 0, df = 0;
	__u8 dsfield;
	void *l4;

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
		l4 = (void *)iph + iph->ihl * 4;
		v6 = 0;
		key.family = 4;
		inner_len = bpf_ntohs(iph->tot_len);
		dsfield = iph->tos;
		df = !!(iph->frag_off & bpf_htons(IP_DF));
		if (iph->protocol == IPPROTO_ICMP) {
			/* An error about a flow: the header it quotes is the
			 * server's reply (VIP -> client), with no options (as the
			 * nft engine's fixed offsets assume). */
			struct icmphdr *icmp = l4;
			struct iphdr *quoted = (void *)(icmp + 1);

			if ((void *)(quoted + 1) + 4 > data_end || icmp->type != ICMP_DEST_UNREACH || quoted->ihl != 5)
				return XDP_PASS;
			if (quoted->protocol != IPPROTO_TCP && quoted->protocol != IPPROTO_UDP)
				return XDP_PASS;
			icmp_error = 1;
			key.proto = quoted->protocol;
			__builtin_memcpy(key.addr, &quoted->saddr, 4);
			/* the client's port and the service's, as the flow had them */
			sport_raw = *(__u16 *)((void *)(quoted + 1) + 2);
			dport_raw = *(__u16 *)(void *)(quoted + 1);
			if (!lookup_service(&key, bpf_ntohs(dport_raw), &sel_id))
				goto pass;
			sel = bpf_map_lookup_elem(&selectors, &sel_id);
			if (!sel || sel->encap == ENCAP_NONE)
				goto pass;
			flow_words(&f, sel->fields, 0, &quoted->daddr, &quoted->saddr, quoted->protocol, sport_raw,
				   dport_raw);
		} else {
			if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
				return XDP_PASS;
			if (l4 + 4 > data_end)
				return XDP_PASS;
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
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		__u32 saddr[4], daddr[4];

		int upper;

		if ((void *)(ip6h + 1) > data_end)
			return XDP_PASS;
		upper = ipv6_upper_layer(ip6h, &l4, data_end);
		if (upper < 0)
			return XDP_PASS;
		v6 = 1;
		key.family = 6;
		inner_len = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
		dsfield = (bpf_ntohs(*(__be16 *)ip6h) >> 4) & 0xff;
		if (upper == IPPROTO_ICMPV6) {
			struct icmp6hdr *icmp = l4;
			struct ipv6hdr *quoted = (void *)(icmp + 1);

			if ((void *)(quoted + 1) + 4 > data_end || icmp->icmp6_type != ICMPV6_PKT_TOOBIG)
				return XDP_PASS;
			if (quoted->nexthdr != IPPROTO_TCP && quoted->nexthdr != IPPROTO_UDP)
				return XDP_PASS;
			icmp_error = 1;
			key.proto = quoted->nexthdr;
			__builtin_memcpy(key.addr, &quoted->saddr, 16);
			__builtin_memcpy(saddr, &quoted->daddr, 16);
			__builtin_memcpy(daddr, &quoted->saddr, 16);
			sport_raw = *(__u16 *)((void *)(quoted + 1) + 2);
			dport_raw = *(__u16 *)(void *)(quoted + 1);
			if (!lookup_service(&key, bpf_ntohs(dport_raw), &sel_id))
				goto pass;
			sel = bpf_map_lookup_elem(&selectors, &sel_id);
			if (!sel || sel->encap == ENCAP_NONE)
				goto pass;
			flow_words(&f, sel->fields, 1, saddr, daddr, quoted->nexthdr, sport_raw, dport_raw);
		} else {
			if (upper != IPPROTO_TCP && upper != IPPROTO_UDP)
				return XDP_PASS;
			if (l4 + 4 > data_end)
				return XDP_PASS;
			key.proto = upper;
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
			flow_words(&f, sel->fields, 1, saddr, daddr, upper, sport_raw, dport_raw);
		}
	} else {
		return XDP_PASS;
	}

	if (icmp_error)
		count_event(EV_ICMP_ERROR);
	else
		count_service(&key, bytes);
	if (sel->size == 0 || f.n == 0 || f.n > MAX_WORDS)
		goto pass;
	/* nft: slot = reciprocal_scale(jhash(...), size) */
	hash = jhash_words(f.words, f.n, sel->seed);
	slot = (__u32)(((__u64)hash * sel->size) >> 32);
	region = sel->base[sel->active & 1] + slot;
	server_index = bpf_map_lookup_elem(&slots, &region);
	if (!server_index)
		goto pass;
	index = *server_index;
	if (index == NO_SERVER) {
		count_event(EV_NO_SERVER);
		return XDP_DROP;
	}
	srv = bpf_map_lookup_elem(&servers, &index);
	if (!srv)
		goto pass;

	if (sel->encap != ENCAP_NONE) {
		if (inner_len > bytes)
			goto pass; /* the IP header says more than the frame holds */
		return tunnel(ctx, cfg, sel, srv, index, ifindex, v6, inner_len, dsfield, df, hash, bytes, icmp_error);
	}
	if (srv->flags & SERVER_HAS_MAC) {
		__builtin_memcpy(eth->h_dest, srv->mac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, cfg->mac, ETH_ALEN);
		count_server(index, bytes);
		return XDP_TX;
	} else {
		struct bpf_fib_lookup fib = {};
		int rc;

		fib.ifindex = ifindex;
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
		count_server(index, bytes);
		if (fib.ifindex == ifindex)
			return XDP_TX;
		count_event(EV_REDIRECT);
		return bpf_redirect(fib.ifindex, 0);
	}

pass:
	count_event(EV_PASS);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
