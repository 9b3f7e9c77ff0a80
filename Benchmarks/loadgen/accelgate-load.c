/*
 * accelgate-load: a closed-loop load generator on gRPC's C core (issue 18).
 *
 * One channel (one libaccelgate-client client), `--callers` calls kept
 * outstanding, each answered call replaced by the next at once, for
 * `--seconds`. The same identical payload every call. It drives any server of
 * accelgate.v1.Accelerator: AccelGate, or the inline peer in Benchmarks/peer.
 *
 * Prints one JSON object: calls, errors, calls per second, latency
 * percentiles, and the generator's own CPU time (so a run can show that the
 * generator was not the bottleneck).
 *
 *   accelgate-load --target 127.0.0.1:50051 --job sha256 --size 4096 --callers 16 --seconds 10
 *
 * Jobs: sha256 (Digest), aes256gcm (Encrypt, raw key, a fresh nonce per call),
 * gzip1 (Compress, gzip level 1).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "accelgate/client.h"

typedef enum { JOB_SHA256, JOB_AES256GCM, JOB_GZIP1 } job_kind;

typedef struct {
    const char *target;
    const char *api_key;
    job_kind job;
    const char *job_name;
    size_t size;
    int callers;
    double seconds;
    double warmup;
} options;

typedef struct slot slot;

typedef struct {
    options opt;
    accelgate_client *client;
    uint8_t *payload;
    uint8_t key[32];
    uint64_t nonce_counter;
    double end;          /* stop submitting at this time */
    double measure_from; /* count calls answered after this time */
    uint64_t calls, errors, submit_failures;
    int first_error_code;
    char first_error[ACCELGATE_MESSAGE_MAX];
    double *latencies; /* milliseconds, of counted calls */
    size_t latency_count, latency_cap;
    slot *slots;
} run;

struct slot {
    run *r;
    uint8_t *dst;
    size_t dst_cap;
    double started;
    uint8_t nonce[ACCELGATE_NONCE_LEN];
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + (double)u.ru_utime.tv_usec / 1e6 + (double)u.ru_stime.tv_sec +
           (double)u.ru_stime.tv_usec / 1e6;
}

static void on_done(const accelgate_result *result, void *user);

/* Starts the slot's next call; returns 0, or the submit's error. */
static int submit(slot *s) {
    run *r = s->r;
    accelgate_error err;
    s->started = now_s();
    int rc;
    switch (r->opt.job) {
    case JOB_SHA256:
        rc = accelgate_submit_digest(r->client, ACCELGATE_DIGEST_SHA256, NULL, r->payload, r->opt.size, s->dst,
                                     s->dst_cap, 0, on_done, s, &err);
        break;
    case JOB_AES256GCM: {
        /* A distinct nonce per call: a counter in the last eight bytes. */
        uint64_t n = ++r->nonce_counter;
        memset(s->nonce, 0, sizeof(s->nonce));
        memcpy(s->nonce + 4, &n, sizeof(n));
        accelgate_aead aead = ACCELGATE_AEAD_INIT;
        aead.algorithm = ACCELGATE_CIPHER_AES_256_GCM;
        aead.key.raw = r->key;
        aead.key.raw_len = sizeof(r->key);
        aead.nonce = s->nonce;
        aead.nonce_len = sizeof(s->nonce);
        rc = accelgate_submit_encrypt(r->client, &aead, r->payload, r->opt.size, s->dst, s->dst_cap, 0, on_done, s,
                                      &err);
        break;
    }
    default:
        rc = accelgate_submit_compress(r->client, ACCELGATE_FORMAT_GZIP, 1, r->payload, r->opt.size, s->dst,
                                       s->dst_cap, 0, on_done, s, &err);
        break;
    }
    if (rc != ACCELGATE_OK) r->submit_failures++;
    return rc;
}

static void on_done(const accelgate_result *result, void *user) {
    slot *s = user;
    run *r = s->r;
    double t = now_s();
    if (t >= r->measure_from && t < r->end) {
        if (result->rc == ACCELGATE_OK) {
            r->calls++;
            if (r->latency_count == r->latency_cap) {
                size_t cap = r->latency_cap ? r->latency_cap * 2 : 1 << 16;
                double *grown = realloc(r->latencies, cap * sizeof(double));
                if (grown != NULL) {
                    r->latencies = grown;
                    r->latency_cap = cap;
                }
            }
            if (r->latency_count < r->latency_cap) r->latencies[r->latency_count++] = (t - s->started) * 1e3;
        } else {
            if (r->errors++ == 0) {
                r->first_error_code = result->error.grpc_code;
                snprintf(r->first_error, sizeof(r->first_error), "%s", result->error.message);
            }
        }
    }
    if (t < r->end) (void)submit(s);
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, size_t n, double p) {
    if (n == 0) return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return sorted[i < n ? i : n - 1];
}

static void usage(void) {
    fprintf(stderr, "usage: accelgate-load --target HOST:PORT --job sha256|aes256gcm|gzip1 --size BYTES "
                    "[--callers N] [--seconds S] [--warmup S] [--api-key KEY]\n");
    exit(2);
}

