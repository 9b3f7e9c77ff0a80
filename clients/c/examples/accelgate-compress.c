/*
 * accelgate-compress: compresses a file through AccelGate with libaccelgate-client.
 *
 *   accelgate-compress [options] [-i IN] [-o OUT]        (default: stdin to stdout)
 *
 *   -t, --target TARGET     server [127.0.0.1:50051]
 *   -f, --format FORMAT     gzip (default), zstd, lz4, deflate or zlib
 *   -l, --level N           compression level [the format's default]
 *   -j, --jobs N            chunks in flight [4]
 *   -d, --decompress        decompress instead (one call: input and output
 *                           within the server's limits)
 *       --tls-roots FILE    use TLS, verifying the server with these PEM roots
 *       --server-name NAME  TLS: the name in the server's certificate
 *   -v, --verbose           print sizes, chunks and device time to stderr
 *   The API key, if the server has tenants, comes from $ACCELGATE_API_KEY.
 *
 * Unary calls carry at most the server's request limit (4 MiB by default, read
 * with DescribeDevice), so the input is cut into chunks of that size; each chunk
 * is an asynchronous job, up to --jobs in flight, and the results are written in
 * input order. gzip members, zstd frames and lz4 frames may follow each other,
 * so the output is one valid file that gzip -d, zstd -d or lz4 -d (and
 * accelgate) decompress in one go. Raw deflate and zlib streams cannot be
 * concatenated: an input over one chunk fails with a clear message (use gzip,
 * zstd or lz4, or `accelctl compress`, which streams).
 *
 * Exit status: 0 on success, 1 on any error (with one line on stderr), 2 for usage.
 */
#include "accelgate/client.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *prog = "accelgate-compress";

static void usage(void) {
    fprintf(stderr,
            "usage: %s [-t TARGET] [-f gzip|zstd|lz4|deflate|zlib] [-l LEVEL] [-j JOBS] [-d] [-v]\n"
            "       [--tls-roots FILE] [--server-name NAME] [-i IN] [-o OUT]\n"
            "API key: $ACCELGATE_API_KEY\n",
            prog);
    exit(2);
}

/* Prints "accelgate-compress: <what>" and returns 1 (the exit status). */
static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

/* The same for a failed call: message and gRPC status. */
static int fail_call(const char *what, const accelgate_error *err) {
    return fail("%s: %s (%s)", what, err->message, accelgate_grpc_code_name(err->grpc_code));
}

/* Reads all of f, or returns NULL with *len = SIZE_MAX if it holds more than limit bytes. */
static unsigned char *read_all(FILE *f, size_t limit, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    unsigned char *p = malloc(cap + 1);
    *len = 0;
    while (p != NULL) {
        if (n == cap) {
            unsigned char *q = realloc(p, (cap *= 2) + 1);
            if (q == NULL) break;
            p = q;
        }
        size_t r = fread(p + n, 1, cap - n, f);
        n += r;
        if (n > limit) {
            *len = SIZE_MAX;
            break;
        }
        if (r == 0) {
            p[n] = '\0';
            *len = n;
            return p;
        }
    }
    free(p);
    return NULL;
}

typedef struct totals {
    uint64_t in, out, device_ns, chunks;
} totals;

/* One chunk's output slot. */
typedef struct slot {
    unsigned char *out;
    size_t cap;
    size_t len;
    int done; /* callback ran, output not written yet */
    int rc;
    accelgate_error err;
    uint64_t device_ns;
} slot;

static void on_chunk(const accelgate_result *r, void *user) {
    slot *s = user;
    s->done = 1;
    s->rc = r->rc;
    s->err = r->error;
    s->len = r->dst_len;
    s->device_ns = r->stats.device_ns;
}

