#!/usr/bin/env bash
# Run the upstream CSI conformance suite (csi-sanity) against `bicsi serve`:
# once with mount volumes, once with block volumes.
#
# Usage: csi-sanity/run.sh [--backing-image] [--snapshot-type snap|bi] [--keep]
#                          [-- CSI_SANITY_ARGS...]
#
#   --backing-image  create every test volume from a backing image: serve a
#                    small raw image on 127.0.0.1 and use
#                    params-backing-image.yaml instead of params.yaml (the
#                    snapshot, clone and restore tests then keep that image)
#   --snapshot-type  the snapshot parameters csi-sanity's snapshot tests pass:
#                    snap (default, params-snapshot.yaml: kept on the volume's
#                    disks) or bi (params-snapshot-bi.yaml: each snapshot also
#                    exported as a backing image)
#   --keep           keep the temporary directory (data dir, mounts removed)
#   -- ARGS          passed to csi-sanity, e.g. -- --ginkgo.focus=NodeStage
#
# Environment:
#   CSI_SANITY   path to csi-sanity (default: ../shared/tools/csi-sanity next to
#                the repository when it exists, else found on PATH or in Go's
#                bin dir)
#   MAX_VOLUMES_PER_NODE  the attach limit bicsi serve runs with, which
#                csi-sanity's --csi.testnodevolumeattachlimit spec fills
#                (default 4)
#   BICSI_BIN    path to a built bicsi (default: cargo build --release)
#   SANITY_OUT   where logs and JUnit reports go (default: target/csi-sanity)
#   TMPDIR       where the temporary directory goes (default /tmp; avoid a
#                tmpfs if bicsi opens images with O_DIRECT)
#
# Needs root: the node tests attach loop devices and mount filesystems.
#   cargo build --release
#   sudo BICSI_BIN="$PWD/target/release/bicsi" csi-sanity/run.sh

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'run.sh: error: %s\n' "$*" >&2
    exit 1
}

BACKING_IMAGE=0
SNAPSHOT_TYPE=snap
MAX_VOLUMES_PER_NODE=${MAX_VOLUMES_PER_NODE:-4}
KEEP=0
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --backing-image) BACKING_IMAGE=1 ;;
    --snapshot-type)
        [[ $# -ge 2 ]] || die "--snapshot-type needs a value: snap or bi"
        SNAPSHOT_TYPE=$2
        shift
        ;;
    --keep) KEEP=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        EXTRA_ARGS=("$@")
        break
        ;;
    *)
        printf 'run.sh: unknown argument: %s\n\n' "$1" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
done

# ---------------------------------------------------------------- checks

find_csi_sanity() {
    if [[ -n "${CSI_SANITY:-}" ]]; then
        [[ -x "$CSI_SANITY" ]] || die "CSI_SANITY=$CSI_SANITY is not an executable file"
        printf '%s\n' "$CSI_SANITY"
        return
    fi
    # The project's pinned build (../shared/tools/README.md): v5.3.1, CSI spec v1.10.0.
    if [[ -x "$REPO/../shared/tools/csi-sanity" ]]; then
        printf '%s\n' "$(cd "$REPO/../shared/tools" && pwd)/csi-sanity"
        return
    fi
    if command -v csi-sanity >/dev/null 2>&1; then
        command -v csi-sanity
        return
    fi
    local dir
    for dir in "${GOBIN:-}" "${GOPATH:-$HOME/go}/bin"; do
        if [[ -n "$dir" && -x "$dir/csi-sanity" ]]; then
            printf '%s\n' "$dir/csi-sanity"
            return
        fi
    done
    cat >&2 <<'EOF'
run.sh: error: csi-sanity not found (looked at $CSI_SANITY, ../shared/tools/csi-sanity,
PATH, $GOBIN, $GOPATH/bin).
Install it on a machine with Go (it is a static binary, copy it over if needed):
    go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest
then put it on PATH or run with CSI_SANITY=/path/to/csi-sanity.
EOF
    exit 1
}

CSI_SANITY_BIN=$(find_csi_sanity)
log "csi-sanity: $CSI_SANITY_BIN"

