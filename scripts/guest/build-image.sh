#!/usr/bin/env bash
# Build the RingFence Linux test guest: a Debian 6.1 kernel plus a busybox
# initramfs that loads the virtio modules, runs a test script and powers off.
#
#   scripts/guest/build-image.sh [--force] [OUTDIR]
#   scripts/guest/build-image.sh --kernel BZIMAGE [--modules DIR | --modules-deb FILE]
#                                [--config FILE] [--force] OUTDIR
#   scripts/guest/build-image.sh --modules-deb FILE [--force] OUTDIR
#
# OUTDIR defaults to <repo>/.build-guest. Outputs:
#   OUTDIR/vmlinuz            kernel (from linux-image-6.1*-amd64, never installed)
#   OUTDIR/initramfs.cpio.gz  base initramfs (no test script inside)
#   OUTDIR/modules.txt        modules in the image, "name: deps..."
#   OUTDIR/stamp              what was built from (kernel package + version)
#   OUTDIR/kernel.txt         release=, source=, then the CONFIG_ lines that matter
#
# Your own kernel (--kernel): a bzImage; its modules from DIR (lib/modules/REL,
# or a root holding lib/modules/REL) or from a linux-image .deb (kernel taken
# from the .deb when --kernel is absent); none: virtio_blk must be built in.
# Config from --config, else boot/config-REL next to the modules, if any.
# Cached: nothing is done when the outputs exist, are newer than this script
# and were built from the same inputs (the kernel package that
# linux-image-amd64 depends on now, or the sha256 of the given files).
# Concurrent invocations are serialised with flock on OUTDIR/.lock.
# Uses only Debian packages; installs busybox-static, cpio, qemu-system-x86,
# qemu-system-common with apt-get when (and only when) they are missing.
set -euo pipefail

die() { echo "build-image: error: $*" >&2; exit 1; }
log() { echo "build-image: $*" >&2; }

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
SCRIPT_DIR="$(dirname "$SCRIPT")"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

FORCE=0
OUTDIR=""
KERNEL_IN=""
MODULES_IN=""
MODULES_DEB=""
CONFIG_IN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1; shift ;;
        --kernel) [ $# -ge 2 ] || die "--kernel needs a file"; KERNEL_IN="$2"; shift 2 ;;
        --modules) [ $# -ge 2 ] || die "--modules needs a folder"; MODULES_IN="$2"; shift 2 ;;
        --modules-deb) [ $# -ge 2 ] || die "--modules-deb needs a file"; MODULES_DEB="$2"; shift 2 ;;
        --config) [ $# -ge 2 ] || die "--config needs a file"; CONFIG_IN="$2"; shift 2 ;;
        -h|--help) sed -n '2,26p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1" ;;
        *) [ -z "$OUTDIR" ] || die "only one OUTDIR may be given"; OUTDIR="$1"; shift ;;
    esac
done
CUSTOM=0
if [ -n "$KERNEL_IN$MODULES_IN$MODULES_DEB$CONFIG_IN" ]; then
    CUSTOM=1
    [ -n "$OUTDIR" ] || die "--kernel/--modules/--modules-deb need an OUTDIR (not the default .build-guest)"
    [ -z "$MODULES_IN" ] || [ -z "$MODULES_DEB" ] || die "give --modules or --modules-deb, not both"
    [ -n "$KERNEL_IN" ] || [ -n "$MODULES_DEB" ] || die "--modules/--config need --kernel"
    for f in "$KERNEL_IN" "$MODULES_DEB" "$CONFIG_IN"; do
        [ -z "$f" ] || [ -f "$f" ] || die "not a file: $f"
    done
    [ -z "$MODULES_IN" ] || [ -d "$MODULES_IN" ] || die "not a folder: $MODULES_IN"
fi
OUTDIR="${OUTDIR:-$REPO_ROOT/.build-guest}"
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

# Modules put into the image. Their dependencies (from the .ko "depends=" field)
# are added automatically; EXTRA_DEPS covers softdeps ("pre: crypto-crc32c").
WANTED_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
virtio_blk virtio_net fuse virtiofs ext4 crc32c_generic"
declare -A EXTRA_DEPS=([jbd2]="crc32c_generic" [ext4]="crc32c_generic" [libcrc32c]="crc32c_generic")

# --- host packages ----------------------------------------------------------
need_pkgs=()
for p in busybox-static cpio qemu-system-x86 qemu-system-common; do
    st="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [ "$st" = "install ok installed" ] || need_pkgs+=("$p")
done
for tool in gzip apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || die "'$tool' not found (this script expects Debian)"
done