static options parse(int argc, char **argv) {
    options o = {NULL, NULL, JOB_SHA256, "sha256", 4096, 16, 10, 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v == NULL) usage();
        if (strcmp(a, "--target") == 0) o.target = v;
        else if (strcmp(a, "--api-key") == 0) o.api_key = v;
        else if (strcmp(a, "--size") == 0) o.size = strtoull(v, NULL, 10);
        else if (strcmp(a, "--callers") == 0) o.callers = atoi(v);
        else if (strcmp(a, "--seconds") == 0) o.seconds = atof(v);
        else if (strcmp(a, "--warmup") == 0) o.warmup = atof(v);
        else if (strcmp(a, "--job") == 0) {
            o.job_name = v;
            if (strcmp(v, "sha256") == 0) o.job = JOB_SHA256;
            else if (strcmp(v, "aes256gcm") == 0) o.job = JOB_AES256GCM;
            else if (strcmp(v, "gzip1") == 0) o.job = JOB_GZIP1;
            else usage();
        } else usage();
        i++;
    }
    if (o.target == NULL || o.size == 0 || o.callers < 1 || o.seconds <= 0 || o.warmup < 0) usage();
    return o;
}

int main(int argc, char **argv) {
    run r;
    memset(&r, 0, sizeof(r));
    r.opt = parse(argc, argv);
    accelgate_client_config cfg;
    accelgate_client_config_init(&cfg);
    cfg.target = r.opt.target;
    cfg.api_key = r.opt.api_key;
    cfg.connect_timeout_ms = 10000;
    cfg.max_request_bytes = 0;
    accelgate_error err;
    if (accelgate_client_open(&cfg, &r.client, &err) != ACCELGATE_OK) {
        fprintf(stderr, "accelgate-load: cannot reach %s: %s\n", r.opt.target, err.message);
        return 1;
    }
    /* Text-like payload: compressible, the same bytes every call. */
    r.payload = malloc(r.opt.size);
    if (r.payload == NULL) return 1;
    uint32_t x = 12345;
    for (size_t i = 0; i < r.opt.size; i++) {
        x = x * 1103515245u + 12345u;
        r.payload[i] = (uint8_t)("the quick brown fox jumps over the lazy dog 0123456789\n"[(x >> 16) % 55]);
    }
    for (size_t i = 0; i < sizeof(r.key); i++) r.key[i] = (uint8_t)(i * 7 + 1);
    r.slots = calloc((size_t)r.opt.callers, sizeof(slot));
    if (r.slots == NULL) return 1;
    size_t cap = r.opt.size + r.opt.size / 8 + 1024;
    double start = now_s();
    r.measure_from = start + r.opt.warmup;
    r.end = r.measure_from + r.opt.seconds;
    for (int i = 0; i < r.opt.callers; i++) {
        r.slots[i].r = &r;
        r.slots[i].dst_cap = cap;
        r.slots[i].dst = malloc(cap);
        if (r.slots[i].dst == NULL) return 1;
    }
    for (int i = 0; i < r.opt.callers; i++) submit(&r.slots[i]);
    /* The generator's CPU is sampled as the measured window opens and closes. */
    double cpu_from = -1, cpu_to = -1;
    while (accelgate_client_pending(r.client) > 0) {
        accelgate_client_poll(r.client, 10);
        double t = now_s();
        if (cpu_from < 0 && t >= r.measure_from) cpu_from = cpu_s();
        if (cpu_to < 0 && t >= r.end) cpu_to = cpu_s();
    }
    if (cpu_from < 0) cpu_from = 0;
    if (cpu_to < 0) cpu_to = cpu_s();
    double cpu_used = cpu_to - cpu_from;
    double wall = r.opt.seconds;
    qsort(r.latencies, r.latency_count, sizeof(double), compare);
    printf("{\"job\":\"%s\",\"size\":%zu,\"callers\":%d,\"seconds\":%.3f,\"calls\":%llu,\"errors\":%llu,"
           "\"submit_failures\":%llu,\"calls_per_s\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,"
           "\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_us_per_call\":%.2f",
           r.opt.job_name, r.opt.size, r.opt.callers, wall, (unsigned long long)r.calls,
           (unsigned long long)r.errors, (unsigned long long)r.submit_failures, r.calls / wall,
           percentile(r.latencies, r.latency_count, 0.50), percentile(r.latencies, r.latency_count, 0.99),
           r.latency_count ? r.latencies[r.latency_count - 1] : 0.0, cpu_used,
           r.calls ? cpu_used * 1e6 / (double)r.calls : 0.0);
    if (r.errors) {
        printf(",\"first_error\":{\"code\":%d,\"message\":\"", r.first_error_code);
        for (const char *p = r.first_error; *p; p++)
            if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) putchar(*p);
        printf("\"}");
    }
    printf("}\n");
    for (int i = 0; i < r.opt.callers; i++) free(r.slots[i].dst);
    free(r.slots);
    free(r.payload);
    free(r.latencies);
    accelgate_client_close(r.client);
    return r.errors || r.calls == 0 ? 1 : 0;
}