static int compress_chunks(accelgate_client *c, FILE *in, FILE *out, accelgate_format format, int level, int jobs,
                           size_t chunk, totals *t) {
    int concatenable =
        format == ACCELGATE_FORMAT_GZIP || format == ACCELGATE_FORMAT_ZSTD || format == ACCELGATE_FORMAT_LZ4;
    int ret = 1;
    accelgate_error err;
    unsigned char *buf = malloc(chunk);
    slot *slots = calloc((size_t)jobs, sizeof *slots);
    int ok = buf != NULL && slots != NULL;
    for (int k = 0; ok && k < jobs; k++) {
        slots[k].cap = accelgate_compress_bound(chunk);
        ok = (slots[k].out = malloc(slots[k].cap)) != NULL;
    }
    if (!ok) {
        fail("out of memory");
        goto done;
    }
    uint64_t submitted = 0, written = 0;
    int eof = 0;
    while (!eof || written < submitted) {
        /* Fill free slots with the next chunks. */
        while (!eof && submitted - written < (uint64_t)jobs) {
            size_t n = fread(buf, 1, chunk, in);
            if (ferror(in)) {
                fail("read error");
                goto done;
            }
            int more = 0;
            if (n == chunk) {
                int ch = fgetc(in);
                if (ch != EOF) more = 1, ungetc(ch, in);
            }
            eof = !more;
            if (n == 0 && submitted > 0) break; /* empty input still gets one (empty) stream */
            if (more && !concatenable) {
                fail("input is over one request (%zu bytes, the server's limit) and %s streams cannot be "
                     "concatenated; use gzip, zstd or lz4, or `accelctl compress`, which streams",
                     chunk, accelgate_format_name(format));
                goto done;
            }
            slot *s = &slots[submitted % (uint64_t)jobs];
            /* submit copies buf, so it can be refilled at once; s->out stays ours until on_chunk. */
            if (accelgate_submit_compress(c, format, level, buf, n, s->out, s->cap, 0, on_chunk, s, &err) !=
                ACCELGATE_OK) {
                fail_call("submit", &err);
                goto done;
            }
            submitted++;
            t->in += n;
        }
        /* Write finished chunks in input order. */
        slot *head = &slots[written % (uint64_t)jobs];
        while (written < submitted && head->done) {
            if (head->rc != ACCELGATE_OK) {
                fail_call("compress", &head->err);
                goto done;
            }
            if (fwrite(head->out, 1, head->len, out) != head->len) {
                fail("write error");
                goto done;
            }
            t->out += head->len;
            t->device_ns += head->device_ns;
            t->chunks++;
            head->done = 0;
            written++;
            head = &slots[written % (uint64_t)jobs];
        }
        if (written < submitted && !head->done) accelgate_client_poll(c, -1);
    }
    ret = 0;
done:
    /* After an error, jobs still in flight write into the slots: let them finish first. */
    while (accelgate_client_pending(c) > 0) accelgate_client_poll(c, -1);
    for (int k = 0; slots != NULL && k < jobs; k++) free(slots[k].out);
    free(slots);
    free(buf);
    return ret;
}

static int decompress_one(accelgate_client *c, FILE *in, FILE *out, accelgate_format format,
                          const accelgate_limits *lim, totals *t) {
    size_t n, len = 0, cap = (size_t)lim->max_decompressed_bytes;
    unsigned char *src = read_all(in, (size_t)lim->max_request_bytes, &n);
    if (src == NULL)
        return n == SIZE_MAX ? fail("input over the server's request limit of %" PRIu64
                                    " bytes; use `accelctl decompress`, which streams",
                                    lim->max_request_bytes)
                             : fail("read error or out of memory");
    unsigned char *dst = malloc(cap ? cap : 1);
    accelgate_error err;
    int ret = 1;
    if (dst == NULL) fail("out of memory");
    else if (accelgate_decompress(c, format, src, n, dst, cap, &len, 0, &err) != ACCELGATE_OK)
        fail_call("decompress", &err);
    else if (fwrite(dst, 1, len, out) != len) fail("write error");
    else {
        t->in = n, t->out = len, t->chunks = 1;
        ret = 0;
    }
    free(src);
    free(dst);
    return ret;
}

