#!/usr/bin/env bash
# Builds (once) the Debian 12 root filesystem that the booted packaging lab boots with
# systemd-nspawn: minbase + systemd, sshd and python3-apt (Ansible's apt module), nothing else.
#
#   tests/packaging/rootfs.sh [DIR]     (default: target/weft-lab/rootfs)
#
# The rootfs is built once and then reused: a finished build leaves DIR/.weft-rootfs-ok, and a
# later call returns at once. Hosts never write to it: each booted host gets its own overlay.
# The mirror is the one apt uses on this machine (/etc/apt/sources.list[.d]); set
# WEFT_DEBIAN_MIRROR to override it. Needs root and the Debian package `debootstrap`.
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=${1:-target/weft-lab/rootfs}
stamp="$dir/.weft-rootfs-ok"
# Bump when the package list below changes, so an old cache is rebuilt.
recipe=3
if [[ -f "$stamp" && "$(cat "$stamp")" == "$recipe" ]]; then
  echo "rootfs: reusing $dir"
  exit 0
fi

command -v debootstrap >/dev/null || { echo "rootfs: needs debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }

mirror=${WEFT_DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
  # deb822 sources first (Debian 12 default), then one-line sources.
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
fi
if [[ -z "$mirror" ]]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
fi
[[ -n "$mirror" ]] || { echo "rootfs: no Debian mirror found in apt sources; set WEFT_DEBIAN_MIRROR" >&2; exit 1; }

tmp="$dir.tmp"
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"
started=$(date +%s)
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,iproute2,procps,curl,ca-certificates \
  bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || { tail -n 30 "$tmp.log" >&2; exit 1; }

# Trim what no lab host needs: the downloaded archives, docs, man pages.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/*
# Lab hosts have no way out: apt must never try the network there.
: >"$tmp/etc/apt/sources.list"
# Each booted host writes its own machine-id and hostname; an empty machine-id is what
# systemd expects of an image.
: >"$tmp/etc/machine-id"
# Units that only slow a container boot or wait for things a lab host lacks.
for unit in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
# Key-only root login from the controller; no DNS lookups on connect.
mkdir -p "$tmp/etc/ssh/sshd_config.d"
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
  >"$tmp/etc/ssh/sshd_config.d/weft-lab.conf"
install -d -m 0700 "$tmp/root/.ssh"

rm -rf "$dir"
mv "$tmp" "$dir"
rm -f "$tmp.log"
echo "$recipe" >"$stamp"
echo "rootfs: built $dir in $(( $(date +%s) - started )) s ($(du -sh "$dir" | cut -f1))"
