// Thin wrappers over Linux calls Swift's Glibc module does not expose.
// Policy lives in Swift; this file only makes system calls reachable.
// The implementation is compiled with _GNU_SOURCE; this header never defines it.
#ifndef CRINGFENCE_H
#define CRINGFENCE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <dirent.h>

#ifdef __cplusplus
extern "C" {
#endif

// memfd + seals
int rf_memfd_create(const char *name, unsigned int flags);
int rf_add_seals(int fd, int seals);
int rf_get_seals(int fd);
extern const unsigned int RF_MFD_CLOEXEC;
extern const unsigned int RF_MFD_ALLOW_SEALING;
extern const int RF_F_SEAL_SEAL;
extern const int RF_F_SEAL_SHRINK;
extern const int RF_F_SEAL_GROW;
extern const int RF_F_SEAL_WRITE;

// eventfd
int rf_eventfd(unsigned int initval, int flags);
extern const int RF_EFD_NONBLOCK;
extern const int RF_EFD_CLOEXEC;

/// Reads an eventfd's counter with RWF_NOWAIT: never blocks, whatever the descriptor's
/// O_NONBLOCK (which a peer holding the same open file description can clear). Returns 8,
/// or -1 with errno (EAGAIN: counter 0; EOPNOTSUPP: kernel older than 5.12).
ssize_t rf_eventfd_read_nowait(int fd, uint64_t *value);
/// unshare(CLONE_FILES), then closes every descriptor of the copy: the calling thread gets
/// a descriptor table of its own, empty. 0, or -1 (errno set) with the table still shared.
int rf_unshare_files(void);
/// pidfd_open(2) (no glibc wrapper before 2.36). A descriptor or -1 (errno set).
int rf_pidfd_open(int pid);
/// pidfd_getfd(2): a copy of descriptor `fd` of the process behind `pidfd` in the calling
/// thread's table (close-on-exec). A descriptor or -1 (errno set).
int rf_pidfd_getfd(int pidfd, int fd);

/// Sends `len` bytes and `nfds` descriptors (SCM_RIGHTS) with MSG_NOSIGNAL | MSG_DONTWAIT:
/// fails with EAGAIN instead of blocking when the peer does not read (the caller waits
/// for POLLOUT with a deadline). May send only part of `buf`. Returns bytes sent or -1.
ssize_t rf_send_with_fds_nowait(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// Receives up to `len` bytes and at most `maxfds` descriptors with MSG_CMSG_CLOEXEC.
/// Descriptors beyond `maxfds`, or arriving in unexpected control messages, are closed
/// here and counted in `*stray`. `*truncated` is set when the kernel reported MSG_CTRUNC
/// (the descriptors it did deliver are still returned so the caller can close them).
/// Returns bytes received (0 = peer closed) or -1 (errno set).
ssize_t rf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds,
                         int *nfds, int *stray, int *truncated);

/// accept4(SOCK_CLOEXEC).
int rf_accept_cloexec(int sock);

/// Pins the calling thread to one CPU (0-based). Returns 0 or an errno value.
int rf_pin_thread(int cpu);

/// Current thread id (for logs).
int rf_gettid(void);

// block device back-end (file images)
/// fallocate(2); returns 0 or -1 (errno set).
int rf_fallocate(int fd, int mode, int64_t offset, int64_t length);
extern const int RF_FALLOC_FL_KEEP_SIZE;
extern const int RF_FALLOC_FL_PUNCH_HOLE;
extern const int RF_FALLOC_FL_ZERO_RANGE;
extern const int RF_O_DIRECT;

// virtio-fs device (host directory)
/// openat2(2) with RESOLVE_* flags (glibc has no wrapper). Returns a descriptor or -1.
int rf_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);
/// renameat2(2). Returns 0 or -1 (errno set).
int rf_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags);
extern const uint64_t RF_RESOLVE_BENEATH;
extern const uint64_t RF_RESOLVE_NO_MAGICLINKS;
extern const uint64_t RF_RESOLVE_NO_SYMLINKS;
extern const int RF_O_PATH;
extern const int RF_O_NOFOLLOW;
/// The name of a directory entry `readdir` returned, read in place (NUL-terminated, at most
/// NAME_MAX bytes). A dirent record is only as long as its name, so taking the 256-byte
/// `d_name` array by value (as Swift does for `entry.pointee.d_name`) reads past the end of
/// the C library's buffer when the entry is the last one in it.
const char *rf_dirent_name(const struct dirent *entry);
extern const int RF_O_DIRECTORY;
extern const int RF_O_NOATIME;
extern const int RF_AT_EMPTY_PATH;
extern const int RF_AT_SYMLINK_NOFOLLOW;
extern const int RF_AT_REMOVEDIR;
extern const unsigned int RF_RENAME_NOREPLACE;
extern const unsigned int RF_RENAME_EXCHANGE;

// Latency split of the block driver's closed loop (benchmarks only; see rf_split_probe.h).
#include "rf_split_probe.h"
extern struct rf_split_probe rf_split_driver_probe;
static inline struct rf_split_probe *rf_split_driver(void) { return &rf_split_driver_probe; }

#ifdef __cplusplus
}
#endif
#endif
