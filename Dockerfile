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
 && install -D -s -m 0755 target/release/bicsi /out/bicsi

############################ runtime ############################
FROM debian:bookworm-slim

# The packages (qemu-utils 10 from bookworm-backports for qemu-img and
# qemu-storage-daemon, e2fsprogs, xfsprogs, util-linux, mount, fuse3,
# ca-certificates) and why each is there: deploy/image/install-runtime.sh. It is
# the one list: scripts/check-image-rootfs runs the same script in a
# debootstrap'd bookworm minbase chroot and smoke-tests bicsi there.
COPY deploy/image/install-runtime.sh /tmp/install-runtime.sh
RUN sh /tmp/install-runtime.sh && rm /tmp/install-runtime.sh

COPY --from=builder /out/bicsi /usr/local/bin/bicsi

# No USER: the node and engine roles need root (loop devices, mounts, FUSE). The
# controller Deployment drops every capability in its securityContext.
ENTRYPOINT ["/usr/local/bin/bicsi"]
CMD ["serve"]
