/*
 * libaccelgate-client: unary calls to accelgate.v1.Accelerator over gRPC's C core.
 *
 * Every job is one gRPC call with a single batch of six operations (send
 * initial metadata, send message, close, receive initial metadata, receive
 * message, receive status), tagged with its job. Synchronous calls run the
 * batch on a completion queue of their own; asynchronous jobs share the
 * client's queue, which accelgate_client_poll drains. Messages are packed and
 * unpacked with the protobuf-c code generated from proto/ (clients/c/gen).
 */
#include "accelgate/client.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "accelgate/v1/accelerator.pb-c.h"

/* Internal operation beyond the public accelgate_op values. */
#define AG_OP_DESCRIBE 100

enum { M_COMPRESS, M_DECOMPRESS, M_ENCRYPT, M_DECRYPT, M_DIGEST, M_DESCRIBE, M_COUNT };

static const char *const method_paths[M_COUNT] = {
    "/accelgate.v1.Accelerator/Compress", "/accelgate.v1.Accelerator/Decompress",
    "/accelgate.v1.Accelerator/Encrypt",  "/accelgate.v1.Accelerator/Decrypt",
    "/accelgate.v1.Accelerator/Digest",   "/accelgate.v1.Accelerator/DescribeDevice",
};

typedef struct ag_job ag_job;

struct accelgate_client {
    grpc_channel *channel;
    grpc_completion_queue *cq; /* asynchronous jobs */
    void *method[M_COUNT];     /* registered call handles */
    grpc_metadata auth;        /* authorization: Bearer <key> */
    size_t auth_count;         /* 0 or 1 */
    int64_t default_timeout_ms;
    size_t max_request_bytes;
    pthread_mutex_t lock;      /* guards jobs, pending, closing */
    ag_job *jobs;              /* pending asynchronous jobs */
    size_t pending;
    int closing;
};

/* One call. */
struct ag_job {
    accelgate_client *client;
    ag_job *prev, *next;
    int op;
    grpc_call *call;
    grpc_byte_buffer *send;
    grpc_byte_buffer *recv;
    grpc_metadata_array initial_md;
    grpc_metadata_array trailing_md;
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
    void *dst;
    size_t dst_cap;
    accelgate_callback cb;
    void *user;
};

/* What a job asks for. */
typedef struct ag_request {
    int op;
    int alg; /* format, cipher or digest algorithm */
    int level;
    const void *src;
    size_t src_len;
    const accelgate_aead *aead;
    const accelgate_key *key;
} ag_request;

/* ------------------------------------------------------------------------ */
/* Errors */

static void set_error(accelgate_error *err, int rc, int grpc_code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_error(accelgate_error *err, int rc, int grpc_code, const char *fmt, ...) {
    if (err == NULL) return;
    err->code = rc;
    err->grpc_code = grpc_code;
    err->retry_after_ms = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

static void clear_error(accelgate_error *err) {
    if (err == NULL) return;
    err->code = 0;
    err->grpc_code = 0;
    err->retry_after_ms = 0;
    err->message[0] = '\0';
}

static int fail(accelgate_error *err, int rc, int grpc_code, const char *what) {
    set_error(err, rc, grpc_code, "%s", what);
    return rc;
}

static int invalid(accelgate_error *err, const char *what) {
    return fail(err, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, what);
}

static int nomem(accelgate_error *err) {
    return fail(err, ACCELGATE_E_NOMEM, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, "out of memory");
}

const char *accelgate_grpc_code_name(int code) {
    static const char *const names[] = {
        "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT",    "DEADLINE_EXCEEDED",
        "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",  "FAILED_PRECONDITION",
        "ABORTED",   "OUT_OF_RANGE",      "UNIMPLEMENTED",     "INTERNAL",            "UNAVAILABLE",
        "DATA_LOSS", "UNAUTHENTICATED",
    };
    if (code < 0 || code >= (int)(sizeof names / sizeof names[0])) return "UNKNOWN_CODE";
    return names[code];
}

const char *accelgate_strerror(int rc) {
    switch (rc) {
    case ACCELGATE_OK: return "success";
    case ACCELGATE_E_RPC: return "the call failed with a gRPC status";
    case ACCELGATE_E_INVALID: return "invalid argument";
    case ACCELGATE_E_TOO_LARGE: return "request larger than the client's limit";
    case ACCELGATE_E_TOO_SMALL: return "output buffer too small";
    case ACCELGATE_E_NOMEM: return "out of memory";
    case ACCELGATE_E_PROTOCOL: return "malformed response from the server";
    default: return "unknown error";
    }
}

static const char *const format_names[] = {NULL, "deflate", "zlib", "gzip", "zstd", "lz4"};

const char *accelgate_format_name(accelgate_format f) {
    if ((int)f < 1 || (int)f > 5) return "?";
    return format_names[f];
}

accelgate_format accelgate_format_from_name(const char *name) {
    if (name == NULL) return ACCELGATE_FORMAT_NONE;
    for (int i = 1; i <= 5; i++)
        if (strcmp(name, format_names[i]) == 0) return (accelgate_format)i;
    return ACCELGATE_FORMAT_NONE;
}

size_t accelgate_compress_bound(size_t n) {
    size_t b = n + (n >> 8) + 1024;
    return b < n ? SIZE_MAX : b;
}

/* memset the optimiser cannot drop: for keys and plaintext. */
static void *(*volatile wipe_memset)(void *, int, size_t) = memset;

static void wipe(void *p, size_t n) {
    if (p != NULL && n > 0) wipe_memset(p, 0, n);
}

/* ------------------------------------------------------------------------ */
/* Configuration and lifetime */

void accelgate_client_config_init(accelgate_client_config *cfg) {
    if (cfg == NULL) return;
    accelgate_client_config d = ACCELGATE_CLIENT_CONFIG_INIT;
    *cfg = d;
}

/* A target must be non-empty printable ASCII without spaces. */
static int valid_target(const char *t) {
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)t; *p; p++, n++)
        if (*p <= 0x20 || *p >= 0x7f) return 0;
    return n > 0 && n <= 1024;
}