wait_apt_lock() {
    # Another process (e.g. a background apt-get update) may hold the lock.
    local i=0
    while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
            >/dev/null 2>&1 || pgrep -x 'apt-get|apt|dpkg' >/dev/null 2>&1; do
        [ $i -eq 0 ] && log "waiting for another apt/dpkg process to finish..."
        i=$((i + 1))
        [ $i -lt 600 ] || die "apt/dpkg lock still held after 10 minutes"
        sleep 1
    done
}

if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing packages ${need_pkgs[*]} and not root: apt-get install -y ${need_pkgs[*]}"
    log "installing ${need_pkgs[*]}"
    wait_apt_lock
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; then
        wait_apt_lock
        DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
            || die "apt-get install ${need_pkgs[*]} failed"
    fi
fi
BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then BUSYBOX="$b"; break; fi
done
if [ -z "$BUSYBOX" ]; then
    # 'file' may be absent: trust the busybox-static package's file list.
    BUSYBOX="$(dpkg -L busybox-static 2>/dev/null | grep -E '/busybox$' | head -n1 || true)"
fi
{ [ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ]; } || die "static busybox not found (package busybox-static)"

# --- resolve the kernel package -------------------------------------------------
sha() { sha256sum "$1" | cut -c1-16; }
if [ $CUSTOM -eq 1 ]; then
    KPKG="custom"
    WANT_STAMP="custom kernel=${KERNEL_IN:+$(sha "$KERNEL_IN")} deb=${MODULES_DEB:+$(sha "$MODULES_DEB")}"
    WANT_STAMP="$WANT_STAMP modules=${MODULES_IN:+$(readlink -f "$MODULES_IN")} config=${CONFIG_IN:+$(sha "$CONFIG_IN")}"
else
KPKG="$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: *\(linux-image-6\.1[^ ]*-amd64\)$/\1/p' | head -n1)"
[ -n "$KPKG" ] || die "cannot resolve linux-image-6.1*-amd64 from 'apt-cache depends linux-image-amd64' (run apt-get update?)"
KVER_PKG="$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: *//p')"
WANT_STAMP="kernel-package=$KPKG version=$KVER_PKG"
fi

# --- cache check ----------------------------------------------------------------
exec 9>"$OUTDIR/.lock"
flock 9 || die "cannot lock $OUTDIR/.lock"

up_to_date() {
    local f
    for f in vmlinuz initramfs.cpio.gz modules.txt stamp kernel.txt; do
        [ -s "$OUTDIR/$f" ] && [ "$OUTDIR/$f" -nt "$SCRIPT" ] || return 1
    done
    [ "$(head -n1 "$OUTDIR/stamp")" = "$WANT_STAMP" ]
}
if [ $FORCE -eq 0 ] && up_to_date; then
    log "up to date: $OUTDIR ($KPKG ${KVER_PKG:-})"
    exit 0
fi

# --- download and extract (never installed) ------------------------------------
WORK="$(mktemp -d "$OUTDIR/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# The release a bzImage announces: the string at 0x200 + the 16-bit pointer at 0x20E.
bzimage_release() {
    local magic off
    magic="$(dd if="$1" bs=1 skip=$((0x202)) count=4 2>/dev/null)"
    [ "$magic" = "HdrS" ] || return 1
    off="$(od -An -tu2 -j $((0x20E)) -N2 "$1" | tr -d ' ')"
    dd if="$1" bs=1 skip=$((off + 0x200)) count=256 2>/dev/null | tr '\0' '\n' | head -n1 | cut -d' ' -f1
}

