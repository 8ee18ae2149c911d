/*
 * The fast-path bench's sender where pktgen is not built (the host kernel):
 * 60-byte UDP/IPv4 frames, the same ones bench/fast_path.py asks pktgen for,
 * written straight to one interface's driver with AF_PACKET and
 * PACKET_QDISC_BYPASS, in batches of sendmmsg.
 *
 *   fastpath_sender IFNAME SRC_MAC DST_MAC SRC_IP DST_IP DPORT SPORT_MIN SPORT_MAX SECONDS CPU
 *
 * The source port steps by one per frame over [SPORT_MIN, SPORT_MAX), as
 * pktgen's does, so the flows are the same.  Runs for SECONDS (bounded:
 * at most 60), pinned to CPU, then prints one JSON line:
 *   {"sent": <frames the driver took>, "usec": <elapsed>, "errors": <failed sends>}
 *
 * On veth the transmit enqueues to the peer's backlog and never blocks, so
 * like pktgen the sender runs flat out and what the path cannot take is
 * dropped at the receiving CPU's backlog, where the bench counts it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
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

int main(int argc, char **argv)
{
	if (argc != 11) {
		fprintf(stderr, "usage: %s IFNAME SRC_MAC DST_MAC SRC_IP DST_IP DPORT SPORT_MIN SPORT_MAX SECONDS CPU\n",
			argv[0]);
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

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	unsigned long long sent = 0, errors = 0;
	size_t next = 0;
	double start = now(), end = start + seconds, t = start;
	while (!stop && t < end) {
		for (int i = 0; i < BATCH; i++) {
			iov[i].iov_base = frames + next * FRAME_LEN;
			next = next + 1 == flows ? 0 : next + 1;
		}
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n < 0) {
			if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
				perror("sendmmsg");
				break;
			}
			errors++;
		} else {
			sent += (unsigned long long)n;
		}
		t = now();
	}
	printf("{\"sent\": %llu, \"usec\": %llu, \"errors\": %llu}\n", sent,
	       (unsigned long long)((t - start) * 1e6), errors);
	close(fd);
	free(frames);
	return 0;
}
