/*
 * Loads the fast-path bench's sender stage (bpf/xdp_redirect_tx.c) and exits:
 *
 *   xdp_fanout_load OBJ DEV INTO FANOUT SPORT_MIN SPORT_MAX
 *
 * attaches xdp_fanout natively to DEV, with FANOUT slots of its devmap
 * holding INTO and the xdp_flow program (source ports SPORT_MIN ..
 * SPORT_MAX - 1, one step per frame).  Nothing is pinned (bpffs is not
 * needed): the attachment holds the program, the program its map, the map
 * its slots' program; deleting DEV (or its namespace) frees them all.
 * Run it in DEV's and INTO's network namespace: a devmap resolves INTO's
 * index in the updating task's namespace.
 */
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FANOUT_MAX 64 /* the devmap's size in bpf/xdp_redirect_tx.c */

struct fanout_cfg {
	__u16 sport_min;
	__u16 flows;
};

static int quiet(enum libbpf_print_level level, const char *fmt, va_list args)
{
	return level == LIBBPF_DEBUG ? 0 : vfprintf(stderr, fmt, args);
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s OBJ DEV INTO FANOUT SPORT_MIN SPORT_MAX\n", argv[0]);
		return 2;
	}
	unsigned int dev = if_nametoindex(argv[2]), into = if_nametoindex(argv[3]);
	long fanout = strtol(argv[4], NULL, 10), smin = strtol(argv[5], NULL, 10), smax = strtol(argv[6], NULL, 10);
	if (!dev || !into || fanout < 1 || fanout > FANOUT_MAX || smin < 1 || smax > 65536 || smin >= smax) {
		fprintf(stderr, "%s: bad argument (devices must exist here, 1 <= FANOUT <= %d, ports 1-65535)\n", argv[0],
			FANOUT_MAX);
		return 2;
	}
	libbpf_set_print(quiet);
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) {
		fprintf(stderr, "%s: cannot open %s: %s\n", argv[0], argv[1], strerror(errno));
		return 1;
	}
	struct bpf_map *map, *rodata = NULL;
	bpf_object__for_each_map(map, obj)
	{
		const char *name = bpf_map__name(map);
		size_t n = strlen(name);
		if (n >= 7 && strcmp(name + n - 7, ".rodata") == 0)
			rodata = map;
	}
	size_t size = 0;
	/* writable until load (libbpf 1.1 declares it const) */
	struct fanout_cfg *cfg = rodata ? (void *)bpf_map__initial_value(rodata, &size) : NULL;
	if (!cfg || size < sizeof(*cfg)) {
		fprintf(stderr, "%s: %s has no .rodata holding struct fanout_cfg\n", argv[0], argv[1]);
		return 1;
	}
	cfg->sport_min = (__u16)smin;
	cfg->flows = (__u16)(smax - smin);
	if (bpf_object__load(obj)) {
		fprintf(stderr, "%s: loading %s: %s\n", argv[0], argv[1], strerror(errno));
		return 1;
	}
	struct bpf_program *fan = bpf_object__find_program_by_name(obj, "xdp_fanout");
	struct bpf_program *flow = bpf_object__find_program_by_name(obj, "xdp_flow");
	struct bpf_map *tx = bpf_object__find_map_by_name(obj, "tx");
	if (!fan || !flow || !tx) {
		fprintf(stderr, "%s: %s lacks xdp_fanout, xdp_flow or the map tx\n", argv[0], argv[1]);
		return 1;
	}
	struct bpf_devmap_val val = {.ifindex = into, .bpf_prog.fd = bpf_program__fd(flow)};
	for (__u32 slot = 0; slot < (__u32)fanout; slot++) {
		if (bpf_map_update_elem(bpf_map__fd(tx), &slot, &val, 0)) {
			fprintf(stderr, "%s: devmap slot %u: %s\n", argv[0], slot, strerror(errno));
			return 1;
		}
	}
	if (bpf_xdp_attach((int)dev, bpf_program__fd(fan), XDP_FLAGS_DRV_MODE, NULL)) {
		fprintf(stderr, "%s: attaching to %s: %s\n", argv[0], argv[2], strerror(errno));
		return 1;
	}
	bpf_object__close(obj);
	return 0;
}