MODDIR=""
KCONFIG=""
if [ $CUSTOM -eq 0 ] || [ -n "$MODULES_DEB" ]; then
    if [ $CUSTOM -eq 0 ]; then
        log "downloading $KPKG ($KVER_PKG)"
        ( cd "$WORK" && apt-get download "$KPKG" ) >"$WORK/download.log" 2>&1 \
            || { cat "$WORK/download.log" >&2; die "apt-get download $KPKG failed"; }
        DEB="$(find "$WORK" -maxdepth 1 -name '*.deb' -print -quit)"
        [ -n "$DEB" ] || die "apt-get download produced no .deb"
    else
        DEB="$MODULES_DEB"
        KPKG="$(dpkg-deb -f "$DEB" Package 2>/dev/null)" || die "$DEB is not a .deb"
        KVER_PKG="$(dpkg-deb -f "$DEB" Version 2>/dev/null || true)"
    fi
    dpkg -x "$DEB" "$WORK/x" || die "dpkg -x $DEB failed"
    VMLINUZ="$(find "$WORK/x/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)"
    if [ -n "$KERNEL_IN" ]; then
        VMLINUZ="$KERNEL_IN"
    fi
    [ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $KPKG (give --kernel)"
    KREL="$(bzimage_release "$VMLINUZ" || true)"
    [ -n "$KREL" ] || KREL="${VMLINUZ##*/vmlinuz-}"
    MODDIR="$WORK/x/lib/modules/$KREL"
    [ -d "$MODDIR" ] || die "no lib/modules/$KREL in $KPKG (kernel and package do not match)"
    KCONFIG="$WORK/x/boot/config-$KREL"
else
    VMLINUZ="$KERNEL_IN"
    KREL="$(bzimage_release "$VMLINUZ")" || die "$VMLINUZ is not a bzImage (no HdrS header)"
    [ -n "$KREL" ] || die "cannot read the release from $VMLINUZ"
    if [ -n "$MODULES_IN" ]; then
        for d in "$MODULES_IN" "$MODULES_IN/lib/modules/$KREL" "$MODULES_IN/$KREL"; do
            if [ -f "$d/modules.builtin" ] || [ -f "$d/modules.dep" ] || [ -d "$d/kernel" ]; then
                MODDIR="$(cd "$d" && pwd)"; break
            fi
        done
        [ -n "$MODDIR" ] || MODDIR="$(cd "$MODULES_IN" && pwd)"   # a plain folder of .ko files
        for c in "$MODULES_IN/boot/config-$KREL" "$MODDIR/../../../boot/config-$KREL" "$MODDIR/build/.config"; do
            if [ -f "$c" ]; then KCONFIG="$c"; break; fi
        done
    fi
    KPKG="custom kernel $(basename "$VMLINUZ")"
    KVER_PKG=""
fi
[ -z "$CONFIG_IN" ] || KCONFIG="$CONFIG_IN"
[ -n "$KCONFIG" ] || KCONFIG="$WORK/no-config"
log "kernel $KREL from $KPKG${MODDIR:+, modules from ${MODULES_IN:-${MODULES_DEB:-the package}}}"

# ext2 support: built in (EXT2_FS=y or EXT4_USE_FOR_EXT2 with EXT4_FS=y) or modules.
if [ -f "$KCONFIG" ]; then
    if grep -q '^CONFIG_EXT2_FS=m' "$KCONFIG"; then WANTED_MODULES="$WANTED_MODULES ext2"; fi
    if grep -q '^CONFIG_EXT4_FS=y' "$KCONFIG" || grep -q '^CONFIG_EXT2_FS=y' "$KCONFIG"; then
        WANTED_MODULES="$(echo "$WANTED_MODULES" | tr ' ' '\n' | grep -vx ext4 | tr '\n' ' ')"
    fi
    grep -q '^CONFIG_VIRTIO_PCI_LIB_LEGACY=m' "$KCONFIG" \
        || WANTED_MODULES="$(echo "$WANTED_MODULES" | tr ' ' '\n' | grep -vx virtio_pci_legacy_dev | tr '\n' ' ')"
fi

# --- module closure ---------------------------------------------------------------
STAGE="$WORK/root"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,mnt,etc,lib/rf-modules}

find_ko() {   # module name (underscores) -> path; file names may use '-' or '_'
    local pat="${1//_/[-_]}"
    [ -n "$MODDIR" ] || return 0
    find "$MODDIR" \( -name "$pat.ko" -o -name "$pat.ko.xz" -o -name "$pat.ko.zst" -o -name "$pat.ko.gz" \) \
        -print -quit
}
is_builtin() {
    [ -f "$MODDIR/modules.builtin" ] || return 1
    sed 's#.*/##; s/\.ko$//; s/-/_/g' "$MODDIR/modules.builtin" | grep -qx "$1"
}
ko_field() {  # ko-file field -> value of "field=" from .modinfo
    tr '\0' '\n' < "$2" | grep -a -m1 "^$1=" | cut -d= -f2- || true
}