static int valid_api_key(const char *k) {
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)k; *p; p++, n++)
        if (*p <= 0x20 || *p >= 0x7f) return 0;
    return n > 0 && n <= 4096;
}

static gpr_timespec deadline_after_ms(int64_t ms) {
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Connects now and waits for READY (config.connect_timeout_ms). */
static int connect_now(accelgate_client *c, const char *target, int64_t timeout_ms, accelgate_error *err) {
    static int watch_tag;
    gpr_timespec deadline = deadline_after_ms(timeout_ms);
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(c->channel, 1);
    while (st != GRPC_CHANNEL_READY) {
        if (st == GRPC_CHANNEL_TRANSIENT_FAILURE || st == GRPC_CHANNEL_SHUTDOWN) {
            set_error(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAVAILABLE,
                      "cannot connect to '%s' (connection or TLS handshake failed, or the name does not resolve)",
                      target);
            return ACCELGATE_E_RPC;
        }
        if (gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), deadline) >= 0) {
            set_error(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_DEADLINE_EXCEEDED,
                      "no connection to '%s' within %lld ms", target, (long long)timeout_ms);
            return ACCELGATE_E_RPC;
        }
        /* Completes when the state changes or at the deadline. */
        grpc_channel_watch_connectivity_state(c->channel, st, deadline, c->cq, &watch_tag);
        grpc_event ev = grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        (void)ev;
        st = grpc_channel_check_connectivity_state(c->channel, 1);
    }
    return ACCELGATE_OK;
}

static void destroy_client(accelgate_client *c) {
    if (c->cq != NULL) {
        grpc_completion_queue_shutdown(c->cq);
        while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(c->cq);
    }
    if (c->channel != NULL) grpc_channel_destroy(c->channel);
    if (c->auth_count) {
        grpc_slice_unref(c->auth.key);
        /* The value holds the API key. */
        wipe(GRPC_SLICE_START_PTR(c->auth.value), GRPC_SLICE_LENGTH(c->auth.value));
        grpc_slice_unref(c->auth.value);
    }
    pthread_mutex_destroy(&c->lock);
    free(c);
    grpc_shutdown();
}

