/*
 * The fast-path bench's sender where pktgen is not built (the host kernel):
 * 60-byte UDP/IPv4 frames, the same ones bench/fast_path.py asks pktgen for,
 * written straight to one interface's driver with AF_PACKET and
 * PACKET_QDISC_BYPASS, in batches of sendmmsg, or (METHOD "ring") from a
 * PACKET_TX_RING (TPACKET_V2) that send() flushes, frames written once.
 *
 *   fastpath_sender IFNAME SRC_MAC DST_MAC SRC_IP DST_IP DPORT SPORT_MIN SPORT_MAX SECONDS CPU [mmsg|ring]
 *
 * The source port steps by one per frame over [SPORT_MIN, SPORT_MAX), as
 * pktgen's does, so the flows are the same.  Runs for SECONDS (bounded:
 * at most 60), pinned to CPU, then prints one JSON line:
 *   {"sent": <frames the driver took>, "dropped": <frames it refused>, "usec": <elapsed>, "errors": <failed calls>}
 *
 * A frame the driver refuses (ENOBUFS: veth's NET_XMIT_DROP, the receiving
 * backlog or a veth's XDP ring full) is counted in "dropped" and the next
 * frame follows it: sent + dropped is what the sender offered.
 *
 * On veth the transmit enqueues to the peer's backlog and never blocks; a
 * frame holds its share of the socket's send buffer until the path frees it
 * (veth keeps the socket reference across namespaces), so the sender waits
 * for a path slower than itself instead of flooding the receiving backlog.
 * The ring sends with MSG_DONTWAIT (a blocking send() waits until every
 * frame it sent has been freed, idling the sender for a whole batch) and
 * retries while the send buffer is full.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <sys/mman.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_LEN 60
#define BATCH 256
#define MAX_SECONDS 60.0

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static int parse_mac(const char *text, uint8_t mac[6])
{
	unsigned int b[6];
	if (sscanf(text, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6)
		return -1;
	for (int i = 0; i < 6; i++) {
		if (b[i] > 0xff)
			return -1;
		mac[i] = (uint8_t)b[i];
	}
	return 0;
}

static uint16_t ip_checksum(const void *data, size_t len)
{
	const uint16_t *p = data;
	uint32_t sum = 0;
	for (; len > 1; len -= 2)
		sum += *p++;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void build_frame(uint8_t *f, const uint8_t src_mac[6], const uint8_t dst_mac[6],
			struct in_addr src, struct in_addr dst, uint16_t sport, uint16_t dport)
{
	memset(f, 0, FRAME_LEN);
	struct ether_header *eth = (struct ether_header *)f;
	memcpy(eth->ether_dhost, dst_mac, 6);
	memcpy(eth->ether_shost, src_mac, 6);
	eth->ether_type = htons(ETHERTYPE_IP);

	struct iphdr *ip = (struct iphdr *)(f + sizeof(*eth));
	ip->version = 4;
	ip->ihl = 5;
	ip->ttl = 32;
	ip->protocol = IPPROTO_UDP;
	ip->tot_len = htons(FRAME_LEN - sizeof(*eth));
	ip->saddr = src.s_addr;
	ip->daddr = dst.s_addr;
	ip->check = ip_checksum(ip, sizeof(*ip));

	struct udphdr *udp = (struct udphdr *)(f + sizeof(*eth) + sizeof(*ip));
	udp->source = htons(sport);
	udp->dest = htons(dport);
	udp->len = htons(FRAME_LEN - sizeof(*eth) - sizeof(*ip));
	udp->check = 0; /* optional for UDP over IPv4 */
}

/* PACKET_TX_RING: RING_BLOCKS blocks of one page, each holding frames of
 * RING_FRAME bytes; the frames are written once (frame i carries flow
 * i % flows) and only their status word changes after that. */
#define RING_FRAME 128
#define RING_BLOCK 4096
#define RING_BLOCKS 1024

