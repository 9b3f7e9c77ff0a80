/*
 * accel_sys.h — Linux primitives Swift cannot reach directly.
 *
 * memfd_create, futex (wait, wake, waitv), atomics and fences on shared
 * memory, and a monotonic clock. Everything is static inline so Swift can
 * import it without a shared library, in the spirit of swift-nio's CNIOLinux.
 */
#ifndef ACCEL_SYS_H
#define ACCEL_SYS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- memfd ---------------------------------------------------------------- */

/** Creates an anonymous, sealable, close-on-exec memory file. Returns -1 and sets errno on failure. */
static inline int accel_memfd_create(const char *name) {
    return (int)syscall(SYS_memfd_create, name, (unsigned int)(MFD_CLOEXEC | MFD_ALLOW_SEALING));
}

/** Seals a memfd against shrinking and growing, so a mapping can never SIGBUS. */
static inline int accel_memfd_seal_size(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
}

static inline int accel_memfd_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }

/** 1 if the file is sealed against shrinking (a mapping of it can never SIGBUS), else 0. */
static inline int accel_memfd_is_shrink_sealed(int fd) {
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

/** Maps a whole shared region read-write. Returns NULL on failure. */
static inline void *accel_map_shared(int fd, uint64_t size) {
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

static inline int accel_unmap(void *p, uint64_t size) { return munmap(p, (size_t)size); }

/* ---- atomics on shared memory -------------------------------------------- */

static inline uint32_t accel_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t accel_load_relaxed_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void accel_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void accel_store_seqcst_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t accel_fetch_add_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t accel_fetch_or_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t accel_fetch_and_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t accel_load_acquire_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void accel_store_release_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t accel_fetch_add_u64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

/** Full barrier: orders a preceding store before a following load (Dekker-style doorbell check). */
static inline void accel_fence_seqcst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void accel_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- futex (shared, not _PRIVATE: waiters and wakers may be in different processes) */

/** Sleeps while *word == expected, at most timeout_ns (0 = forever). Returns 0 or -1 with errno. */
static inline int accel_futex_wait(uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
        ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
}

/** Wakes up to count waiters on word. Returns the number woken or -1. */
static inline int accel_futex_wake(uint32_t *word, int count) {
    return (int)syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
}

#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif

#define ACCEL_FUTEX_WAITV_MAX 128

/** Waits on several futex words at once (Linux 5.16+). Returns the index woken, or -1 with errno
    (EAGAIN: a value already differed; ETIMEDOUT; ENOSYS on old kernels). */
static inline int accel_futex_waitv(uint32_t *const *words, const uint32_t *expected, int n, uint64_t timeout_ns) {
    struct futex_waitv w[ACCEL_FUTEX_WAITV_MAX];
    if (n <= 0 || n > ACCEL_FUTEX_WAITV_MAX) { errno = EINVAL; return -1; }
    memset(w, 0, sizeof(w[0]) * (size_t)n);
    for (int i = 0; i < n; i++) {
        w[i].uaddr = (uint64_t)(uintptr_t)words[i];
        w[i].val = expected[i];
        w[i].flags = FUTEX2_SIZE_U32;
    }
    struct timespec ts, *tsp = NULL;
    if (timeout_ns) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + timeout_ns % 1000000000ull;
        ts.tv_sec += (time_t)(timeout_ns / 1000000000ull + ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        tsp = &ts;
    }
    return (int)syscall(SYS_futex_waitv, w, (unsigned int)n, 0u, tsp, CLOCK_MONOTONIC);
}

/* ---- time ---------------------------------------------------------------- */

static inline uint64_t accel_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/** Per-thread CPU time, for engine busy accounting. */
static inline uint64_t accel_thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void accel_sleep_ns(uint64_t ns) {
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

static inline int accel_errno(void) { return errno; }

/** memset that the compiler may not drop (explicit_bzero semantics). */
static inline void accel_explicit_zero(void *p, size_t n) { explicit_bzero(p, n); }

/* ---- Unix-socket control channel and signals (accel_sys.c) -------------------
 * Out of line on purpose: <sys/socket.h> and <signal.h> under _GNU_SOURCE
 * define types (fd_set) that clash with Swift's Glibc module if this header
 * pulls them in. */

/** Listens on a Unix stream socket at path (removing a stale one) with the given mode
    (chmod between bind and listen; the umask is not touched) and a SOMAXCONN backlog. -1 on error. */
int accel_unix_listen(const char *path, int mode);
int accel_unix_accept(int fd);
int accel_unix_connect(const char *path);
/** The connecting process's credentials (SO_PEERCRED). 0 on success. */
int accel_peer_cred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid);
/** Sends all of buf, with up to 8 file descriptors attached to the first byte. 0 on success. */
int accel_send_with_fds(int fd, const void *buf, size_t len, const int *fds, int nfds);
/** Receives exactly len bytes, collecting up to max_fds passed descriptors (more are closed)
    within wait_ms (-1: no bound). 0 on success; -1 on error, EOF or timeout (ETIMEDOUT),
    with every descriptor this call received already closed. */
int accel_recv_with_fds(int fd, void *buf, size_t len, int *fds, int max_fds, int *nfds, int wait_ms);
/** Open descriptors of this process, or -1. */
int accel_open_fd_count(void);
/** The soft RLIMIT_NOFILE, or -1. */
long accel_fd_limit(void);

/* Self-pipe for signals: a real handler (never SIG_IGN, which lets the kernel
   drop a signal that races with installation) writes the signal number to a
   pipe; a thread of the program reads it and acts outside signal context. */
/** Installs the handler for n signals; returns the pipe's read end, or -1. */
int accel_signal_pipe_install(const int *sigs, int n);
/** Blocks until a signal arrives through the pipe; returns its number, or -1. */
int accel_signal_pipe_wait(int fd);

/** Tunes glibc malloc for a server that moves multi-MiB buffers between threads:
    allocations of 256 KiB and more are always mmapped (and returned to the OS when
    freed) and at most two arenas are used. Without it, glibc's dynamic mmap
    threshold keeps freed chunk buffers in per-thread arenas and a long stream's
    peak RSS grows with its length. Returns 1 if both settings took. */
int accel_tune_malloc(void);

/* eventfd doorbells, only for the comparison mode of the doorbell benchmark:
   a syscall to ring for every job, and poll + read to wait. */
/** A non-blocking eventfd, or -1. */
int accel_eventfd_create(void);
/** Adds 1 to the eventfd's counter (one write syscall). */
int accel_eventfd_ring(int fd);
/** Waits until one of the eventfds is readable or timeout_ns passes, then
    drains every readable one. Returns the number that were ready, or -1. */
int accel_eventfd_wait_any(const int *fds, int n, uint64_t timeout_ns);

#endif /* ACCEL_SYS_H */