int accelgate_client_open(const accelgate_client_config *cfg, accelgate_client **out, accelgate_error *err) {
    clear_error(err);
    if (out == NULL) return invalid(err, "out must not be NULL");
    *out = NULL;
    if (cfg == NULL) return invalid(err, "config must not be NULL");
    if (cfg->target == NULL || !valid_target(cfg->target))
        return invalid(err, "bad target: expected e.g. \"host:port\" or \"unix:///path\" "
                            "(non-empty, no spaces or control characters)");
    if (cfg->api_key != NULL && !valid_api_key(cfg->api_key))
        return invalid(err, "bad API key: expected 1-4096 printable ASCII characters without spaces");
    if ((cfg->tls_cert_chain_pem == NULL) != (cfg->tls_private_key_pem == NULL))
        return invalid(err, "mTLS needs both tls_cert_chain_pem and tls_private_key_pem");
    if (!cfg->tls && (cfg->tls_root_certs_pem || cfg->tls_cert_chain_pem || cfg->tls_server_name))
        return invalid(err, "TLS settings given but tls is 0");
    if (cfg->default_timeout_ms < ACCELGATE_NO_DEADLINE || cfg->connect_timeout_ms < 0)
        return invalid(err, "timeouts must not be negative (default_timeout_ms may be ACCELGATE_NO_DEADLINE)");

    accelgate_client *c = calloc(1, sizeof *c);
    if (c == NULL) return nomem(err);
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c);
        return nomem(err);
    }
    grpc_init();
    c->default_timeout_ms = cfg->default_timeout_ms;
    c->max_request_bytes = cfg->max_request_bytes;

    if (cfg->api_key != NULL) {
        size_t n = strlen("Bearer ") + strlen(cfg->api_key);
        char *v = malloc(n + 1);
        if (v == NULL) {
            destroy_client(c);
            return nomem(err);
        }
        snprintf(v, n + 1, "Bearer %s", cfg->api_key);
        c->auth.key = grpc_slice_from_static_string("authorization");
        c->auth.value = grpc_slice_from_copied_buffer(v, n);
        c->auth_count = 1;
        wipe(v, n);
        free(v);
    }

    grpc_channel_credentials *creds;
    if (cfg->tls) {
        grpc_ssl_pem_key_cert_pair pair = {cfg->tls_private_key_pem, cfg->tls_cert_chain_pem};
        creds = grpc_ssl_credentials_create(cfg->tls_root_certs_pem, cfg->tls_cert_chain_pem ? &pair : NULL, NULL,
                                            NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    if (creds == NULL) {
        destroy_client(c);
        return fail(err, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, "could not create channel credentials");
    }
    size_t max_recv = cfg->max_response_bytes == 0 || cfg->max_response_bytes > INT_MAX ? INT_MAX
                                                                                           : cfg->max_response_bytes;
    grpc_arg args[4];
    size_t nargs = 0;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[nargs++].value.integer = (int)max_recv;
    args[nargs].type = GRPC_ARG_INTEGER; /* the client checks payloads itself; the server has the last word */
    args[nargs].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[nargs++].value.integer = -1;
    args[nargs].type = GRPC_ARG_STRING;
    args[nargs].key = GRPC_ARG_PRIMARY_USER_AGENT_STRING;
    args[nargs++].value.string = "accelgate-c/" ACCELGATE_CLIENT_VERSION;
    if (cfg->tls && cfg->tls_server_name != NULL) {
        args[nargs].type = GRPC_ARG_STRING;
        args[nargs].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[nargs++].value.string = (char *)cfg->tls_server_name;
    }
    grpc_channel_args chargs = {nargs, args};
    c->channel = grpc_channel_create(cfg->target, creds, &chargs);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    if (c->channel == NULL || c->cq == NULL) {
        destroy_client(c);
        return fail(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_INTERNAL, "could not create the gRPC channel");
    }
    for (int m = 0; m < M_COUNT; m++) c->method[m] = grpc_channel_register_call(c->channel, method_paths[m], NULL, NULL);

    if (cfg->connect_timeout_ms > 0) {
        int rc = connect_now(c, cfg->target, cfg->connect_timeout_ms, err);
        if (rc != ACCELGATE_OK) {
            destroy_client(c);
            return rc;
        }
    }
    *out = c;
    return ACCELGATE_OK;
}

/* ------------------------------------------------------------------------ */
/* Requests */

static void free_plain(void *p, size_t n) {
    (void)n;
    free(p);
}

static void free_secret(void *p, size_t n) {
    wipe(p, n);
    free(p);
}

static int pack(const ProtobufCMessage *m, int secret, grpc_byte_buffer **out, accelgate_error *err) {
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s;
    if (n == 0) {
        s = grpc_empty_slice();
    } else {
        uint8_t *buf = malloc(n);
        if (buf == NULL) return nomem(err);
        protobuf_c_message_pack(m, buf);
        /* The slice owns buf from here and frees (and for crypto wipes) it. */
        s = grpc_slice_new_with_len(buf, n, secret ? free_secret : free_plain);
    }
    *out = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return ACCELGATE_OK;
}

static int check_key(const accelgate_key *k, accelgate_error *err) {
    if ((k->raw != NULL || k->raw_len > 0) == (k->name != NULL))
        return invalid(err, "a key needs exactly one of raw/raw_len and name");
    if (k->name == NULL && (k->raw == NULL || k->raw_len == 0)) return invalid(err, "raw key is empty");
    if (k->name != NULL && k->name[0] == '\0') return invalid(err, "key name is empty");
    return ACCELGATE_OK;
}

static void key_spec(const accelgate_key *k, Accelgate__V1__KeySpec *ks) {
    if (k->name != NULL) {
        ks->source_case = ACCELGATE__V1__KEY_SPEC__SOURCE_NAME;
        ks->name = (char *)k->name;
    } else {
        ks->source_case = ACCELGATE__V1__KEY_SPEC__SOURCE_RAW;
        ks->raw.data = (uint8_t *)k->raw;
        ks->raw.len = k->raw_len;
    }
}

static int check_request(const accelgate_client *c, const ag_request *rq, accelgate_error *err) {
    if (rq->src == NULL && rq->src_len > 0) return invalid(err, "src is NULL but src_len is not 0");
    if (c->max_request_bytes > 0 && rq->src_len > c->max_request_bytes) {
        set_error(err, ACCELGATE_E_TOO_LARGE, ACCELGATE_GRPC_RESOURCE_EXHAUSTED,
                  "payload of %zu bytes exceeds the client's max_request_bytes of %zu bytes", rq->src_len,
                  c->max_request_bytes);
        return ACCELGATE_E_TOO_LARGE;
    }
    if (rq->op == ACCELGATE_OP_ENCRYPT || rq->op == ACCELGATE_OP_DECRYPT) {
        const accelgate_aead *a = rq->aead;
        if (a == NULL) return invalid(err, "aead parameters must not be NULL");
        int rc = check_key(&a->key, err);
        if (rc != ACCELGATE_OK) return rc;
        if (a->nonce == NULL && a->nonce_len > 0) return invalid(err, "nonce is NULL but nonce_len is not 0");
        if (a->aad == NULL && a->aad_len > 0) return invalid(err, "aad is NULL but aad_len is not 0");
        if (c->max_request_bytes > 0 && a->aad_len > c->max_request_bytes) {
            set_error(err, ACCELGATE_E_TOO_LARGE, ACCELGATE_GRPC_RESOURCE_EXHAUSTED,
                      "AAD of %zu bytes exceeds the client's max_request_bytes of %zu bytes", a->aad_len,
                      c->max_request_bytes);
            return ACCELGATE_E_TOO_LARGE;
        }
    }
    if (rq->op == ACCELGATE_OP_DIGEST && rq->key != NULL) return check_key(rq->key, err);
    return ACCELGATE_OK;
}

static int build(const ag_request *rq, grpc_byte_buffer **out, int *method, accelgate_error *err) {
    Accelgate__V1__KeySpec ks = ACCELGATE__V1__KEY_SPEC__INIT;
    Accelgate__V1__ChainedCompression chain = ACCELGATE__V1__CHAINED_COMPRESSION__INIT;
    const accelgate_aead *a = rq->aead;
    if (a != NULL && a->chain_format != ACCELGATE_FORMAT_NONE) {
        chain.format = (Accelgate__V1__CompressionFormat)a->chain_format;
        if (rq->op == ACCELGATE_OP_ENCRYPT && a->chain_level != ACCELGATE_LEVEL_DEFAULT) {
            chain._level_case = ACCELGATE__V1__CHAINED_COMPRESSION___LEVEL_LEVEL;
            chain.level = a->chain_level;
        }
    }
    switch (rq->op) {
    case ACCELGATE_OP_COMPRESS: {
        Accelgate__V1__CompressRequest m = ACCELGATE__V1__COMPRESS_REQUEST__INIT;
        m.format = (Accelgate__V1__CompressionFormat)rq->alg;
        if (rq->level != ACCELGATE_LEVEL_DEFAULT) {
            m._level_case = ACCELGATE__V1__COMPRESS_REQUEST___LEVEL_LEVEL;
            m.level = rq->level;
        }
        m.data.data = (uint8_t *)rq->src;
        m.data.len = rq->src_len;
        *method = M_COMPRESS;
        return pack(&m.base, 0, out, err);
    }
    case ACCELGATE_OP_DECOMPRESS: {
        Accelgate__V1__DecompressRequest m = ACCELGATE__V1__DECOMPRESS_REQUEST__INIT;
        m.format = (Accelgate__V1__CompressionFormat)rq->alg;
        m.data.data = (uint8_t *)rq->src;
        m.data.len = rq->src_len;
        m.max_output_bytes = 0; /* the server's cap; a too-small dst is reported with the size needed */
        *method = M_DECOMPRESS;
        return pack(&m.base, 0, out, err);
    }
    case ACCELGATE_OP_ENCRYPT: {
        Accelgate__V1__EncryptRequest m = ACCELGATE__V1__ENCRYPT_REQUEST__INIT;
        key_spec(&a->key, &ks);
        m.algorithm = (Accelgate__V1__CipherAlgorithm)a->algorithm;
        m.key = &ks;
        m.nonce.data = (uint8_t *)a->nonce;
        m.nonce.len = a->nonce_len;
        m.aad.data = (uint8_t *)a->aad;
        m.aad.len = a->aad_len;
        m.plaintext.data = (uint8_t *)rq->src;
        m.plaintext.len = rq->src_len;
        if (a->chain_format != ACCELGATE_FORMAT_NONE) m.compress = &chain;
        *method = M_ENCRYPT;
        return pack(&m.base, 1, out, err);
    }
    case ACCELGATE_OP_DECRYPT: {
        Accelgate__V1__DecryptRequest m = ACCELGATE__V1__DECRYPT_REQUEST__INIT;
        key_spec(&a->key, &ks);
        m.algorithm = (Accelgate__V1__CipherAlgorithm)a->algorithm;
        m.key = &ks;
        m.nonce.data = (uint8_t *)a->nonce;
        m.nonce.len = a->nonce_len;
        m.aad.data = (uint8_t *)a->aad;
        m.aad.len = a->aad_len;
        m.ciphertext.data = (uint8_t *)rq->src;
        m.ciphertext.len = rq->src_len;
        if (a->chain_format != ACCELGATE_FORMAT_NONE) m.decompress = &chain;
        *method = M_DECRYPT;
        return pack(&m.base, 1, out, err);
    }
    case ACCELGATE_OP_DIGEST: {
        Accelgate__V1__DigestRequest m = ACCELGATE__V1__DIGEST_REQUEST__INIT;
        m.algorithm = (Accelgate__V1__DigestAlgorithm)rq->alg;
        if (rq->key != NULL) {
            key_spec(rq->key, &ks);
            m.key = &ks;
        }
        m.data.data = (uint8_t *)rq->src;
        m.data.len = rq->src_len;
        *method = M_DIGEST;
        return pack(&m.base, rq->key != NULL, out, err);
    }
    case AG_OP_DESCRIBE: {
        Accelgate__V1__DescribeDeviceRequest m = ACCELGATE__V1__DESCRIBE_DEVICE_REQUEST__INIT;
        *method = M_DESCRIBE;
        return pack(&m.base, 0, out, err);
    }
    default: return invalid(err, "unknown operation");
    }
}

/* ------------------------------------------------------------------------ */
/* Jobs */

static void job_free(ag_job *j) {
    if (j->send != NULL) grpc_byte_buffer_destroy(j->send);
    if (j->recv != NULL) grpc_byte_buffer_destroy(j->recv);
    grpc_metadata_array_destroy(&j->initial_md);
    grpc_metadata_array_destroy(&j->trailing_md);
    grpc_slice_unref(j->details);
    if (j->error_string != NULL) gpr_free((void *)j->error_string);
    if (j->call != NULL) grpc_call_unref(j->call);
    free(j);
}

static gpr_timespec call_deadline(const accelgate_client *c, int64_t timeout_ms) {
    if (timeout_ms == 0) timeout_ms = c->default_timeout_ms;
    if (timeout_ms <= 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return deadline_after_ms(timeout_ms);
}

/* Validates, packs and creates the call (not started yet). */
static int job_create(accelgate_client *c, const ag_request *rq, void *dst, size_t dst_cap, int64_t timeout_ms,
                      grpc_completion_queue *cq, ag_job **out, accelgate_error *err) {
    *out = NULL;
    if (c == NULL) return invalid(err, "client must not be NULL");
    if (dst == NULL && dst_cap > 0) return invalid(err, "dst is NULL but dst_cap is not 0");
    int rc = check_request(c, rq, err);
    if (rc != ACCELGATE_OK) return rc;
    ag_job *j = calloc(1, sizeof *j);
    if (j == NULL) return nomem(err);
    j->client = c;
    j->op = rq->op;
    j->dst = dst;
    j->dst_cap = dst_cap;
    j->details = grpc_empty_slice();
    grpc_metadata_array_init(&j->initial_md);
    grpc_metadata_array_init(&j->trailing_md);
    int method = 0;
    rc = build(rq, &j->send, &method, err);
    if (rc != ACCELGATE_OK) {
        job_free(j);
        return rc;
    }
    j->call = grpc_channel_create_registered_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, c->method[method],
                                                  call_deadline(c, timeout_ms), NULL);
    if (j->call == NULL) {
        job_free(j);
        return fail(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_INTERNAL, "could not create the gRPC call");
    }
    *out = j;
    return ACCELGATE_OK;
}

static int job_start(ag_job *j, accelgate_error *err) {
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = j->client->auth_count;
    ops[0].data.send_initial_metadata.metadata = j->client->auth_count ? &j->client->auth : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = j->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &j->initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &j->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &j->trailing_md;
    ops[5].data.recv_status_on_client.status = &j->status;
    ops[5].data.recv_status_on_client.status_details = &j->details;
    ops[5].data.recv_status_on_client.error_string = &j->error_string;
    grpc_call_error e = grpc_call_start_batch(j->call, ops, 6, j, NULL);
    if (e != GRPC_CALL_OK) {
        set_error(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_INTERNAL, "grpc_call_start_batch: %s",
                  grpc_call_error_to_string(e));
        return ACCELGATE_E_RPC;
    }
    return ACCELGATE_OK;
}

static void copy_stats(const Accelgate__V1__JobStats *s, accelgate_job_stats *out) {
    if (s == NULL) return;
    out->queue_wait_ns = s->queue_wait_ns;
    out->device_ns = s->device_ns;
    out->total_ns = s->total_ns;
    out->input_bytes = s->input_bytes;
    out->output_bytes = s->output_bytes;
    out->queue_id = s->queue_id;
    out->engine_id = s->engine_id;
    out->batch_size = s->batch_size;
    if (s->engine != NULL) snprintf(out->engine, sizeof out->engine, "%s", s->engine);
}

/* Copies a result payload into the caller's dst. */
static void deliver(const ag_job *j, const ProtobufCBinaryData *data, accelgate_result *res) {
    if (data->len > j->dst_cap) {
        res->dst_len = data->len;
        res->rc = ACCELGATE_E_TOO_SMALL;
        set_error(&res->error, ACCELGATE_E_TOO_SMALL, ACCELGATE_GRPC_RESOURCE_EXHAUSTED,
                  "the result of %zu bytes does not fit in dst_cap of %zu bytes", data->len, j->dst_cap);
        return;
    }
    if (data->len > 0) memcpy(j->dst, data->data, data->len);
    res->dst_len = data->len;
}

static void protocol_error(accelgate_result *res, const char *what) {
    res->rc = ACCELGATE_E_PROTOCOL;
    set_error(&res->error, ACCELGATE_E_PROTOCOL, ACCELGATE_GRPC_INTERNAL, "could not parse the %s response", what);
}

static void parse_response(const ag_job *j, const uint8_t *p, size_t n, accelgate_result *res) {
    switch (j->op) {
    case ACCELGATE_OP_COMPRESS: {
        Accelgate__V1__CompressResponse *r = accelgate__v1__compress_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "Compress");
        deliver(j, &r->data, res);
        copy_stats(r->stats, &res->stats);
        accelgate__v1__compress_response__free_unpacked(r, NULL);
        return;
    }
    case ACCELGATE_OP_DECOMPRESS: {
        Accelgate__V1__DecompressResponse *r = accelgate__v1__decompress_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "Decompress");
        deliver(j, &r->data, res);
        copy_stats(r->stats, &res->stats);
        accelgate__v1__decompress_response__free_unpacked(r, NULL);
        return;
    }
    case ACCELGATE_OP_ENCRYPT: {
        Accelgate__V1__EncryptResponse *r = accelgate__v1__encrypt_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "Encrypt");
        deliver(j, &r->ciphertext, res);
        if (r->nonce.len <= sizeof res->nonce) {
            if (r->nonce.len > 0) memcpy(res->nonce, r->nonce.data, r->nonce.len);
            res->nonce_len = r->nonce.len;
        }
        res->key_version = r->key_version;
        copy_stats(r->stats, &res->stats);
        accelgate__v1__encrypt_response__free_unpacked(r, NULL);
        return;
    }
    case ACCELGATE_OP_DECRYPT: {
        Accelgate__V1__DecryptResponse *r = accelgate__v1__decrypt_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "Decrypt");
        deliver(j, &r->plaintext, res);
        res->key_version = r->key_version;
        copy_stats(r->stats, &res->stats);
        wipe(r->plaintext.data, r->plaintext.len);
        accelgate__v1__decrypt_response__free_unpacked(r, NULL);
        return;
    }
    case ACCELGATE_OP_DIGEST: {
        Accelgate__V1__DigestResponse *r = accelgate__v1__digest_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "Digest");
        deliver(j, &r->digest, res);
        res->checksum = r->checksum;
        copy_stats(r->stats, &res->stats);
        accelgate__v1__digest_response__free_unpacked(r, NULL);
        return;
    }
    case AG_OP_DESCRIBE: {
        Accelgate__V1__DescribeDeviceResponse *r = accelgate__v1__describe_device_response__unpack(NULL, n, p);
        if (r == NULL) return protocol_error(res, "DescribeDevice");
        accelgate_limits *l = j->dst;
        memset(l, 0, sizeof *l);
        if (r->limits != NULL) {
            l->max_request_bytes = r->limits->max_request_bytes;
            l->max_response_bytes = r->limits->max_response_bytes;
            l->max_decompressed_bytes = r->limits->max_decompressed_bytes;
            l->default_deadline_ms = r->limits->default_deadline_ms;
        }
        if (r->tenant != NULL && r->tenant->id != NULL) snprintf(l->tenant, sizeof l->tenant, "%s", r->tenant->id);
        accelgate__v1__describe_device_response__free_unpacked(r, NULL);
        return;
    }
    }
}

