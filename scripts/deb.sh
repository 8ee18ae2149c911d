#!/usr/bin/env bash
# `make deb`: the Debian package from this checkout, with Debian's own tools
# (dpkg-buildpackage, debhelper, pybuild; debian/).  The checkout's files
# (tracked, and new ones git does not ignore) are copied to build/deb/ and
# built there, so the checkout stays clean.  Writes
# build/deb/kdsr_<version>_all.deb and prints its path on the last line;
# the build's log is build/deb/build.log.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(dpkg-parsechangelog -S Version)
out=build/deb
src="$out/kdsr-$version"
rm -rf "$out"
mkdir -p "$src"

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
        done |
        tar --null -T - -cf - | tar -xf - -C "$src"
else
    tar --exclude=./build --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$src"
fi

# The distribution's tools and interpreter only, as in a build chroot: not a
# venv's python, a pyenv shim or a PYTHONPATH of the caller.
clean_env=(env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin)
if ! (cd "$src" && "${clean_env[@]}" dpkg-buildpackage -b --no-sign) >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    echo "make deb: dpkg-buildpackage failed; the whole log is $out/build.log" >&2
    exit 1
fi
rm -rf "$src"
ls "$PWD/$out/kdsr_${version}_all.deb"
