#!/usr/bin/env bash
# Boot the RingFence test guest under QEMU TCG and run one test script in it.
#
#   scripts/guest/run-guest.sh --script FILE [options]
#
#   --script FILE        shell script run by the guest's busybox sh (required)
#   --blk-socket PATH    vhost-user-blk socket (repeatable; guest sees vda, vdb, ...)
#   --num-queues N       num-queues for every vhost-user-blk device (default 1)
#   --packed on|off      packed virtqueues for vhost-user-blk (default off)
#   --timeout SECONDS    kill QEMU after this long (default 120)
#   --console FILE       also write the console here (default: a temp file, removed)
#   --mem SIZE           guest RAM = shared memfd size (default 256M)
#   --modules a,b,c      modules the init loads before the test
#                        (default virtio stack + virtio_blk + ext4; see README)
#   --extra-dir DIR      copy DIR's contents into the guest root (e.g. helper binaries)
#   --append ARGS        extra kernel command line
#   --qemu-arg ARG       extra QEMU argument (repeatable, one argv word each)
#   --machine M          QEMU machine type (default q35)
#   --smp N              guest vCPUs (default: --num-queues, capped at the host's CPUs;
#                        Linux virtio_blk uses at most one queue per vCPU)
#   --image-dir DIR      image folder (default <repo>/.build-guest, env RINGFENCE_GUEST_DIR)
#   --quiet              do not copy the console to stdout
#
# Exit status: the test script's exit status when the guest printed
# "RINGFENCE-GUEST-RESULT: rc=N" and "RINGFENCE-GUEST-END"; 124 on timeout;
# 125 when the guest ended without a result line (panic, crash); 2 on usage errors.
set -euo pipefail

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
SCRIPT_DIR="$(dirname "$SCRIPT_PATH")"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

usage() { sed -n '2,28p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'; }
die() { echo "run-guest: error: $*" >&2; exit 2; }
log() { echo "run-guest: $*" >&2; }

TEST_SCRIPT=""
SOCKETS=()
NUM_QUEUES=1
PACKED=off
TIMEOUT=120
CONSOLE=""
MEM=256M
MODULES=""
EXTRA_DIR=""
APPEND_EXTRA=""
QEMU_EXTRA=()
MACHINE=q35
SMP=""
IMAGE_DIR="${RINGFENCE_GUEST_DIR:-$REPO_ROOT/.build-guest}"
QUIET=0

need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --script)     need_arg "$@"; TEST_SCRIPT="$2"; shift 2 ;;
        --blk-socket) need_arg "$@"; SOCKETS+=("$2"); shift 2 ;;
        --num-queues) need_arg "$@"; NUM_QUEUES="$2"; shift 2 ;;
        --packed)     need_arg "$@"; PACKED="$2"; shift 2 ;;
        --timeout)    need_arg "$@"; TIMEOUT="$2"; shift 2 ;;
        --console)    need_arg "$@"; CONSOLE="$2"; shift 2 ;;
        --mem)        need_arg "$@"; MEM="$2"; shift 2 ;;
        --modules)    need_arg "$@"; MODULES="$2"; shift 2 ;;
        --extra-dir)  need_arg "$@"; EXTRA_DIR="$2"; shift 2 ;;
        --append)     need_arg "$@"; APPEND_EXTRA="$2"; shift 2 ;;
        --qemu-arg)   need_arg "$@"; QEMU_EXTRA+=("$2"); shift 2 ;;
        --machine)    need_arg "$@"; MACHINE="$2"; shift 2 ;;
        --smp)        need_arg "$@"; SMP="$2"; shift 2 ;;
        --image-dir)  need_arg "$@"; IMAGE_DIR="$2"; shift 2 ;;
        --quiet)      QUIET=1; shift ;;
        -h|--help)    usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ -n "$TEST_SCRIPT" ] || die "--script FILE is required"
{ [ -f "$TEST_SCRIPT" ] && [ -r "$TEST_SCRIPT" ]; } || die "test script not readable: $TEST_SCRIPT"
[[ "$NUM_QUEUES" =~ ^[1-9][0-9]*$ ]] || die "--num-queues must be a positive integer, got '$NUM_QUEUES'"
[[ "$PACKED" == on || "$PACKED" == off ]] || die "--packed must be on or off, got '$PACKED'"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer (seconds), got '$TIMEOUT'"
if [ -z "$SMP" ]; then
    SMP=$NUM_QUEUES
    host_cpus="$(nproc 2>/dev/null || echo 1)"
    [ "$SMP" -le "$host_cpus" ] || SMP=$host_cpus
