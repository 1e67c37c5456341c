// Compiled with _GNU_SOURCE (Package.swift cSettings); see CRingFence.h.
#include "CRingFence.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <sys/resource.h>
#include <linux/openat2.h>
#include <stdio.h>

const unsigned int RF_MFD_CLOEXEC = MFD_CLOEXEC;
const unsigned int RF_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const int RF_F_SEAL_SEAL = F_SEAL_SEAL;
const int RF_F_SEAL_SHRINK = F_SEAL_SHRINK;
const int RF_F_SEAL_GROW = F_SEAL_GROW;
const int RF_F_SEAL_WRITE = F_SEAL_WRITE;
const int RF_EFD_NONBLOCK = EFD_NONBLOCK;
const int RF_EFD_CLOEXEC = EFD_CLOEXEC;

int rf_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int rf_add_seals(int fd, int seals) { return fcntl(fd, F_ADD_SEALS, seals); }
int rf_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }
int rf_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
ssize_t rf_eventfd_read_nowait(int fd, uint64_t *value) {
    struct iovec iov = {.iov_base = value, .iov_len = sizeof(*value)};
    ssize_t n;
    do {
        n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
}
int rf_gettid(void) { return (int)syscall(SYS_gettid); }
int rf_unshare_files(void) {
    if (unshare(CLONE_FILES)) return -1;
    // The new table holds a copy of every descriptor the process had open: close them
    // all, or this thread would keep the process's sockets, pipes and files open.
    if (syscall(SYS_close_range, 0u, ~0u, 0u) == 0) return 0;
    // Before Linux 5.9: every number below the limit (once per process).
    struct rlimit r;
    long top = getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur != RLIM_INFINITY ? (long)r.rlim_cur : 1L << 20;
    for (long fd = 0; fd < top; fd++) close((int)fd);
    return 0;
}
int rf_pidfd_open(int pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
int rf_pidfd_getfd(int pidfd, int fd) { return (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0); }

#define RF_MAX_FDS 16

// Room for the most descriptors a message may carry, aligned for cmsghdr.
union rf_control {
    char buf[CMSG_SPACE(sizeof(int) * RF_MAX_FDS)];
    struct cmsghdr align;
};

// One buffer, no name, no control yet.
static void init_message(struct msghdr *msg, struct iovec *iov, void *buf, size_t len) {
    iov->iov_base = buf;
    iov->iov_len = len;
    memset(msg, 0, sizeof(*msg));
    msg->msg_iov = iov;
    msg->msg_iovlen = 1;
}

ssize_t rf_send_with_fds_nowait(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > RF_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    struct iovec iov;
    struct msghdr msg;
    init_message(&msg, &iov, (void *)buf, len);
    union rf_control control;
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
}

ssize_t rf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds,
                         int *nfds, int *stray, int *truncated) {
    *nfds = 0;
    *stray = 0;
    *truncated = 0;
    if (maxfds < 0) maxfds = 0;
    if (maxfds > RF_MAX_FDS) maxfds = RF_MAX_FDS;
    struct iovec iov;
    struct msghdr msg;
    init_message(&msg, &iov, buf, len);
    // Always offer room for the maximum so surplus descriptors arrive (and get closed)
    // instead of being silently dropped by the kernel with MSG_CTRUNC.
    union rf_control control;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    ssize_t n;
    do {
        // MSG_DONTWAIT: callers read first and poll only on EAGAIN, so a receive never
        // blocks past its deadline whatever the socket's mode.
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        if (c->cmsg_len < CMSG_LEN(0)) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *data = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i, sizeof(int));
            if (*nfds < maxfds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                (*stray)++;
            }
        }
    }
    return n;
}

int rf_pin_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

int rf_accept_cloexec(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC); }

// block device back-end (file images)
#include <linux/falloc.h>
const int RF_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int RF_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int RF_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int RF_O_DIRECT = O_DIRECT;
int rf_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

// virtio-fs device
const uint64_t RF_RESOLVE_BENEATH = RESOLVE_BENEATH;
const uint64_t RF_RESOLVE_NO_MAGICLINKS = RESOLVE_NO_MAGICLINKS;
const uint64_t RF_RESOLVE_NO_SYMLINKS = RESOLVE_NO_SYMLINKS;
const int RF_O_PATH = O_PATH;
const int RF_O_NOFOLLOW = O_NOFOLLOW;
const int RF_O_DIRECTORY = O_DIRECTORY;
const int RF_O_NOATIME = O_NOATIME;
const int RF_AT_EMPTY_PATH = AT_EMPTY_PATH;
const int RF_AT_SYMLINK_NOFOLLOW = AT_SYMLINK_NOFOLLOW;
const int RF_AT_REMOVEDIR = AT_REMOVEDIR;
const unsigned int RF_RENAME_NOREPLACE = RENAME_NOREPLACE;
const unsigned int RF_RENAME_EXCHANGE = RENAME_EXCHANGE;
int rf_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve) {
    struct open_how how = {.flags = flags, .mode = mode, .resolve = resolve};
    long r;
    do {
        r = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    } while (r < 0 && errno == EINTR);
    return (int)r;
}
int rf_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
    return renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}

const char *rf_dirent_name(const struct dirent *entry) { return entry->d_name; }

struct rf_split_probe rf_split_driver_probe;
