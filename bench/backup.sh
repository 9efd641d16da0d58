#!/usr/bin/env bash
# Backup and restore of a 1 GiB volume with 256 MiB written over a 1 GiB image (512 MiB of
# data), to a file:// target and (with S3S=path/to/s3s-fs) to a local S3 server, against
# `tar | zstd -3` of the volume's own file; then an incremental backup after 10 MiB (1% of the
# volume) more. Prints seconds and bytes; asserts nothing. Not part of bench/run (it takes
# about a minute and 3 GiB of temporary space). Needs root and a built bicsi:
#
#   BICSI=target/debug/bicsi S3S=$(command -v s3s-fs) bench/backup.sh
set -euo pipefail
B=${BICSI:-target/release/bicsi}
T=$(mktemp -d /tmp/bicsi-bench-bak.XXXX)
SP= S3P=
trap 'kill ${SP:-} ${S3P:-} 2>/dev/null; sleep 1; rm -rf --one-file-system "$T"' EXIT
mkdir -p $T/target $T/s3/bkp
$B serve --node-id bench --http-listen 127.0.0.1:0 --data-dir $T/data --csi-endpoint unix://$T/csi.sock 2>$T/log & SP=$!
for i in $(seq 100); do grep -q "bicsi serving" $T/log 2>/dev/null && [ -S $T/csi.sock ] && break; sleep 0.2; done
export BICSI_SERVER=http://$(grep "bicsi serving" $T/log | sed 's/.* http=\([^ ]*\).*/\1/') BICSI_CSI_ENDPOINT=unix://$T/csi.sock
echo "server $BICSI_SERVER"
head -c 512M /dev/urandom > $T/img.raw; truncate -s 1G $T/img.raw
$B image upload img $T/img.raw >/dev/null
$B volume create v --size 1Gi -p numberOfReplicas=1 -p backingImage=img >/dev/null
head -c 256M /dev/urandom > $T/w.bin
$B volume attach v --block $T/dev >/dev/null
dd if=$T/w.bin of=$T/dev bs=4M seek=64 oflag=direct conv=notrunc status=none
$B volume detach v >/dev/null
$B set setting backup-target file://$T/target >/dev/null
t() { local s=$(date +%s.%N); "$@" >/dev/null; echo "$(echo "$(date +%s.%N) - $s" | bc)"; }
echo "file:// first backup (image backed up too) s: $(t $B backup create v --name v-1)"
$B backup list v -o json | python3 -c 'import json,sys; [print(" ", b["name"], "uploaded", b["bytesUploaded"], "blocksUploaded", b["blocksUploaded"]) for b in json.load(sys.stdin)]'
du -sb $T/target/backingimages $T/target/backupvolumes | sed 's/^/  du /'
echo "file:// second backup, nothing changed s: $(t $B backup create v --name v-2)"
R=$(ls -d $T/data/disks/default/replicas/v-*)/volume.qcow2
echo "tar|zstd -3 of the replica file s: $(t bash -c "tar -cS -C $(dirname $R) volume.qcow2 | zstd -q -3 -T1 > $T/r.tar.zst")  size $(stat -c %s $T/r.tar.zst)"
head -c 10M /dev/urandom > $T/w2.bin
$B volume attach v --block $T/dev >/dev/null
dd if=$T/w2.bin of=$T/dev bs=1M seek=700 oflag=direct conv=notrunc status=none
$B volume detach v >/dev/null
echo "file:// incremental after 10 MiB (1%) more s: $(t $B backup create v --name v-3)"
$B backup list v -o json | python3 -c 'import json,sys; [print(" ", b["name"], "uploaded", b["bytesUploaded"], "blocksUploaded", b["blocksUploaded"]) for b in json.load(sys.stdin) if b["name"]=="v-3"]'
echo "file:// restore s: $(t $B backup restore v-3 r)"
if [ -x "${S3S:-}" ]; then
  P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  $S3S --host 127.0.0.1 --port $P --access-key k --secret-key s $T/s3 >/dev/null 2>&1 & S3P=$!
  sleep 1
  printf 'AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n' > $T/creds
  $B set setting backup-target-credential-file $T/creds >/dev/null
  $B set setting backup-target "s3://bkp/p?endpoint=http://127.0.0.1:$P&path-style=true" >/dev/null
  echo "s3 first backup (image too) s: $(t $B backup create v --name s-1)"
  echo "s3 restore s: $(t $B backup restore s-1 r2)"
fi