declare -A SEEN=()
DEPS_FILE="$STAGE/lib/rf-modules/deps"
: >"$DEPS_FILE"
add_module() {
    local m="$1" top="${2:-}" f raw deps d deps_arr magic
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    if is_builtin "$m"; then log "module $m is built in"; return 0; fi
    f="$(find_ko "$m")"
    if [ -z "$f" ] && [ $CUSTOM -eq 1 ] && [ -n "$top" ]; then
        # Your own kernel may build a wanted module in, or lack an optional one.
        if [ "$m" = virtio_blk ] && [ -n "$MODDIR" ] && ! grep -q '^CONFIG_VIRTIO_BLK=y' "$KCONFIG" 2>/dev/null; then
            die "virtio_blk is neither in $MODDIR nor built in (CONFIG_VIRTIO_BLK=y)"
        fi
        log "module $m not found: assumed built in or not needed"
        return 0
    fi
    [ -n "$f" ] || die "module $m not found in $KPKG"
    case "$f" in
        *.ko.xz)  xz -dc "$f" >"$STAGE/lib/rf-modules/$m.ko" || die "xz -d $f failed" ;;
        *.ko.zst) zstd -qdc "$f" >"$STAGE/lib/rf-modules/$m.ko" || die "zstd -d $f failed" ;;
        *.ko.gz)  gzip -dc "$f" >"$STAGE/lib/rf-modules/$m.ko" || die "gzip -d $f failed" ;;
        *)        cp "$f" "$STAGE/lib/rf-modules/$m.ko" ;;
    esac
    magic="$(ko_field vermagic "$STAGE/lib/rf-modules/$m.ko" | cut -d' ' -f1)"
    [ -z "$magic" ] || [ "$magic" = "$KREL" ] || die "module $m is built for $magic, the kernel is $KREL"
    raw="$(ko_field depends "$STAGE/lib/rf-modules/$m.ko" | tr ',-' ' _')"
    deps="${EXTRA_DEPS[$m]:-} $raw"
    read -r -a deps_arr <<<"$deps"
    for d in "${deps_arr[@]}"; do add_module "$d"; done
    echo "$m: ${deps_arr[*]}" >>"$DEPS_FILE"
}
for m in $WANTED_MODULES; do add_module "$m" top; done
# Names of built-in modules (so the init can tell "built in" from "missing").
if [ -f "$MODDIR/modules.builtin" ]; then
    sed 's#.*/##; s/\.ko$//; s/-/_/g' "$MODDIR/modules.builtin" | LC_ALL=C sort -u >"$STAGE/lib/rf-modules/builtin"
else
    : >"$STAGE/lib/rf-modules/builtin"
fi

# --- busybox + init ---------------------------------------------------------------
cp "$BUSYBOX" "$STAGE/bin/busybox"
for a in $("$BUSYBOX" --list); do
    case "$a" in busybox) continue ;; esac
    [ -e "$STAGE/bin/$a" ] || ln -s busybox "$STAGE/bin/$a"
done
for a in init modprobe insmod rmmod lsmod poweroff reboot halt mdev; do
    ln -sf ../bin/busybox "$STAGE/sbin/$a"
done
# Debian's busybox has mke2fs but no mkfs.ext2 applet name.
printf '#!/bin/sh\nexec /bin/busybox mke2fs "$@"\n' >"$STAGE/sbin/mkfs.ext2"
chmod 755 "$STAGE/sbin/mkfs.ext2"
[ -e "$STAGE/sbin/mke2fs" ] || ln -s ../bin/busybox "$STAGE/sbin/mke2fs"
echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
echo "root:x:0:" >"$STAGE/etc/group"
echo "$KREL" >"$STAGE/etc/rf-kernel-release"

cat >"$STAGE/bin/modload" <<'EOF'
#!/bin/sh
# modload NAME... : insmod NAME and its dependencies (from /lib/rf-modules/deps),
# skipping modules already loaded. Exit status nonzero on the first failure.
D=/lib/rf-modules
load() {
    local n="$1" d
    [ -d "/sys/module/$n" ] && return 0
    grep -qx "$n" "$D/builtin" 2>/dev/null && return 0
    [ -f "$D/$n.ko" ] || { echo "modload: no module $n in the image" >&2; return 1; }
    for d in $(sed -n "s/^$n://p" "$D/deps"); do load "$d" || return 1; done
    [ -d "/sys/module/$n" ] && return 0
    insmod "$D/$n.ko" || { echo "modload: insmod $n failed" >&2; return 1; }
}
rc=0
for m in "$@"; do load "$(echo "$m" | tr - _)" || { rc=1; break; }; done
exit $rc
EOF
chmod 755 "$STAGE/bin/modload"

cat >"$STAGE/bin/waitdev" <<'EOF'
#!/bin/sh
# waitdev PATH [SECONDS=10] : wait until PATH exists (block devices appear async).
p="$1"; t="${2:-10}"; i=0
while [ ! -e "$p" ]; do
    [ "$i" -ge $((t * 10)) ] && { echo "waitdev: $p did not appear in ${t}s" >&2; exit 1; }
    usleep 100000; i=$((i + 1))
done
EOF
chmod 755 "$STAGE/bin/waitdev"

