# The README's two commands: `make demo` and `make test` (as root on Debian/Ubuntu).
PY := .venv/bin/python

.PHONY: setup bpf demo test deb man docs unit lab lab-full lab-l3 golden lint bench-maglev bench-control-plane bench-compile \
	bench-ipvs-control-plane bench-netlink bench-cli-noop bench-sighup bench-metrics bench-reload

setup:
	./scripts/setup.sh

# The xdp engine's packet path (bpf/kdsr_xdp.c), compiled once for the BPF
# target; kdsr loads build/kdsr_xdp.o (or $$KDSR_XDP_OBJECT) at apply time and
# needs no compiler on the balancer.  -g keeps the BTF libbpf loads maps by.
MULTIARCH := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
bpf: build/kdsr_xdp.o build/xdp_pass.o build/xdp_drop.o
build/%.o: bpf/%.c
	@mkdir -p build
	clang -O2 -g -Wall -Werror -target bpf -I/usr/include/$(MULTIARCH) -c $< -o $@

# Build a namespace lab, apply examples/l2-web.json with the real CLI, send
# TCP and UDP flows, print the report, tear down (KEEP=1 leaves the lab up).
demo: setup
	$(PY) netns-lab/demo.py $(if $(KEEP),--keep,) $(if $(SCENARIO),--scenario $(SCENARIO),) $(if $(ENGINE),--engine $(ENGINE),)

# Unit tests (no root) and host-kernel lab tests (root, network namespaces),
# then the full-kernel tier (IPVS, ipip, gre, ip6tnl): netns-lab/guest_tier.py
# boots one virtme-ng guest on Debian's kernel when this kernel lacks them
# (nothing to do on a kernel that has them: the host tier ran those tests).
# Both tiers always run; the target fails if either failed.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests netns-lab; host=$$?; \
	$(PY) netns-lab/guest_tier.py; guest=$$?; \
	if [ $$host -ne 0 ] || [ $$guest -ne 0 ]; then \
		echo "make test: FAILED (host tier exit $$host, full-kernel tier exit $$guest)" >&2; exit 1; fi

# The Debian package, built from this checkout with debhelper and pybuild
# (debian/): build/deb/kdsr_<version>_all.deb.  Install it with
# `dpkg -i build/deb/kdsr_*.deb; apt-get -f install`.  `make test` builds,
# installs, checks and purges it (netns-lab/tests/test_package.py).
deb: setup
	./scripts/deb.sh

# kdsr(8) and kdsr-intent(5) as the package builds them, into build/man/
# (read one with `man -l build/man/kdsr.8`).
man: setup
	$(PY) scripts/man.py build/man

unit: setup
	$(PY) -m pytest -q tests

lab: setup
	$(PY) -m pytest -q netns-lab

# Only the full-kernel tier: natively on a capable kernel, else in the guest.
# Results (junit.xml, pytest.log, console.log, timings.json): lab-results/guest-tier/latest/
lab-full: setup
	$(PY) netns-lab/guest_tier.py --native-when-capable

# Only the L3 DSR scenarios (ipip, gre, ip6tnl x nft, ipvs; part of `make test`).
lab-l3: setup
	$(PY) netns-lab/guest_tier.py --native-when-capable -- netns-lab/tests/test_l3_dsr.py

# docs/intent-reference.md from the schema's descriptions (tests/test_docs.py
# fails while the committed page differs).
docs: setup
	$(PY) scripts/intent_reference.py

# Rewrite tests/golden/ from the current compiler; review the diff.
golden: setup
	$(PY) -m pytest -q tests/test_golden.py --update-golden

# Consistent-hashing bench (not a test): balance, disruption, weights,
# agreement, build time; prints a table, writes bench/results/maglev.json.
bench-maglev: setup
	$(PY) bench/maglev.py

# Control-plane bench (root; writes run in throw-away namespaces): 100, 1,000
# and 10,000 VIPs x 16 servers, step by step; writes bench/results/control_plane.json.
bench-control-plane: setup
	$(PY) bench/control_plane.py

# The same steps on the ipvs engine against the nft engine, 1,000 and 10,000
# IPVS services, in the full-kernel guest when this kernel lacks IPVS (slow:
# TCG; bounded by --budget); writes bench/results/ipvs_control_plane.json.
bench-ipvs-control-plane: setup
	$(PY) bench/ipvs_control_plane.py

# Compile scaling bench (no root): time and memory against VIPs, fitted exponent.
bench-compile: setup
	$(PY) bench/compile_scaling.py

# Links, addresses, routes and rules (root; a throw-away namespace): kdsr's
# rtnetlink code beside pyroute2 in one run; writes bench/results/netlink.json.
bench-netlink: setup
	$(PY) bench/netlink.py

# `kdsr apply` with nothing to change and a full `kdsr plan`, one process
# each, this checkout beside an older release (root; throw-away namespaces).
bench-cli-noop: setup
	$(PY) bench/cli_noop.py

# `kdsr run`: SIGHUP to the kernel's commit over weight edits, and the drift
# check's cost, this checkout beside an older release (root; throw-away namespaces).
bench-sighup: setup
	$(PY) bench/sighup_latency.py

# `kdsr run --metrics`: one scrape's time and size at 100, 1,000 and 10,000
# VIPs, this checkout beside an older release (root; throw-away namespaces).
bench-metrics: setup
	$(PY) bench/metrics_scrape.py

# `kdsr run`'s reload of an edited intent, with each incremental part left
# out in turn (no root, no kernel): why json_entries/reload/reverify are kept.
bench-reload: setup
	$(PY) bench/reload_parts.py
