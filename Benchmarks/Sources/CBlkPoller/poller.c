// The trusting C busy-polling vhost-user-blk driver (see CBlkPoller.h). Written from the
// virtio 1.2 spec, 2.7 "Split Virtqueues" and 5.2 "Block Device", and QEMU's
// docs/interop/vhost-user.rst. Trusting by design: it never checks what the back-end
// writes (used ids, lengths, status) beyond counting a non-OK status as an error.
#include "CBlkPoller.h"

#include <errno.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

// vhost-user.rst, "Front-end message types".
enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_SET_MEM_TABLE = 5,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24,
};
#define VU_VERSION 0x1u
#define VU_F_PROTOCOL_FEATURES (1ull << 30)
#define VU_PROTOCOL_F_CONFIG (1ull << 9)
#define F_VERSION_1 (1ull << 32)
#define F_EVENT_IDX (1ull << 29)

struct vu_msg {
    uint32_t request, flags, size;
    union {
        uint64_t u64;
        struct {
            uint32_t index, num;
        } state;
        struct {
            uint32_t index, flags;
            uint64_t desc, used, avail, log;
        } addr;
        struct {
            uint32_t nregions, padding;
            uint64_t guest_addr, size, user_addr, mmap_offset;
        } mem;
        struct {
            uint32_t offset, size, flags;
            uint8_t region[256];
        } config;
    } payload;
} __attribute__((packed));

static int fail(struct cblk_result *out, const char *what) {
    out->error = 1;
    snprintf(out->message, sizeof out->message, "%s: %s", what, errno ? strerror(errno) : "failed");
    return -1;
}

// Sends a message with `size` bytes of payload and an optional descriptor.
static int vu_send(int sock, uint32_t request, const void *payload, uint32_t size, int fd) {
    struct vu_msg m;
    memset(&m, 0, sizeof m);
    m.request = request;
    m.flags = VU_VERSION;
    m.size = size;
    if (size) memcpy(&m.payload, payload, size);
    struct iovec iov = {&m, 12 + size};
    char control[CMSG_SPACE(sizeof(int))];
    struct msghdr h = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(control, 0, sizeof control);
        h.msg_control = control;
        h.msg_controllen = sizeof control;
        struct cmsghdr *c = CMSG_FIRSTHDR(&h);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    return sendmsg(sock, &h, MSG_NOSIGNAL) == (ssize_t)(12 + size) ? 0 : -1;
}

// Reads one reply into `m` (header, then its payload).
static int vu_reply(int sock, struct vu_msg *m) {
    if (recv(sock, m, 12, MSG_WAITALL) != 12 || m->size > sizeof m->payload) return -1;
    if (m->size && recv(sock, &m->payload, m->size, MSG_WAITALL) != (ssize_t)m->size) return -1;
    return 0;
}