cat >"$STAGE/init" <<'EOF'
#!/bin/sh
# RingFence guest init. Kernel cmdline knobs:
#   rf.modules=a,b,c  modules to load before the test (default: virtio stack + virtio_blk + ext4)
#   rf.script=PATH    test script (default /test.sh, supplied as an appended initrd cpio)
#   rf.timeout=SECS   kill the test script after SECS (backstop for a host that went away)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ip link set lo up 2>/dev/null

MODULES=""
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk ext4; do
    [ -f "/lib/rf-modules/$m.ko" ] && MODULES="$MODULES $m"   # absent = built in / not configured
done
SCRIPT=/test.sh
TIMEOUT=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rf.modules=*) MODULES="$(echo "${arg#rf.modules=}" | tr , ' ')" ;;
        rf.script=*)  SCRIPT="${arg#rf.script=}" ;;
        rf.timeout=*) TIMEOUT="${arg#rf.timeout=}" ;;
    esac
done

finish() {
    sync
    echo "RINGFENCE-GUEST-RESULT: rc=$1 uptime=$(cut -d' ' -f1 /proc/uptime)"
    echo "RINGFENCE-GUEST-END"
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 5
}

echo "RINGFENCE-GUEST-START kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $MODULES; do
    if ! modload "$m"; then
        echo "RINGFENCE-GUEST-ERROR: loading module $m failed"
        finish 254
    fi
done
if [ ! -f "$SCRIPT" ]; then
    echo "RINGFENCE-GUEST-ERROR: no test script $SCRIPT (append it as a second initrd cpio)"
    finish 253
fi
chmod +x "$SCRIPT" 2>/dev/null
cd /tmp || true
if [ "$TIMEOUT" -gt 0 ] 2>/dev/null; then
    timeout -s KILL "$TIMEOUT" /bin/sh "$SCRIPT"
    rc=$?
    [ $rc -ne 137 ] || echo "RINGFENCE-GUEST-ERROR: test script killed after ${TIMEOUT}s (rf.timeout)"
else
    /bin/sh "$SCRIPT"
    rc=$?
fi
cd /
finish $rc
EOF
chmod 755 "$STAGE/init"

if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$STAGE/dev/console" c 5 1
    mknod -m 666 "$STAGE/dev/null" c 1 3
fi

# --- pack ---------------------------------------------------------------------------
log "packing initramfs ($(wc -l <"$DEPS_FILE") modules)"
( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) \
    | gzip -9n >"$WORK/initramfs.cpio.gz" || die "cpio/gzip failed"
cp "$VMLINUZ" "$WORK/vmlinuz" || die "cannot copy $VMLINUZ"
cp "$DEPS_FILE" "$WORK/modules.txt"
{ echo "$WANT_STAMP"; echo "kernel-release=$KREL"; echo "busybox=$BUSYBOX"; date -u +built=%FT%TZ; } >"$WORK/stamp"
# What the audit report names: the release and the config flags that decide how the
# kernel treats a device (virtio hardening, bounce buffers, confidential guests, checks).
{
    echo "release=$KREL"
    echo "source=$KPKG${KVER_PKG:+ $KVER_PKG}"
    echo "sha256=$(sha256sum "$VMLINUZ" | cut -d' ' -f1)"
    if [ -f "$KCONFIG" ]; then
        grep -E '^(# )?CONFIG_(VIRTIO[A-Z0-9_]*|SWIOTLB|DMA_RESTRICTED_POOL|ARCH_HAS_RESTRICTED_VIRTIO_MEMORY_ACCESS|AMD_MEM_ENCRYPT|INTEL_TDX_GUEST|BLK_DEV_INTEGRITY|HARDENED_USERCOPY|FORTIFY_SOURCE|INIT_ON_ALLOC_DEFAULT_ON|INIT_ON_FREE_DEFAULT_ON|BUG_ON_DATA_CORRUPTION|DEBUG_LIST|KASAN|UBSAN|PANIC_ON_OOPS|HUNG_TASK_PANIC|DETECT_HUNG_TASK|FUSE_FS|EXT4_FS|IKCONFIG)[= ]' "$KCONFIG" \
            | sed 's/^# \(CONFIG_[A-Z0-9_]*\) is not set$/\1=n/' | LC_ALL=C sort -u
    else
        echo "config=unknown (give --config, or a modules folder or .deb with boot/config-$KREL)"
    fi
} >"$WORK/kernel.txt"
for f in vmlinuz initramfs.cpio.gz modules.txt stamp kernel.txt; do
    mv -f "$WORK/$f" "$OUTDIR/$f"
done
log "built $OUTDIR: vmlinuz ($KREL), initramfs.cpio.gz ($(du -k "$OUTDIR/initramfs.cpio.gz" | cut -f1) KiB)"
