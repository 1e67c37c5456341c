#!/usr/bin/env bash
# End-to-end check of the guest tooling against a real vhost-user-blk device
# (qemu-storage-daemon). Builds the image if needed, then:
#   1. boots with a trivial script (no device);
#   2. for num-queues=1, num-queues=2, and num-queues=2 packed=on: exports a fresh
#      64 MiB raw image (host-written signatures) through qsd; the guest checks the
#      signatures, writes and re-reads a pattern, mkfs.ext2, mounts, writes files,
#      syncs, unmounts; the host then checks the files with e2fsck/debugfs when present.
#
#   scripts/guest/selftest.sh [--keep] [--image-dir DIR]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KEEP=0
RUN_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1; shift ;;
        --image-dir) [ $# -ge 2 ] || { echo "selftest: --image-dir needs a value" >&2; exit 2; }
                     RUN_ARGS+=(--image-dir "$2"); "$SCRIPT_DIR/build-image.sh" "$2"; shift 2 ;;
        *) echo "selftest: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#RUN_ARGS[@]} -gt 0 ] || "$SCRIPT_DIR/build-image.sh"
command -v qemu-storage-daemon >/dev/null || { echo "selftest: qemu-storage-daemon not found" >&2; exit 1; }

T="$(mktemp -d "${TMPDIR:-/tmp}/ringfence-selftest.XXXXXX")"
QSD_PID=""
stop_qsd() {
    if [ -n "$QSD_PID" ]; then kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; fi
    QSD_PID=""
}
trap 'stop_qsd; [ $KEEP -eq 1 ] && echo "selftest: kept $T" >&2 || rm -rf "$T"' EXIT
fail() { echo "selftest: FAIL: $*" >&2; exit 1; }

# 1. trivial boot
echo 'echo "hello from $(uname -r)"' >"$T/trivial.sh"  # expanded in the guest
"$SCRIPT_DIR/run-guest.sh" "${RUN_ARGS[@]}" --quiet --script "$T/trivial.sh" --console "$T/trivial.log" --timeout 60 \
    || fail "trivial boot (console $T/trivial.log)"
grep -q 'hello from' "$T/trivial.log" || fail "trivial script output missing"

# 2. vhost-user-blk through qemu-storage-daemon
cat >"$T/blk.sh" <<'EOF'
set -e
waitdev /dev/vda
f=$(cat /sys/block/vda/device/features)
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), packed=$(echo "$f" | cut -c35)"
[ "$(dd if=/dev/vda bs=30 count=1 2>/dev/null)" = "RINGFENCE-SIG-0123456789abcdef" ] || { echo "bad head signature"; exit 3; }
[ "$(dd if=/dev/vda bs=4096 skip=16383 count=1 2>/dev/null | head -c 8)" = "TAIL-SIG" ] || { echo "bad tail signature"; exit 4; }
yes RINGFENCE-PATTERN | head -c 1048576 >/tmp/pat
dd if=/tmp/pat of=/dev/vda bs=65536 seek=512 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/vda bs=65536 skip=512 count=16 2>/dev/null | cmp - /tmp/pat
mkfs.ext2 -q /dev/vda >/dev/null
mkdir -p /mnt/d
mount -t ext2 /dev/vda /mnt/d
cp /tmp/pat /mnt/d/pattern.txt
echo hello-from-guest >/mnt/d/hello.txt
sync
umount /mnt/d
mount -t ext2 -o ro /dev/vda /mnt/d
cmp /mnt/d/pattern.txt /tmp/pat
umount /mnt/d
echo "blk test ok"
EOF

run_blk() {  # name run-guest-args...
    local name="$1"; shift
    local img="$T/$name.img" sock="$T/$name.sock"
    truncate -s 64M "$img"
    printf 'RINGFENCE-SIG-0123456789abcdef' | dd of="$img" conv=notrunc status=none
    printf 'TAIL-SIG' | dd of="$img" bs=4096 seek=16383 conv=notrunc status=none
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=2" \
        >"$T/$name.qsd.log" 2>&1 &
    QSD_PID=$!
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    [ -S "$sock" ] || fail "$name: qsd did not create $sock ($(cat "$T/$name.qsd.log"))"
    local rc=0
    "$SCRIPT_DIR/run-guest.sh" "${RUN_ARGS[@]}" --quiet --script "$T/blk.sh" --blk-socket "$sock" \
        --console "$T/$name.log" --timeout 90 "$@" || rc=$?
    stop_qsd
    [ $rc -eq 0 ] || fail "$name: guest rc=$rc (console $T/$name.log)"
    if command -v debugfs >/dev/null && command -v e2fsck >/dev/null; then
        e2fsck -fn "$img" >"$T/$name.fsck" 2>&1 || fail "$name: e2fsck on host failed ($T/$name.fsck)"
        [ "$(debugfs -R 'cat /hello.txt' "$img" 2>/dev/null)" = hello-from-guest ] || fail "$name: hello.txt wrong on host"
        debugfs -R "dump /pattern.txt $T/$name.pat" "$img" >/dev/null 2>&1
        cmp -s "$T/pattern" "$T/$name.pat" || fail "$name: pattern.txt wrong on host"
        host="host check ok"
    else
        host="host check skipped (no e2fsprogs)"
    fi
    echo "selftest: $name: $(grep -a '^vda:' "$T/$name.log" | tr -d '\r'); $host"
}
{ yes RINGFENCE-PATTERN || true; } | head -c 1048576 >"$T/pattern"
run_blk q1
run_blk q2 --num-queues 2
run_blk q2-packed --num-queues 2 --packed on
echo "selftest: PASS"
