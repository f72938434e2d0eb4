#!/usr/bin/env bash
# Installs the system packages blkio needs, through apt, as root.
#
# libblkio (libblkio1, libblkio-dev >= 1.3) is in Debian 13 (trixie) but not in
# Debian 12 (bookworm).  On a release without it we add the next release's suite
# from the mirror this system already uses, pinned so that only libblkio comes
# from it.  Running this twice changes nothing the second time.
set -euo pipefail

PACKAGES=(libblkio1 libblkio-dev pkg-config gcc make python3-dev python3-venv
          # tests and benchmarks: vhost-user backend, loop devices, fio,
          # callgrind (the instruction budget, tests/test_instr_budget.py)
          qemu-system-common qemu-utils fio util-linux valgrind
          # guest VM for nvme / vfio-pci / vhost-vdpa tests (tests/guest)
          qemu-system-x86 busybox-static cpio kmod iproute2)
# Everything the suite needs is a command or a pkg-config module; check those
# first so that a second run does not touch apt at all.
have_all() {
    pkg-config --exists 'blkio >= 1.3.0' 2>/dev/null || return 1
    [ -f /usr/share/doc/libblkio-dev/examples/blkio-bench.c ] ||
        [ -f /usr/share/doc/libblkio-dev/examples/blkio-bench.c.gz ] || return 1
    for cmd in qemu-storage-daemon qemu-img fio losetup gcc make qemu-system-x86_64 cpio depmod vdpa valgrind; do
        command -v "$cmd" >/dev/null || return 1
    done
    [ -x /bin/busybox ] || return 1
    return 0
}

if have_all; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: missing system packages and not root;" >&2
    echo "  as root run: $0   (or install: ${PACKAGES[*]})" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

if ! apt-cache policy libblkio-dev | grep -q 'Candidate: [0-9]'; then
    # Find the Debian mirror already configured (deb822 or one-line format).
    mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
             awk '{print $2}' | grep -v security | head -n1 || true)
    if [ -z "$mirror" ]; then
        mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null |
                 awk '{print $2}' | grep -v security | head -n1 || true)
    fi
    if [ -z "$mirror" ]; then
        echo "install-system-deps: no Debian mirror found in the apt sources" >&2
        exit 1
    fi
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    cat > /etc/apt/sources.list.d/blkio-py-trixie.sources <<SRC
# Added by blkio-py scripts/install-system-deps.sh: libblkio from Debian 13.
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: $keyring
SRC
    # Nothing comes from trixie unless asked for by name below.
    cat > /etc/apt/preferences.d/blkio-py-trixie <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 1

Package: libblkio1 libblkio-dev
Pin: release n=trixie
Pin-Priority: 600
PIN
    apt-get update -qq
fi

apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
have_all || { echo "install-system-deps: packages installed but checks fail" >&2; exit 1; }
