/* Out-of-line parts of accel_sys.h: Unix sockets with SCM_RIGHTS and SO_PEERCRED, signals. */
#define _GNU_SOURCE
#include "accel_sys.h"

#include <dirent.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>


/** A Unix stream socket and its address for path; -1 (errno set) if the path is too long. */
static int accel_unix_socket(const char *path, struct sockaddr_un *a) {
    if (strlen(path) >= sizeof(a->sun_path)) { errno = ENAMETOOLONG; return -1; }
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    strcpy(a->sun_path, path);
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

/** Listens on a Unix stream socket at path (removing a stale one) with the given mode. -1 on error.
    The mode is set with chmod between bind and listen: nobody can connect before
    listen, so the umask never decides who may (and the process-wide umask is not
    touched, so other threads' files keep their modes). The backlog is SOMAXCONN,
    which the kernel caps at net.core.somaxconn. */
int accel_unix_listen(const char *path, int mode) {
    struct sockaddr_un a;
    int fd = accel_unix_socket(path, &a);
    if (fd < 0) return -1;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) { int e = errno; close(fd); errno = e; return -1; }
    if (chmod(path, (mode_t)mode) < 0 || listen(fd, SOMAXCONN) < 0) {
        int e = errno; unlink(path); close(fd); errno = e; return -1;
    }
    return fd;
}

int accel_unix_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int accel_unix_connect(const char *path) {
    struct sockaddr_un a;
    int fd = accel_unix_socket(path, &a);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}

/** The connecting process's credentials (SO_PEERCRED). 0 on success. */
int accel_peer_cred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred c;
    socklen_t n = sizeof(c);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &n) < 0) return -1;
    *pid = c.pid; *uid = c.uid; *gid = c.gid;
    return 0;
}

/** Sends all of buf, with up to 8 file descriptors attached to the first byte. 0 on success. */
int accel_send_with_fds(int fd, const void *buf, size_t len, const int *fds, int nfds) {
    char control[CMSG_SPACE(8 * sizeof(int))];
    size_t sent = 0;
    while (sent < len) {
        struct iovec iov = { (char *)buf + sent, len - sent };
        struct msghdr m;
        memset(&m, 0, sizeof(m));
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        if (sent == 0 && nfds > 0) {
            if (nfds > 8) { errno = EINVAL; return -1; }
            memset(control, 0, sizeof(control));
            m.msg_control = control;
            m.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
            struct cmsghdr *c = CMSG_FIRSTHDR(&m);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
            memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
        }
        ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        sent += (size_t)n;
    }
    return 0;
}

/** Closes the n descriptors collected so far (a failed receive owns nothing). */
static void accel_close_fds(int *fds, int *nfds) {
    for (int i = 0; i < *nfds; i++) close(fds[i]);
    *nfds = 0;
}

/** Receives exactly len bytes, collecting up to max_fds passed descriptors (more are
    closed). wait_ms bounds the whole call (-1: no bound). 0 on success; -1 on error,
    EOF or timeout (errno ETIMEDOUT), and then every descriptor received by this call
    has been closed. */
int accel_recv_with_fds(int fd, void *buf, size_t len, int *fds, int max_fds, int *nfds, int wait_ms) {
    char control[CMSG_SPACE(8 * sizeof(int))];
    size_t got = 0;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    *nfds = 0;
    while (got < len) {
        if (wait_ms >= 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            int64_t spent = (int64_t)(now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
            int left = spent >= wait_ms ? 0 : (int)(wait_ms - spent);
            struct pollfd p = { fd, POLLIN, 0 };
            int rc = poll(&p, 1, left);
            if (rc < 0 && errno == EINTR) continue;
            if (rc < 0) { int e = errno; accel_close_fds(fds, nfds); errno = e; return -1; }
            if (rc == 0) { accel_close_fds(fds, nfds); errno = ETIMEDOUT; return -1; }
        }
        struct iovec iov = { (char *)buf + got, len - got };
        struct msghdr m;
        memset(&m, 0, sizeof(m));
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control;
        m.msg_controllen = sizeof(control);
        ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n >= 0) {
            /* Descriptors can come with the last bytes of a connection: take them first. */
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    int *in = (int *)CMSG_DATA(c);
                    for (int i = 0; i < k; i++) {
                        if (*nfds < max_fds) fds[(*nfds)++] = in[i]; else close(in[i]);
                    }
                }
            }
        }
        if (n < 0) { int e = errno; accel_close_fds(fds, nfds); errno = e; return -1; }
        if (n == 0) { accel_close_fds(fds, nfds); errno = ECONNRESET; return -1; }
        got += (size_t)n;
    }
    return 0;
}

/** Open descriptors of this process (entries of /proc/self/fd), or -1. */
int accel_open_fd_count(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

/** The soft RLIMIT_NOFILE, or -1. */
long accel_fd_limit(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) < 0) return -1;
    return r.rlim_cur == RLIM_INFINITY ? (long)(1 << 30) : (long)r.rlim_cur;
}


/* Self-pipe for signals: a real handler (never SIG_IGN, which lets the kernel
   drop a signal that races with installation) writes the signal number to a
   pipe; a thread of the program reads it and acts outside signal context. */
static int accel_signal_pipe_fds[2] = { -1, -1 };

static void accel_signal_pipe_handler(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t ignored = write(accel_signal_pipe_fds[1], &b, 1);
    (void)ignored;
    errno = saved;
}

/** Installs the handler for n signals; returns the pipe's read end, or -1. */
int accel_signal_pipe_install(const int *sigs, int n) {
    if (accel_signal_pipe_fds[0] < 0 && pipe2(accel_signal_pipe_fds, O_CLOEXEC) < 0) return -1;
    for (int i = 0; i < n; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = accel_signal_pipe_handler;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(sigs[i], &sa, NULL) < 0) return -1;
    }
    return accel_signal_pipe_fds[0];
}

/** Blocks until a signal arrives through the pipe; returns its number, or -1. */
int accel_signal_pipe_wait(int fd) {
    unsigned char b;
    for (;;) {
        ssize_t n = read(fd, &b, 1);
        if (n == 1) return b;
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
}


int accel_eventfd_create(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

int accel_eventfd_ring(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one ? 0 : -1;
}

int accel_eventfd_wait_any(const int *fds, int n, uint64_t timeout_ns) {
    struct pollfd p[64];
    if (n <= 0 || n > 64) return -1;
    for (int i = 0; i < n; i++) { p[i].fd = fds[i]; p[i].events = POLLIN; p[i].revents = 0; }
    int rc = poll(p, (nfds_t)n, (int)(timeout_ns / 1000000u));
    if (rc <= 0) return rc;
    for (int i = 0; i < n; i++) {
        if (p[i].revents & POLLIN) {
            uint64_t v;
            (void)!read(fds[i], &v, sizeof v);
        }
    }
    return rc;
}

int accel_tune_malloc(void) {
    int a = mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    int b = mallopt(M_ARENA_MAX, 2);
    return a == 1 && b == 1;
}
