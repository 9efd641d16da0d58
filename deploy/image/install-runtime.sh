#!/bin/sh
# Installs the runtime packages of the bicsi image into a Debian bookworm root: run by the
# Dockerfile's runtime stage (on debian:bookworm-slim) and by scripts/check-image-rootfs (in a
# debootstrap --variant=minbase bookworm chroot, the same base), so both get this one list.
#
# qemu-storage-daemon: in plain bookworm (qemu 7.2) it ships in qemu-system-common, which drags
# in SPICE, audio, GBM and USB libraries. In bookworm-backports (qemu 10.0) it ships in
# qemu-utils, next to qemu-img, which is also the qemu the project's development machines run.
# So we take qemu-utils from backports. Without backports, install
# `qemu-utils qemu-system-common` from bookworm instead.
#
#   qemu-utils       qemu-img, qemu-storage-daemon (FUSE/NBD exports, quorum)
#   e2fsprogs        mkfs.ext4, e2fsck, resize2fs
#   xfsprogs         mkfs.xfs, xfs_growfs
#   util-linux       blkid, findmnt, wipefs
#   mount            mount, umount, losetup
#   fuse3            fusermount3 (qemu-storage-daemon's FUSE export)
#   ca-certificates  TLS roots for backing-image downloads (rustls platform verifier)
set -eu
export DEBIAN_FRONTEND=noninteractive
MIRROR=${MIRROR:-http://deb.debian.org/debian}

echo "deb $MIRROR bookworm-backports main" \
    > /etc/apt/sources.list.d/bookworm-backports.list
apt-get update
apt-get install -y --no-install-recommends -t bookworm-backports qemu-utils
apt-get install -y --no-install-recommends \
    e2fsprogs xfsprogs util-linux mount fuse3 ca-certificates
rm -rf /var/lib/apt/lists/*
test -x /usr/bin/qemu-storage-daemon
test -x /usr/bin/qemu-img