static int vu_u64(int sock, uint32_t request, uint64_t *value) {
    struct vu_msg m;
    if (vu_send(sock, request, NULL, 0, -1) || vu_reply(sock, &m) || m.request != request) return -1;
    *value = m.payload.u64;
    return 0;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

// Per slot: the request header, then (64 bytes in) the status byte.
struct slot_meta {
    struct virtio_blk_outhdr header;
    uint8_t pad[48];
    uint8_t status;
    uint8_t pad2[63];
};

int cblk_poll_run(const char *socket_path, int depth, int block_size, double warmup, double seconds, uint64_t seed,
                  uint32_t *latencies, size_t capacity, struct cblk_result *out) {
    memset(out, 0, sizeof *out);
    errno = 0;
    if (depth < 1 || depth > 256 || block_size < 512 || block_size % 512) return fail(out, "bad arguments");
    unsigned n = 128;
    while (n < 3u * (unsigned)depth) n *= 2;

    // One memfd region: descriptor table, available ring, used ring, slots, data.
    size_t desc_off = 0, avail_off = 16 * n, used_off = (avail_off + 6 + 2 * n + 4095) & ~(size_t)4095;
    size_t meta_off = (used_off + 6 + 8 * n + 4095) & ~(size_t)4095;
    size_t data_off = (meta_off + sizeof(struct slot_meta) * (size_t)depth + 4095) & ~(size_t)4095;
    size_t total = (data_off + (size_t)block_size * (size_t)depth + 4095) & ~(size_t)4095;

    int sock = -1, memfd = -1, kick = -1, call = -1, rc = -1;
    uint8_t *mem = MAP_FAILED;
    uint64_t *started = calloc((size_t)depth, sizeof(uint64_t));
    if (!started) return fail(out, "calloc");

    memfd = memfd_create("cblk-poller", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)total)) {
        fail(out, "memfd");
        goto done;
    }
    mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED) {
        fail(out, "mmap");
        goto done;
    }
    memset(mem, 0, total);
    struct vring_desc *desc = (struct vring_desc *)(mem + desc_off);
    struct vring_avail *avail = (struct vring_avail *)(mem + avail_off);
    struct vring_used *used = (struct vring_used *)(mem + used_off);
    struct slot_meta *meta = (struct slot_meta *)(mem + meta_off);
    uint8_t *data = mem + data_off;
    // The event-index words after each ring (spec 2.7.7.1, 2.7.10).
    volatile uint16_t *used_event = &avail->ring[n];
    volatile uint16_t *avail_event = (volatile uint16_t *)&used->ring[n];
    // Guest "physical" addresses are our virtual addresses (one identity-mapped region).
    uint64_t base = (uint64_t)(uintptr_t)mem;

    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", socket_path);
    if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof sa)) {
        fail(out, "connect");
        goto done;
    }
    kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    // Handshake: features, owner, memory, the ring, then the config (whose reply also
    // shows that every message before it was handled).
    uint64_t features = 0, protocol = 0;
    if (kick < 0 || call < 0 || vu_u64(sock, VU_GET_FEATURES, &features)) {
        fail(out, "GET_FEATURES");
        goto done;
    }
    uint64_t wanted = F_VERSION_1 | VU_F_PROTOCOL_FEATURES | F_EVENT_IDX;
    if ((features & wanted) != wanted) {
        fail(out, "back-end lacks VERSION_1, EVENT_IDX or PROTOCOL_FEATURES");
        goto done;
    }
    if (vu_send(sock, VU_SET_FEATURES, &wanted, 8, -1) || vu_u64(sock, VU_GET_PROTOCOL_FEATURES, &protocol) ||
        !(protocol & VU_PROTOCOL_F_CONFIG)) {
        fail(out, "feature negotiation");
        goto done;
    }
    uint64_t pf = VU_PROTOCOL_F_CONFIG;
    struct vu_msg m;
    m.payload.mem.nregions = 1;
    m.payload.mem.padding = 0;
    m.payload.mem.guest_addr = base;
    m.payload.mem.size = total;
    m.payload.mem.user_addr = base;
    m.payload.mem.mmap_offset = 0;
    if (vu_send(sock, VU_SET_PROTOCOL_FEATURES, &pf, 8, -1) || vu_send(sock, VU_SET_OWNER, NULL, 0, -1) ||
        vu_send(sock, VU_SET_MEM_TABLE, &m.payload.mem, 40, memfd)) {
        fail(out, "SET_MEM_TABLE");
        goto done;
    }
    m.payload.state.index = 0;
    m.payload.state.num = n;
    if (vu_send(sock, VU_SET_VRING_NUM, &m.payload.state, 8, -1)) goto handshake;
    m.payload.state.num = 0;
    if (vu_send(sock, VU_SET_VRING_BASE, &m.payload.state, 8, -1)) goto handshake;
    m.payload.addr.index = 0;
    m.payload.addr.flags = 0;
    m.payload.addr.desc = base + desc_off;
    m.payload.addr.used = base + used_off;
    m.payload.addr.avail = base + avail_off;
    m.payload.addr.log = 0;
    if (vu_send(sock, VU_SET_VRING_ADDR, &m.payload.addr, 40, -1)) goto handshake;
    uint64_t index = 0;
    if (vu_send(sock, VU_SET_VRING_CALL, &index, 8, call) || vu_send(sock, VU_SET_VRING_KICK, &index, 8, kick))
        goto handshake;
    m.payload.state.index = 0;
    m.payload.state.num = 1;
    if (vu_send(sock, VU_SET_VRING_ENABLE, &m.payload.state, 8, -1)) goto handshake;
    struct vu_msg config;
    memset(&config, 0, sizeof config);
    config.payload.config.size = 8;  // capacity, in 512-byte sectors
    if (vu_send(sock, VU_GET_CONFIG, &config.payload.config, 12 + 8, -1) || vu_reply(sock, &config) ||
        config.request != VU_GET_CONFIG || config.size != 12 + 8) {
    handshake:
        fail(out, "vhost-user handshake");
        goto done;
    }
    uint64_t sectors;
    memcpy(&sectors, config.payload.config.region, 8);
    uint64_t blocks = sectors * 512 / (uint64_t)block_size;
    if (blocks == 0) {
        fail(out, "disk smaller than one block");
        goto done;
    }

    // Slot i owns descriptors 3i (header), 3i+1 (data), 3i+2 (status), chained once.
    for (int i = 0; i < depth; i++) {
        desc[3 * i] = (struct vring_desc){base + meta_off + sizeof(struct slot_meta) * i, 16, VRING_DESC_F_NEXT, 3 * i + 1};
        desc[3 * i + 1] = (struct vring_desc){base + data_off + (uint64_t)block_size * i, (uint32_t)block_size,
                                              VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3 * i + 2};
        desc[3 * i + 2] = (struct vring_desc){base + meta_off + sizeof(struct slot_meta) * i + 64, 1,
                                              VRING_DESC_F_WRITE, 0};
        meta[i].header.type = VIRTIO_BLK_T_IN;
    }
    // A poller: ask for no used-buffer notifications (the event index far behind).
    *used_event = 0xffff;

    uint64_t rng = seed | 1;
    uint16_t avail_idx = 0, kicked_idx = 0, last_used = 0;
    uint64_t t0 = now_ns();
    uint64_t measure_from = t0 + (uint64_t)(warmup * 1e9), end = measure_from + (uint64_t)(seconds * 1e9);
    uint64_t last = t0;
    int outstanding = 0;