static uint32_t retry_after(const grpc_metadata_array *md) {
    for (size_t i = 0; i < md->count; i++) {
        if (grpc_slice_str_cmp(md->metadata[i].key, "retry-after-ms") != 0) continue;
        const uint8_t *p = GRPC_SLICE_START_PTR(md->metadata[i].value);
        size_t n = GRPC_SLICE_LENGTH(md->metadata[i].value);
        uint64_t v = 0;
        for (size_t k = 0; k < n && p[k] >= '0' && p[k] <= '9' && v < UINT32_MAX; k++) v = v * 10 + (p[k] - '0');
        return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    return 0;
}

/* Turns a finished batch into a result. */
static void job_result(ag_job *j, int success, accelgate_result *res) {
    memset(res, 0, sizeof *res);
    res->op = j->op == AG_OP_DESCRIBE ? (accelgate_op)0 : (accelgate_op)j->op;
    res->dst = j->dst;
    if (!success) {
        res->rc = ACCELGATE_E_RPC;
        set_error(&res->error, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNKNOWN, "the gRPC batch failed");
        return;
    }
    if (j->status != GRPC_STATUS_OK) {
        res->rc = ACCELGATE_E_RPC;
        size_t n = GRPC_SLICE_LENGTH(j->details);
        if (n > 0) {
            set_error(&res->error, ACCELGATE_E_RPC, (int)j->status, "%.*s", (int)(n > INT_MAX ? INT_MAX : n),
                      (const char *)GRPC_SLICE_START_PTR(j->details));
        } else {
            set_error(&res->error, ACCELGATE_E_RPC, (int)j->status, "gRPC status %s",
                      accelgate_grpc_code_name((int)j->status));
        }
        res->error.retry_after_ms = retry_after(&j->trailing_md);
        return;
    }
    if (j->recv == NULL) {
        res->rc = ACCELGATE_E_PROTOCOL;
        set_error(&res->error, ACCELGATE_E_PROTOCOL, ACCELGATE_GRPC_INTERNAL, "the server sent no response message");
        return;
    }
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, j->recv)) {
        protocol_error(res, "compressed");
        return;
    }
    grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    parse_response(j, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), res);
    if (j->op == ACCELGATE_OP_DECRYPT) wipe(GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all));
    grpc_slice_unref(all);
    if (res->rc == ACCELGATE_OK) clear_error(&res->error);
}