int main(int argc, char **argv) {
    const char *target = "127.0.0.1:50051", *in_path = "-", *out_path = "-", *roots_path = NULL, *server_name = NULL;
    accelgate_format format = ACCELGATE_FORMAT_GZIP;
    int level = ACCELGATE_LEVEL_DEFAULT, jobs = 4, decompress = 0, verbose = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define IS(s, l) (strcmp(a, s) == 0 || strcmp(a, l) == 0)
        /* Options with a value take the next argument. */
        const char *v = NULL;
        if (IS("-t", "--target") || IS("-f", "--format") || IS("-l", "--level") || IS("-j", "--jobs") ||
            IS("-i", "--input") || IS("-o", "--output") || IS("--tls-roots", "--tls-roots") ||
            IS("--server-name", "--server-name")) {
            if (i + 1 >= argc) usage();
            v = argv[++i];
        }
        if (IS("-t", "--target")) target = v;
        else if (IS("-f", "--format")) {
            format = accelgate_format_from_name(v);
            if (format == ACCELGATE_FORMAT_NONE) usage();
        } else if (IS("-l", "--level")) level = atoi(v);
        else if (IS("-j", "--jobs")) {
            jobs = atoi(v);
            if (jobs < 1 || jobs > 64) usage();
        } else if (IS("-i", "--input")) in_path = v;
        else if (IS("-o", "--output")) out_path = v;
        else if (IS("--tls-roots", "--tls-roots")) roots_path = v;
        else if (IS("--server-name", "--server-name")) server_name = v;
        else if (IS("-d", "--decompress")) decompress = 1;
        else if (IS("-v", "--verbose")) verbose = 1;
        else usage();
#undef IS
    }

    accelgate_client_config cfg;
    accelgate_client_config_init(&cfg);
    cfg.target = target;
    cfg.api_key = getenv("ACCELGATE_API_KEY");
    cfg.connect_timeout_ms = 10000; /* fail early and clearly if the server is not there */
    unsigned char *roots = NULL;
    if (roots_path != NULL) {
        FILE *f = fopen(roots_path, "rb");
        size_t n;
        if (f == NULL) return fail("%s: %s", roots_path, strerror(errno));
        roots = read_all(f, 1 << 20, &n);
        fclose(f);
        if (roots == NULL) return fail("%s: unreadable or over 1 MiB", roots_path);
        cfg.tls = 1;
        cfg.tls_root_certs_pem = (const char *)roots;
        cfg.tls_server_name = server_name;
    }
    accelgate_client *c;
    accelgate_error err;
    int rc = accelgate_client_open(&cfg, &c, &err);
    free(roots); /* copied by open */
    if (rc != ACCELGATE_OK) return fail_call("cannot open the client", &err);

    int ret = 1;
    FILE *in = NULL, *out = NULL;
    accelgate_limits lim;
    totals t = {0, 0, 0, 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (accelgate_get_limits(c, &lim, 10000, &err) != ACCELGATE_OK) fail_call("DescribeDevice", &err);
    else if ((in = strcmp(in_path, "-") == 0 ? stdin : fopen(in_path, "rb")) == NULL)
        fail("%s: %s", in_path, strerror(errno));
    else if ((out = strcmp(out_path, "-") == 0 ? stdout : fopen(out_path, "wb")) == NULL)
        fail("%s: %s", out_path, strerror(errno));
    else if (decompress)
        ret = decompress_one(c, in, out, format, &lim, &t);
    else
        ret = compress_chunks(c, in, out, format, level, jobs, (size_t)lim.max_request_bytes, &t);
    if (in != NULL && in != stdin) fclose(in);
    if (out != NULL && (out != stdout ? fclose(out) : fflush(out)) != 0 && ret == 0) ret = fail("write error");
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (ret == 0 && verbose) {
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        fprintf(stderr, "%s %s: %" PRIu64 " -> %" PRIu64 " bytes in %" PRIu64 " chunk(s) of up to %" PRIu64 ", "
                        "device %.1f ms, %.2f s (tenant %s)\n",
                prog, decompress ? "decompress" : accelgate_format_name(format), t.in, t.out, t.chunks,
                lim.max_request_bytes, t.device_ns / 1e6, s, lim.tenant[0] ? lim.tenant : "?");
    }
    accelgate_client_close(c);
    return ret;
}