#define SUBMIT(slot)                                                                   \
    do {                                                                               \
        rng ^= rng << 13;                                                              \
        rng ^= rng >> 7;                                                               \
        rng ^= rng << 17;                                                              \
        meta[slot].header.sector = (rng % blocks) * (uint64_t)block_size / 512;        \
        meta[slot].status = 0xff;                                                      \
        started[slot] = now_ns();                                                      \
        avail->ring[avail_idx % n] = (uint16_t)(3 * (slot));                           \
        avail_idx++;                                                                   \
        outstanding++;                                                                 \
    } while (0)
    for (int i = 0; i < depth; i++) SUBMIT(i);
    while (outstanding > 0) {
        if (avail_idx != kicked_idx) {
            // Publish, then kick if the device's avail_event asks for it (spec 2.7.10).
            __atomic_store_n(&avail->idx, avail_idx, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint16_t event = *avail_event;
            if ((uint16_t)(avail_idx - event - 1) < (uint16_t)(avail_idx - kicked_idx)) {
                uint64_t one = 1;
#ifdef RINGFENCE_SPLIT_PROBE
                rf_split_kick_begin(&out->split);
#endif
                if (write(kick, &one, 8) != 8) {
                    fail(out, "kick");
                    break;
                }
#ifdef RINGFENCE_SPLIT_PROBE
                rf_split_kicked(&out->split);
#endif
                out->kicks++;
            }
            kicked_idx = avail_idx;
        }
        uint16_t used_idx = __atomic_load_n(&used->idx, __ATOMIC_ACQUIRE);
        if (used_idx == last_used) {
            if (now_ns() > end + 10000000000ull) {
                fail(out, "back-end stopped answering");
                break;
            }
            continue;
        }
#ifdef RINGFENCE_SPLIT_PROBE
        rf_split_seen(&out->split);
#endif
        uint64_t now = now_ns();
        last = now;
#ifdef RINGFENCE_SPLIT_PROBE
        if (!out->split.armed && now >= measure_from && now < end && !out->split.tsc1) rf_split_arm(&out->split);
        if (out->split.armed && now >= end) rf_split_disarm(&out->split);
#endif
        while (last_used != used_idx) {
            uint32_t slot = used->ring[last_used % n].id / 3;
            last_used++;
            outstanding--;
            out->completed++;
            if (meta[slot].status != VIRTIO_BLK_S_OK && !out->error) {
                out->error = 1;
                snprintf(out->message, sizeof out->message, "device returned status %u", meta[slot].status);
            }
            if (now >= measure_from && now < end) {
                if (out->recorded < capacity) latencies[out->recorded++] = (uint32_t)(now - started[slot]);
                out->ios++;
            }
            if (now < end && !out->error) SUBMIT(slot);
        }
    }
#undef SUBMIT
    if (!out->error) {
        uint64_t measured_end = last < end ? last : end;
        out->seconds = measured_end > measure_from ? (double)(measured_end - measure_from) / 1e9 : 0;
        rc = 0;
    }
done:
    if (sock >= 0) close(sock);
    if (kick >= 0) close(kick);
    if (call >= 0) close(call);
    if (mem != MAP_FAILED) munmap(mem, total);
    if (memfd >= 0) close(memfd);
    free(started);
    return rc;
}