/* ------------------------------------------------------------------------ */
/* Synchronous calls */

static void run_sync(accelgate_client *c, const ag_request *rq, void *dst, size_t dst_cap, int64_t timeout_ms,
                     accelgate_result *res) {
    memset(res, 0, sizeof *res);
    if (c == NULL) {
        res->rc = invalid(&res->error, "client must not be NULL");
        return;
    }
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    if (cq == NULL) {
        res->rc = nomem(&res->error);
        return;
    }
    ag_job *j;
    int rc = job_create(c, rq, dst, dst_cap, timeout_ms, cq, &j, &res->error);
    if (rc == ACCELGATE_OK) {
        rc = job_start(j, &res->error);
        if (rc == ACCELGATE_OK) {
            /* The call's deadline bounds the wait. */
            grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            job_result(j, ev.type == GRPC_OP_COMPLETE && ev.success, res);
            rc = res->rc;
        }
        job_free(j);
    }
    res->rc = rc;
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
}

/* Hands a sync result to the caller's out-parameters. */
static int sync_return(const accelgate_result *res, size_t *dst_len, accelgate_error *err) {
    if (dst_len != NULL) *dst_len = res->dst_len;
    if (err != NULL) *err = res->error;
    return res->rc;
}

int accelgate_compress(accelgate_client *c, accelgate_format format, int level, const void *src, size_t src_len,
                       void *dst, size_t dst_cap, size_t *dst_len, int64_t timeout_ms, accelgate_error *err) {
    if (dst_len == NULL) return invalid(err, "dst_len must not be NULL");
    *dst_len = 0;
    ag_request rq = {ACCELGATE_OP_COMPRESS, format, level, src, src_len, NULL, NULL};
    accelgate_result res;
    run_sync(c, &rq, dst, dst_cap, timeout_ms, &res);
    return sync_return(&res, dst_len, err);
}

