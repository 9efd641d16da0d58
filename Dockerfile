# syntax=docker/dockerfile:1
#
# bicsi container image: one binary, `bicsi`, plus the tools its data path
# shells out to (qemu-img, qemu-storage-daemon, mkfs/resize tools, losetup,
# blkid, mount, fusermount3).
#
#   docker build -t bicsi:latest .
#
# The cache mounts below need BuildKit (the default builder since Docker 23;
# podman/buildah understand them too).

############################ builder ############################
FROM rust:1-bookworm AS builder

WORKDIR /src
COPY . .

# target/ is a cache mount, so a target/ directory copied in from the host
# checkout is shadowed and never reused. The binary is copied out of the
# cache mount because cache mounts are not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bicsi \
 && install -D -m 0755 target/release/bicsi /out/bicsi

############################ runtime ############################
FROM debian:bookworm-slim

# qemu-storage-daemon: in plain bookworm (qemu 7.2) it ships in
# qemu-system-common, which drags in SPICE, audio, GBM and USB libraries. In
# bookworm-backports (qemu 10.0) it ships in qemu-utils, next to qemu-img,
# which is also the qemu the project's development machines run. So we take
# qemu-utils from backports. Without backports, install
# `qemu-utils qemu-system-common` from bookworm instead.
#
#   qemu-utils   qemu-img, qemu-storage-daemon (FUSE/NBD exports, quorum)
#   e2fsprogs    mkfs.ext4, resize2fs
#   xfsprogs     mkfs.xfs, xfs_growfs
#   util-linux   blkid, findmnt, wipefs
#   mount        mount, umount, losetup
#   fuse3        fusermount3 (qemu-storage-daemon's FUSE export)
#   ca-certificates  TLS roots for backing-image downloads (rustls platform verifier)
RUN set -eux; \
    echo 'deb http://deb.debian.org/debian bookworm-backports main' \
        > /etc/apt/sources.list.d/bookworm-backports.list; \
    apt-get update; \
    apt-get install -y --no-install-recommends -t bookworm-backports qemu-utils; \
    apt-get install -y --no-install-recommends \
        e2fsprogs xfsprogs util-linux mount fuse3 ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    test -x /usr/bin/qemu-storage-daemon; \
    test -x /usr/bin/qemu-img

COPY --from=builder /out/bicsi /usr/local/bin/bicsi

# No USER: the node and engine roles need root (loop devices, mounts, FUSE). The
# controller Deployment drops every capability in its securityContext.
ENTRYPOINT ["/usr/local/bin/bicsi"]
CMD ["serve"]