fi
[[ "$SMP" =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive integer, got '$SMP'"
[[ "$MEM" =~ ^[1-9][0-9]*[MG]$ ]] || die "--mem must look like 256M or 1G, got '$MEM'"
[[ -z "$MODULES" || "$MODULES" =~ ^[A-Za-z0-9_,-]+$ ]] || die "--modules must be a comma-separated list, got '$MODULES'"
[ -z "$EXTRA_DIR" ] || [ -d "$EXTRA_DIR" ] || die "--extra-dir is not a directory: $EXTRA_DIR"
for s in "${SOCKETS[@]}"; do
    [ -S "$s" ] || die "vhost-user socket does not exist (start the backend first): $s"
done
QEMU="$(command -v qemu-system-x86_64 || true)"
[ -n "$QEMU" ] || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86, or run build-image.sh)"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio, or run build-image.sh)"

# --- image (build only when missing or older than the builder: cheap check) ---------
BUILDER="$SCRIPT_DIR/build-image.sh"
stale=0
for f in vmlinuz initramfs.cpio.gz stamp; do
    if [ ! -s "$IMAGE_DIR/$f" ] || [ "$IMAGE_DIR/$f" -ot "$BUILDER" ]; then stale=1; fi
done
if [ $stale -eq 1 ] && [ -s "$IMAGE_DIR/vmlinuz" ] && head -n1 "$IMAGE_DIR/stamp" 2>/dev/null | grep -q '^custom '; then
    stale=0   # your own kernel (build-image.sh --kernel): rebuilt only by the audit that made it
fi
if [ $stale -eq 1 ]; then
    log "guest image missing or stale in $IMAGE_DIR: building it"
    "$BUILDER" "$IMAGE_DIR" >&2 || die "build-image.sh failed"
fi

# --- per-run initrd: base archive + appended cpio holding /test.sh ------------------
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ringfence-guest.XXXXXX")"
QPID=""
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        sleep 1
        kill -KILL "$QPID" 2>/dev/null || true
    fi
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$RUN_DIR/overlay"
if [ -n "$EXTRA_DIR" ]; then cp -a "$EXTRA_DIR"/. "$RUN_DIR/overlay/"; fi
cp "$TEST_SCRIPT" "$RUN_DIR/overlay/test.sh"
chmod 755 "$RUN_DIR/overlay/test.sh"
( cd "$RUN_DIR/overlay" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) \
    | gzip -1n >"$RUN_DIR/overlay.cpio.gz"
cat "$IMAGE_DIR/initramfs.cpio.gz" "$RUN_DIR/overlay.cpio.gz" >"$RUN_DIR/initrd"

CONSOLE_NOTE=""
if [ -z "$CONSOLE" ]; then CONSOLE="$RUN_DIR/console.log"; CONSOLE_NOTE=" (not kept: use --console FILE)"; fi
mkdir -p "$(dirname "$CONSOLE")"
: >"$CONSOLE" || die "cannot write console file $CONSOLE"

APPEND="console=ttyS0 quiet panic=-1 oops=panic rf.timeout=$TIMEOUT"
[ -z "$MODULES" ] || APPEND="$APPEND rf.modules=$MODULES"
[ -z "$APPEND_EXTRA" ] || APPEND="$APPEND $APPEND_EXTRA"

if [ $QUIET -eq 1 ]; then
    CONSOLE_DEV=(-chardev "file,id=con,path=$CONSOLE")
else
    CONSOLE_DEV=(-chardev "stdio,id=con,signal=off,logfile=$CONSOLE,logappend=on")
fi
# shellcheck disable=SC2054  # commas are QEMU option syntax
ARGS=(
    -accel tcg -M "$MACHINE" -cpu max -smp "$SMP" -m "$MEM"
    -nodefaults -no-user-config -display none -monitor none -no-reboot
    "${CONSOLE_DEV[@]}" -serial chardev:con
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$RUN_DIR/initrd" -append "$APPEND"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
)
i=0
for s in "${SOCKETS[@]}"; do
    dev="vhost-user-blk-pci,chardev=blk$i,num-queues=$NUM_QUEUES"
    [ "$PACKED" = off ] || dev="$dev,packed=on"
    ARGS+=(-chardev "socket,id=blk$i,path=$s" -device "$dev")
    i=$((i + 1))
done
ARGS+=("${QEMU_EXTRA[@]}")

# --- boot, with a watchdog -----------------------------------------------------------
START_NS=$(date +%s%N)
"$QEMU" "${ARGS[@]}" </dev/null 2>"$RUN_DIR/qemu.err" &
QPID=$!
timed_out=0
deadline=$(( START_NS / 1000000 + TIMEOUT * 1000 ))
while kill -0 "$QPID" 2>/dev/null; do
    if [ $(( $(date +%s%N) / 1000000 )) -ge $deadline ]; then
        timed_out=1
        log "timeout after ${TIMEOUT}s: killing QEMU (pid $QPID)"
        kill -TERM "$QPID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$QPID" 2>/dev/null || true
        break
    fi
    sleep 0.1
done
qrc=0
wait "$QPID" || qrc=$?
QPID=""
ELAPSED_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))

if [ -s "$RUN_DIR/qemu.err" ]; then
    sed 's/^/run-guest: qemu: /' "$RUN_DIR/qemu.err" >&2
    { echo "--- qemu stderr ---"; cat "$RUN_DIR/qemu.err"; } >>"$CONSOLE"
fi

result="$(tr -d '\r' <"$CONSOLE" | grep -a -o 'RINGFENCE-GUEST-RESULT: rc=[0-9]*' | tail -n1 || true)"
ended=0
tr -d '\r' <"$CONSOLE" | grep -a -q '^RINGFENCE-GUEST-END' && ended=1
secs="$((ELAPSED_MS / 1000)).$(printf '%03d' $((ELAPSED_MS % 1000)))"

if [ $QUIET -eq 1 ] && { [ $timed_out -eq 1 ] || [ -z "$result" ] || [ $ended -eq 0 ] \
        || [ "${result##*rc=}" != 0 ]; }; then
    log "last console lines:"
    tail -n 40 "$CONSOLE" | sed 's/^/  | /' >&2
fi
if [ $timed_out -eq 1 ]; then
    log "FAIL: guest timed out after ${secs}s (console: $CONSOLE$CONSOLE_NOTE)"
    exit 124
fi
if [ -z "$result" ] || [ $ended -eq 0 ]; then
    log "FAIL: guest ended without a result line (qemu exit $qrc, ${secs}s; console: $CONSOLE$CONSOLE_NOTE)"
    exit 125
fi
rc="${result##*rc=}"
if [ "$rc" -eq 0 ]; then
    log "PASS: test script rc=0 (${secs}s)"
else
    log "FAIL: test script rc=$rc (${secs}s; console: $CONSOLE$CONSOLE_NOTE)"
fi
[ "$rc" -le 255 ] || rc=1
exit "$rc"