int accelgate_decompress(accelgate_client *c, accelgate_format format, const void *src, size_t src_len, void *dst,
                         size_t dst_cap, size_t *dst_len, int64_t timeout_ms, accelgate_error *err) {
    if (dst_len == NULL) return invalid(err, "dst_len must not be NULL");
    *dst_len = 0;
    ag_request rq = {ACCELGATE_OP_DECOMPRESS, format, ACCELGATE_LEVEL_DEFAULT, src, src_len, NULL, NULL};
    accelgate_result res;
    run_sync(c, &rq, dst, dst_cap, timeout_ms, &res);
    return sync_return(&res, dst_len, err);
}

int accelgate_encrypt(accelgate_client *c, const accelgate_aead *aead, const void *src, size_t src_len, void *dst,
                      size_t dst_cap, size_t *dst_len, uint8_t nonce_out[ACCELGATE_NONCE_LEN], int64_t timeout_ms,
                      accelgate_error *err) {
    if (dst_len == NULL) return invalid(err, "dst_len must not be NULL");
    *dst_len = 0;
    ag_request rq = {ACCELGATE_OP_ENCRYPT, 0, ACCELGATE_LEVEL_DEFAULT, src, src_len, aead, NULL};
    accelgate_result res;
    run_sync(c, &rq, dst, dst_cap, timeout_ms, &res);
    if (res.rc == ACCELGATE_OK && nonce_out != NULL) {
        memset(nonce_out, 0, ACCELGATE_NONCE_LEN);
        memcpy(nonce_out, res.nonce, res.nonce_len);
    }
    return sync_return(&res, dst_len, err);
}