static int send_ring(int fd, size_t flows, const uint8_t src_mac[6], const uint8_t dst_mac[6], struct in_addr src,
		     struct in_addr dst, uint16_t smin, uint16_t dport, double seconds)
{
	int version = TPACKET_V2;
	if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &version, sizeof(version))) {
		perror("PACKET_VERSION");
		return 1;
	}
	struct tpacket_req req = {
		.tp_block_size = RING_BLOCK,
		.tp_block_nr = RING_BLOCKS,
		.tp_frame_size = RING_FRAME,
		.tp_frame_nr = RING_BLOCKS * (RING_BLOCK / RING_FRAME),
	};
	if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof(req))) {
		perror("PACKET_TX_RING");
		return 1;
	}
	size_t nr = req.tp_frame_nr, len = (size_t)req.tp_block_size * req.tp_block_nr;
	uint8_t *ring = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ring == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	const size_t data = TPACKET_ALIGN(sizeof(struct tpacket2_hdr));
	for (size_t i = 0; i < nr; i++) {
		struct tpacket2_hdr *h = (struct tpacket2_hdr *)(ring + i * RING_FRAME);
		build_frame((uint8_t *)h + data, src_mac, dst_mac, src, dst, (uint16_t)(smin + i % flows), dport);
		h->tp_len = FRAME_LEN;
	}
	/* sent: frames handed over less those the kernel never took (still
	 * SEND_REQUEST at the end) and those it refused (a send() failing with
	 * ENOBUFS stopped at one refused frame, which is free again); send()'s
	 * byte count misses frames taken by a call that then failed. */
	unsigned long long handed = 0, dropped = 0, errors = 0;
	size_t cursor = 0;
	double start = now(), end = start + seconds, t = start;
	while (!stop && t < end) {
		/* hand over every free frame from the cursor on (at most one ring) */
		for (size_t n = 0; n < nr; n++) {
			struct tpacket2_hdr *h = (struct tpacket2_hdr *)(ring + cursor * RING_FRAME);
			if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) != TP_STATUS_AVAILABLE)
				break;
			__atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
			cursor = cursor + 1 == nr ? 0 : cursor + 1;
			handed++;
		}
		ssize_t n = send(fd, NULL, 0, MSG_DONTWAIT);
		if (n < 0) {
			if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
				perror("send");
				break;
			}
			errors++;
			if (errno == ENOBUFS)
				dropped++;
		}
		t = now();
	}
	unsigned long long sent = handed - dropped;
	for (size_t i = 0; i < nr; i++) {
		struct tpacket2_hdr *h = (struct tpacket2_hdr *)(ring + i * RING_FRAME);
		if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) == TP_STATUS_SEND_REQUEST)
			sent--;
	}
	printf("{\"sent\": %llu, \"dropped\": %llu, \"usec\": %llu, \"errors\": %llu}\n", sent, dropped,
	       (unsigned long long)((t - start) * 1e6), errors);
	munmap(ring, len);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 11 && argc != 12) {
		fprintf(stderr,
			"usage: %s IFNAME SRC_MAC DST_MAC SRC_IP DST_IP DPORT SPORT_MIN SPORT_MAX SECONDS CPU [mmsg|ring]\n",
			argv[0]);
		return 2;
	}
	int use_ring = argc == 12 && strcmp(argv[11], "ring") == 0;
	if (argc == 12 && !use_ring && strcmp(argv[11], "mmsg") != 0) {
		fprintf(stderr, "%s: METHOD is mmsg or ring\n", argv[0]);
		return 2;
	}
	uint8_t src_mac[6], dst_mac[6];
	struct in_addr src, dst;
	long dport = strtol(argv[6], NULL, 10), smin = strtol(argv[7], NULL, 10), smax = strtol(argv[8], NULL, 10);
	double seconds = strtod(argv[9], NULL);
	int cpu = atoi(argv[10]);
	if (parse_mac(argv[2], src_mac) || parse_mac(argv[3], dst_mac) || !inet_aton(argv[4], &src) ||
	    !inet_aton(argv[5], &dst) || dport < 1 || dport > 65535 || smin < 1 || smax > 65536 || smin >= smax ||
	    !(seconds > 0 && seconds <= MAX_SECONDS)) {
		fprintf(stderr, "%s: bad argument (MACs aa:bb:.., dotted IPv4, ports 1-65535, 0 < SECONDS <= %g)\n",
			argv[0], MAX_SECONDS);
		return 2;
	}
	unsigned int ifindex = if_nametoindex(argv[1]);
	if (!ifindex) {
		fprintf(stderr, "%s: no interface %s\n", argv[0], argv[1]);
		return 2;
	}

	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("sched_setaffinity");
		return 1;
	}

	int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: this socket receives nothing */
	if (fd < 0) {
		perror("socket(AF_PACKET)");
		return 1;
	}
	int one = 1;
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one))) {
		perror("PACKET_QDISC_BYPASS");
		return 1;
	}
	struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex, .sll_protocol = 0};
	if (bind(fd, (struct sockaddr *)&ll, sizeof(ll))) {
		perror("bind");
		return 1;
	}

	size_t flows = (size_t)(smax - smin);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	if (use_ring)
		return send_ring(fd, flows, src_mac, dst_mac, src, dst, (uint16_t)smin, (uint16_t)dport, seconds);
	uint8_t *frames = malloc(flows * FRAME_LEN);
	if (!frames) {
		perror("malloc");
		return 1;
	}
	for (size_t i = 0; i < flows; i++)
		build_frame(frames + i * FRAME_LEN, src_mac, dst_mac, src, dst, (uint16_t)(smin + i), (uint16_t)dport);

	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_len = FRAME_LEN;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}

	unsigned long long sent = 0, dropped = 0, errors = 0;
	size_t next = 0;
	double start = now(), end = start + seconds, t = start;
	while (!stop && t < end) {
		for (int i = 0; i < BATCH; i++)
			iov[i].iov_base = frames + ((next + (size_t)i) % flows) * FRAME_LEN;
		/* sendmmsg stops at the first frame refused: it returns the count
		 * before it (the error is lost), or -1 when it was the first */
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n < 0) {
			if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
				perror("sendmmsg");
				break;
			}
			errors++;
			n = 0;
			if (errno == ENOBUFS) {
				dropped++;
				next = (next + 1) % flows;
			}
		} else if (n < BATCH) {
			dropped++;
			next = (next + 1) % flows;
		}
		sent += (unsigned long long)n;
		next = (next + (size_t)n) % flows;
		t = now();
	}
	printf("{\"sent\": %llu, \"dropped\": %llu, \"usec\": %llu, \"errors\": %llu}\n", sent, dropped,
	       (unsigned long long)((t - start) * 1e6), errors);
	close(fd);
	free(frames);
	return 0;
}