if [[ $EUID -ne 0 ]]; then
    die "run as root: csi-sanity's node tests make bicsi attach loop devices and mount filesystems.
    cargo build --release && sudo BICSI_BIN=\"$REPO/target/release/bicsi\" $0"
fi
[[ -e /dev/fuse ]] || log "warning: /dev/fuse is missing; qemu-storage-daemon's FUSE export will fail (modprobe fuse)"
[[ -e /dev/loop-control ]] || log "warning: /dev/loop-control is missing; loop devices will fail (modprobe loop)"

# ---------------------------------------------------------------- build

build_bicsi() {
    local target_dir=${CARGO_TARGET_DIR:-target}
    [[ "$target_dir" == /* ]] || target_dir="$REPO/$target_dir"
    local cargo
    cargo=$(command -v cargo 2>/dev/null || true)
    if [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
        # Build as the user who ran sudo, so target/ does not fill up with
        # root-owned files that break their next build.
        local user_home
        user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        [[ -n "$cargo" ]] || cargo="$user_home/.cargo/bin/cargo"
        [[ -x "$cargo" ]] || die "cargo not found; build bicsi first and set BICSI_BIN=/path/to/bicsi"
        log "building bicsi as $SUDO_USER (cargo build --release)"
        (cd "$REPO" && sudo -H -u "$SUDO_USER" env "PATH=$(dirname "$cargo"):$PATH" \
            ${CARGO_TARGET_DIR:+"CARGO_TARGET_DIR=$CARGO_TARGET_DIR"} \
            "$cargo" build --release --bin bicsi) ||
            die "cargo build failed; build bicsi yourself and set BICSI_BIN=/path/to/bicsi"
    else
        [[ -n "$cargo" ]] || die "cargo not found; build bicsi first and set BICSI_BIN=/path/to/bicsi"
        log "building bicsi (cargo build --release)"
        (cd "$REPO" && "$cargo" build --release --bin bicsi)
    fi
    BICSI_BIN="$target_dir/release/bicsi"
}

if [[ -n "${BICSI_BIN:-}" ]]; then
    [[ -x "$BICSI_BIN" ]] || die "BICSI_BIN=$BICSI_BIN is not an executable file"
else
    build_bicsi
fi
log "bicsi: $BICSI_BIN"

SANITY_OUT=${SANITY_OUT:-$REPO/target/csi-sanity}
if [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
    # Reports belong to the user who ran sudo (and target/ must stay theirs).
    sudo -u "$SUDO_USER" mkdir -p "$SANITY_OUT" 2>/dev/null || mkdir -p "$SANITY_OUT"
else
    mkdir -p "$SANITY_OUT"
fi
rm -f "$SANITY_OUT"/junit-*.xml "$SANITY_OUT"/csi-sanity-*.log "$SANITY_OUT"/bicsi.log

# ---------------------------------------------------------------- temp dir and cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bicsi-sanity.XXXXXX")
SOCK="$TMP/csi.sock"
# sockaddr_un.sun_path holds 107 bytes plus the NUL.
((${#SOCK} <= 107)) || die "socket path $SOCK is too long for a unix socket; set a shorter TMPDIR"

BICSI_PID=""
HTTP_PID=""

# Fields of /proc/PID/stat after "pid (comm) ": state ppid pgrp ...
proc_stat() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    printf '%s\n' "${stat##*) }"
}

# True while the process runs; false once it has exited, even before it is
# reaped (kill -0 still succeeds on a zombie).
alive() {
    local state _
    read -r state _ < <(proc_stat "$1") || return 1
    [[ "$state" != Z ]]
}

stop_bicsi() {
    [[ -n "$BICSI_PID" ]] || return 0
    local i
    if alive "$BICSI_PID"; then
        kill -TERM "$BICSI_PID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            alive "$BICSI_PID" || break
            sleep 0.1
        done
    fi
    # bicsi leads its own process group (setsid, so pgid == its pid); stop
    # whatever it left running there (qemu-storage-daemon). The kernel does
    # not hand out a pid that is still some live process's group id, so this
    # reaches only processes bicsi started.
    if kill -0 -- "-$BICSI_PID" 2>/dev/null; then
        kill -TERM -- "-$BICSI_PID" 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do
            kill -0 -- "-$BICSI_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$BICSI_PID" 2>/dev/null || true
    fi
    wait "$BICSI_PID" 2>/dev/null || true
    BICSI_PID=""
}

# Unmount everything left under $TMP and detach loop devices backed by files
# there, so that removing $TMP can never reach into a mounted volume.
release_tmp() {
    local pass m dev back
    for pass in 1 2; do
        # Deepest first; one line per stacked mount. /proc/self/mounts
        # escapes spaces, and $TMP has none.
        while read -r m; do
            if [[ $pass == 1 ]]; then
                umount "$m" 2>/dev/null || true
            else
                umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null ||
                    log "warning: could not unmount $m"
            fi
        done < <(awk -v p="$TMP/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
        if [[ $pass == 1 ]] && command -v losetup >/dev/null 2>&1; then
            while read -r dev back; do
                [[ "$back" == "$TMP/"* ]] || continue
                losetup -d "$dev" 2>/dev/null || log "warning: could not detach $dev ($back)"
            done < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null || true)
        fi
    done
}

cleanup() {
    local rc=$?
    set +e
    stop_bicsi
    if [[ -n "$HTTP_PID" ]]; then
        kill "$HTTP_PID" 2>/dev/null
        wait "$HTTP_PID" 2>/dev/null
    fi
    release_tmp
    [[ -f "$TMP/bicsi.log" ]] && cp "$TMP/bicsi.log" "$SANITY_OUT/bicsi.log"
    if [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
        chown -R "$SUDO_USER:" "$SANITY_OUT" 2>/dev/null
    fi
    if [[ $KEEP == 1 ]]; then
        log "kept $TMP"
    else
        # --one-file-system: skip anything that is still mounted.
        rm -rf --one-file-system "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- bicsi

start_bicsi() {
    mkdir -p "$TMP/data"
    rm -f "$SOCK"
    log "starting bicsi serve (log: $TMP/bicsi.log)"
    # setsid: own process group, so cleanup can stop its children too, and a
    # Ctrl-C in the terminal reaches the script's trap, not bicsi directly.
    setsid "$BICSI_BIN" serve \
        --data-dir "$TMP/data" \
        --csi-endpoint "unix://$SOCK" \
        --http-listen 127.0.0.1:0 \
        --node-id sanity-node \
        --max-volumes-per-node "$MAX_VOLUMES_PER_NODE" \
        >>"$TMP/bicsi.log" 2>&1 </dev/null &
    BICSI_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S "$SOCK" ]] && return 0
        if ! alive "$BICSI_PID"; then
            tail -n 40 "$TMP/bicsi.log" >&2
            die "bicsi exited before it created $SOCK (log above)"
        fi
        sleep 0.1
    done
    die "bicsi did not create $SOCK within 30 s (log: $TMP/bicsi.log)"
}

# ---------------------------------------------------------------- backing image

PARAMS="$HERE/params.yaml"
case "$SNAPSHOT_TYPE" in
snap) SNAPSHOT_PARAMS="$HERE/params-snapshot.yaml" ;;
bi) SNAPSHOT_PARAMS="$HERE/params-snapshot-bi.yaml" ;;
*) die "--snapshot-type $SNAPSHOT_TYPE: use snap or bi" ;;
esac

setup_backing_image() {
    command -v qemu-img >/dev/null 2>&1 || die "--backing-image needs qemu-img (qemu-utils)"
    command -v python3 >/dev/null 2>&1 || die "--backing-image needs python3 (for http.server)"
    local dir="$TMP/images" i
    mkdir -p "$dir"
    # Small next to the 64 MiB test volumes; a marker so it is not all holes.
    qemu-img create -q -f raw "$dir/image.raw" 8M
    printf 'bicsi csi-sanity backing image\n' |
        dd of="$dir/image.raw" bs=1 seek=1048576 conv=notrunc status=none
    local sha512
    sha512=$(sha512sum "$dir/image.raw" | cut -d' ' -f1)

    # Port 0: the kernel picks a free port; http.server prints it.
    python3 -u -m http.server --bind 127.0.0.1 --directory "$dir" 0 \
        >"$TMP/http.log" 2>&1 </dev/null &
    HTTP_PID=$!
    local port=""
    for ((i = 0; i < 100; i++)); do
        port=$(sed -n 's/.* port \([0-9][0-9]*\).*/\1/p' "$TMP/http.log" 2>/dev/null | head -n 1) || true
        [[ -n "$port" ]] && break
        alive "$HTTP_PID" || {
            cat "$TMP/http.log" >&2
            die "python3 -m http.server exited"
        }
        sleep 0.1
    done
    [[ -n "$port" ]] || die "python3 -m http.server did not report its port (log: $TMP/http.log)"
    log "serving $dir/image.raw at http://127.0.0.1:$port/image.raw"

    sed -e '/^[[:space:]]*#/d' \
        -e "s|\${IMAGE_PORT}|$port|g" -e "s|\${IMAGE_SHA512}|$sha512|g" \
        "$HERE/params-backing-image.yaml" >"$TMP/params-backing-image.yaml"
    if grep '\${' "$TMP/params-backing-image.yaml" >/dev/null; then
        die "params-backing-image.yaml has a placeholder run.sh does not fill"
    fi
    PARAMS="$TMP/params-backing-image.yaml"
}

# ---------------------------------------------------------------- run

run_sanity() {
    local mode=$1 dir="$TMP/$1" rc=0
    # csi-sanity creates (mkdir, not mkdir -p) and removes the target and
    # staging directories around every test; their parent must exist.
    mkdir -p "$dir"
    if ! alive "$BICSI_PID"; then
        log "bicsi is not running (it crashed, see $SANITY_OUT/bicsi.log); restarting it"
        stop_bicsi
        start_bicsi
    fi
    log "csi-sanity, $mode volumes"
    "$CSI_SANITY_BIN" \
        --csi.endpoint="unix://$SOCK" \
        --csi.testvolumeparameters="$PARAMS" \
        --csi.testsnapshotparameters="$SNAPSHOT_PARAMS" \
        --csi.testvolumeaccesstype="$mode" \
        --csi.testvolumesize=67108864 \
        --csi.testnodevolumeattachlimit \
        --csi.mountdir="$dir/target" \
        --csi.stagingdir="$dir/staging" \
        --ginkgo.junit-report="$SANITY_OUT/junit-$mode.xml" \
        ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
        2>&1 | tee "$SANITY_OUT/csi-sanity-$mode.log" || rc=$?
    return "$rc"
}

[[ $BACKING_IMAGE == 1 ]] && setup_backing_image
log "volume parameters: $PARAMS"
log "snapshot parameters: $SNAPSHOT_PARAMS"
start_bicsi

declare -A RESULT
FAILED=0
for mode in mount block; do
    start=$SECONDS
    if run_sanity "$mode"; then
        RESULT[$mode]="PASS"
    else
        RESULT[$mode]="FAIL (csi-sanity exit $?)"
        FAILED=1
    fi
    # Ginkgo's last word: "SUCCESS! -- 91 Passed | 0 Failed | 1 Pending | 0 Skipped".
    # (Its colours stripped first.)
    counts=$(sed 's/\x1b\[[0-9;]*m//g' "$SANITY_OUT/csi-sanity-$mode.log" |
        grep -Eo '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' |
        tail -n 1 || true)
    RESULT[$mode]="${RESULT[$mode]}: ${counts:-no spec counts in the log}, $((SECONDS - start)) s"
    if ! alive "$BICSI_PID"; then
        RESULT[$mode]="${RESULT[$mode]}, bicsi exited during the run"
        FAILED=1
    fi
done

variant="plain volumes"
[[ $BACKING_IMAGE == 1 ]] && variant="volumes from a backing image"
variant="$variant, $SNAPSHOT_TYPE snapshots"
printf '\n==================== csi-sanity summary (%s) ====================\n' "$variant"
for mode in mount block; do
    printf '  %-6s %s\n' "$mode" "${RESULT[$mode]}"
done
printf '  logs and JUnit reports: %s\n' "$SANITY_OUT"
exit "$FAILED"