int accelgate_decrypt(accelgate_client *c, const accelgate_aead *aead, const void *src, size_t src_len, void *dst,
                      size_t dst_cap, size_t *dst_len, int64_t timeout_ms, accelgate_error *err) {
    if (dst_len == NULL) return invalid(err, "dst_len must not be NULL");
    *dst_len = 0;
    ag_request rq = {ACCELGATE_OP_DECRYPT, 0, ACCELGATE_LEVEL_DEFAULT, src, src_len, aead, NULL};
    accelgate_result res;
    run_sync(c, &rq, dst, dst_cap, timeout_ms, &res);
    return sync_return(&res, dst_len, err);
}

int accelgate_digest(accelgate_client *c, accelgate_digest_alg alg, const accelgate_key *key, const void *src,
                     size_t src_len, void *dst, size_t dst_cap, size_t *dst_len, int64_t timeout_ms,
                     accelgate_error *err) {
    if (dst_len == NULL) return invalid(err, "dst_len must not be NULL");
    *dst_len = 0;
    ag_request rq = {ACCELGATE_OP_DIGEST, alg, ACCELGATE_LEVEL_DEFAULT, src, src_len, NULL, key};
    accelgate_result res;
    run_sync(c, &rq, dst, dst_cap, timeout_ms, &res);
    return sync_return(&res, dst_len, err);
}

int accelgate_get_limits(accelgate_client *c, accelgate_limits *out, int64_t timeout_ms, accelgate_error *err) {
    if (out == NULL) return invalid(err, "out must not be NULL");
    ag_request rq = {AG_OP_DESCRIBE, 0, ACCELGATE_LEVEL_DEFAULT, NULL, 0, NULL, NULL};
    accelgate_result res;
    run_sync(c, &rq, out, sizeof *out, timeout_ms, &res);
    return sync_return(&res, NULL, err);
}

/* ------------------------------------------------------------------------ */
/* Asynchronous calls */

static void unlink_job(accelgate_client *c, ag_job *j) {
    if (j->prev != NULL) j->prev->next = j->next;
    else c->jobs = j->next;
    if (j->next != NULL) j->next->prev = j->prev;
    c->pending--;
}

static int submit(accelgate_client *c, const ag_request *rq, void *dst, size_t dst_cap, int64_t timeout_ms,
                  accelgate_callback cb, void *user, accelgate_error *err) {
    clear_error(err);
    if (c == NULL) return invalid(err, "client must not be NULL");
    if (cb == NULL) return invalid(err, "a callback is required");
    ag_job *j;
    int rc = job_create(c, rq, dst, dst_cap, timeout_ms, c->cq, &j, err);
    if (rc != ACCELGATE_OK) return rc;
    j->cb = cb;
    j->user = user;
    /* Listed before the batch starts: a concurrent poll may see it finish at once. */
    pthread_mutex_lock(&c->lock);
    if (c->closing) {
        pthread_mutex_unlock(&c->lock);
        job_free(j);
        return fail(err, ACCELGATE_E_RPC, ACCELGATE_GRPC_CANCELLED, "the client is closing");
    }
    j->next = c->jobs;
    if (c->jobs != NULL) c->jobs->prev = j;
    c->jobs = j;
    c->pending++;
    pthread_mutex_unlock(&c->lock);
    rc = job_start(j, err);
    if (rc != ACCELGATE_OK) {
        pthread_mutex_lock(&c->lock);
        unlink_job(c, j);
        pthread_mutex_unlock(&c->lock);
        job_free(j);
    }
    return rc;
}

