#!/usr/bin/env bash
# Install everything kdsr and its lab need on a fresh Debian/Ubuntu machine,
# then make the project's venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=(nftables python3-nftables python3-venv iproute2 tcpdump ipvsadm bird2 keepalived)
# The xdp engine: clang/llvm compile bpf/kdsr_xdp.c for the BPF target (here,
# not on the balancer at run time), libbpf-dev has its headers, libbpf1 (a
# dependency) loads it and bpftool finds kdsr's program and maps.
need_pkgs+=(clang llvm libbpf-dev bpftool dpkg-dev)
# `make deb` (debian/control's Build-Depends) and the package check in
# `make test` (netns-lab/tests/test_package.py: `man -w`, `systemd-analyze`;
# kdsr.service under systemd in a lab namespace: systemd-nspawn).
need_pkgs+=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
    python3-click python3-jsonschema python3-yaml man-db systemd systemd-container)
missing=()
for p in "${need_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# The full-kernel lab tier (netns-lab/guest_tier.py) boots Debian's kernel in
# a virtme-ng guest under qemu when this kernel lacks ip_vs/ipip/gre/ip6tnl;
# busybox-static builds the guest's initramfs. Asked for only on such a kernel
# (on one that has them, the full-kernel tests run natively).
guest_pkgs=(qemu-system-x86 linux-image-amd64 busybox-static)
guest_missing=()
for p in "${guest_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || guest_missing+=("$p")
done
if [ ${#guest_missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: note: the full-kernel lab tier needs ${guest_missing[*]}; run as root to install them" >&2
    elif ! /usr/bin/python3 netns-lab/fullkernel.py --quiet; then
        missing+=("${guest_missing[@]}")
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing packages ${missing[*]}; run as root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv is made from the distribution's interpreter so that
# --system-site-packages exposes python3-nftables (libnftables' JSON API).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# The click check: the system's python3-click (8.1 on bookworm, a build
# dependency of the package) is visible in the venv and would do for kdsr,
# not for the tests (pyproject.toml's test extra asks for 8.2).
if ! .venv/bin/python -c 'import kdsr, click, jsonschema, jsonschema_rs, pyroute2, yaml, pytest, hypothesis, virtme_ng
from importlib.metadata import version
assert tuple(int(n) for n in version("click").split(".")[:2]) >= (8, 2)' 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,lab]'
fi

# The xdp engine's BPF object (make bpf): build/kdsr_xdp.o.
make -s bpf
