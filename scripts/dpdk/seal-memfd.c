// LD_PRELOAD shim for DPDK peers of RingFence's vhost-user devices.
//
// DPDK (EAL --no-huge) backs its memory with memfd_create("nohuge", 0): without
// MFD_ALLOW_SEALING such a memfd can never be sealed, so the driver can shrink it under
// a device that mapped it and SIGBUS that device. RingFence's back-ends refuse such memory
// (docs/design.md §4.1). This shim makes DPDK create its memfds sealable and seals each
// one against shrinking and growing once DPDK has sized it (DPDK never resizes them in
// --no-huge mode). Build: cc -shared -fPIC -O2 -o seal-memfd.so seal-memfd.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

int memfd_create(const char *name, unsigned int flags) {
    int (*real)(const char *, unsigned int) = (int (*)(const char *, unsigned int))dlsym(RTLD_NEXT, "memfd_create");
    return real(name, flags | MFD_ALLOW_SEALING);
}

static void seal_if_memfd(int fd) {
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals >= 0 && !(seals & F_SEAL_SEAL)) fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
}

int ftruncate(int fd, off_t length) {
    int (*real)(int, off_t) = (int (*)(int, off_t))dlsym(RTLD_NEXT, "ftruncate");
    int r = real(fd, length);
    if (r == 0) seal_if_memfd(fd);
    return r;
}

int ftruncate64(int fd, off_t length) { return ftruncate(fd, length); }