int accelgate_submit_compress(accelgate_client *c, accelgate_format format, int level, const void *src,
                              size_t src_len, void *dst, size_t dst_cap, int64_t timeout_ms, accelgate_callback cb,
                              void *user, accelgate_error *err) {
    ag_request rq = {ACCELGATE_OP_COMPRESS, format, level, src, src_len, NULL, NULL};
    return submit(c, &rq, dst, dst_cap, timeout_ms, cb, user, err);
}

int accelgate_submit_decompress(accelgate_client *c, accelgate_format format, const void *src, size_t src_len,
                                void *dst, size_t dst_cap, int64_t timeout_ms, accelgate_callback cb, void *user,
                                accelgate_error *err) {
    ag_request rq = {ACCELGATE_OP_DECOMPRESS, format, ACCELGATE_LEVEL_DEFAULT, src, src_len, NULL, NULL};
    return submit(c, &rq, dst, dst_cap, timeout_ms, cb, user, err);
}

int accelgate_submit_encrypt(accelgate_client *c, const accelgate_aead *aead, const void *src, size_t src_len,
                             void *dst, size_t dst_cap, int64_t timeout_ms, accelgate_callback cb, void *user,
                             accelgate_error *err) {
    ag_request rq = {ACCELGATE_OP_ENCRYPT, 0, ACCELGATE_LEVEL_DEFAULT, src, src_len, aead, NULL};
    return submit(c, &rq, dst, dst_cap, timeout_ms, cb, user, err);
}

int accelgate_submit_decrypt(accelgate_client *c, const accelgate_aead *aead, const void *src, size_t src_len,
                             void *dst, size_t dst_cap, int64_t timeout_ms, accelgate_callback cb, void *user,
                             accelgate_error *err) {
    ag_request rq = {ACCELGATE_OP_DECRYPT, 0, ACCELGATE_LEVEL_DEFAULT, src, src_len, aead, NULL};
    return submit(c, &rq, dst, dst_cap, timeout_ms, cb, user, err);
}

int accelgate_submit_digest(accelgate_client *c, accelgate_digest_alg alg, const accelgate_key *key,
                            const void *src, size_t src_len, void *dst, size_t dst_cap, int64_t timeout_ms,
                            accelgate_callback cb, void *user, accelgate_error *err) {
    ag_request rq = {ACCELGATE_OP_DIGEST, alg, ACCELGATE_LEVEL_DEFAULT, src, src_len, NULL, key};
    return submit(c, &rq, dst, dst_cap, timeout_ms, cb, user, err);
}

/* Runs one finished job's callback, then unlists and frees the job. The job counts
   as pending until its callback has returned, so a thread that waits for
   accelgate_client_pending() == 0 sees every callback's effects, even when another
   thread's poll ran them. */
static void complete(accelgate_client *c, ag_job *j, int success) {
    accelgate_result res;
    job_result(j, success, &res);
    j->cb(&res, j->user);
    pthread_mutex_lock(&c->lock);
    unlink_job(c, j);
    pthread_mutex_unlock(&c->lock);
    job_free(j);
}

size_t accelgate_client_pending(accelgate_client *c) {
    if (c == NULL) return 0;
    pthread_mutex_lock(&c->lock);
    size_t n = c->pending;
    pthread_mutex_unlock(&c->lock);
    return n;
}

int accelgate_client_poll(accelgate_client *c, int timeout_ms) {
    if (c == NULL) return ACCELGATE_E_INVALID;
    int ran = 0;
    gpr_timespec until = timeout_ms > 0 ? deadline_after_ms(timeout_ms) : gpr_inf_past(GPR_CLOCK_MONOTONIC);
    for (;;) {
        if (accelgate_client_pending(c) == 0) return ran;
        gpr_timespec wait = until;
        if (ran == 0 && timeout_ms < 0) {
            /* Wait in slices, so a job finished by another poller cannot leave this
               one blocked with nothing pending. */
            wait = deadline_after_ms(100);
        } else if (ran > 0) {
            wait = gpr_inf_past(GPR_CLOCK_MONOTONIC);
        }
        grpc_event ev = grpc_completion_queue_next(c->cq, wait, NULL);
        if (ev.type == GRPC_OP_COMPLETE) {
            complete(c, ev.tag, ev.success);
            ran++;
        } else if (ran > 0 || timeout_ms >= 0) {
            return ran;
        }
    }
}

void accelgate_client_close(accelgate_client *c) {
    if (c == NULL) return;
    pthread_mutex_lock(&c->lock);
    c->closing = 1;
    for (ag_job *j = c->jobs; j != NULL; j = j->next) grpc_call_cancel(j->call, NULL);
    pthread_mutex_unlock(&c->lock);
    while (accelgate_client_pending(c) > 0) {
        grpc_event ev = grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_OP_COMPLETE) complete(c, ev.tag, ev.success);
    }
    destroy_client(c);
}
