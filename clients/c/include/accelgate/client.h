/*
 * libaccelgate-client: a plain C client for AccelGate (accelgate.v1.Accelerator).
 *
 * Compression (deflate, zlib, gzip, zstd, lz4), AEAD encryption and decryption
 * (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305, optionally chained with
 * compression) and digests (SHA-2, HMAC, CRC-32C, CRC-32, Adler-32) on a shared
 * accelerator, over gRPC's C core. No Swift or C++ runtime is needed by the
 * caller; link with `pkg-config --libs grpc libprotobuf-c` (see docs/CLIENTS.md).
 *
 * In the spirit of UADK's wd_comp / wd_cipher:
 *
 *     accelgate_client_config cfg;
 *     accelgate_client_config_init(&cfg);
 *     cfg.target = "127.0.0.1:50051";
 *     cfg.api_key = getenv("ACCELGATE_API_KEY");        // NULL: no tenants
 *     accelgate_client *c;
 *     accelgate_error err;
 *     if (accelgate_client_open(&cfg, &c, &err) != ACCELGATE_OK) { ...err.message... }
 *     size_t n;
 *     int rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, ACCELGATE_LEVEL_DEFAULT,
 *                                 src, src_len, dst, dst_cap, &n, 5000, &err);
 *     ...
 *     accelgate_client_close(c);
 *
 * RETURN VALUES AND ERRORS
 *   Every function that can fail returns an accelgate_rc: ACCELGATE_OK (0) or a
 *   negative ACCELGATE_E_* value, and fills the caller's accelgate_error (which
 *   may be NULL if the caller does not want details). err->grpc_code is always
 *   a gRPC status code: the server's (or gRPC core's) status for ACCELGATE_E_RPC,
 *   the closest code for errors found by the library itself (e.g.
 *   INVALID_ARGUMENT for ACCELGATE_E_INVALID). The server's table of codes is
 *   docs/STATUS.md. On success err->code and err->grpc_code are 0 and
 *   err->message is "".
 *
 * MEMORY OWNERSHIP
 *   - The library never takes ownership of caller memory and never returns
 *     memory the caller must free, except the client itself
 *     (accelgate_client_open allocates, accelgate_client_close frees).
 *   - Strings and PEM data in accelgate_client_config are copied (or consumed)
 *     during accelgate_client_open; the config may be freed as soon as it returns.
 *   - Synchronous calls borrow src, dst and parameter structs for the duration
 *     of the call only. Output is written to the caller's dst; the result is
 *     never larger than dst_cap.
 *   - accelgate_submit_* copies src, keys, nonce and AAD (into the request
 *     message) before it returns: they may be freed or reused at once. dst
 *     must stay valid and untouched until the job's callback has run.
 *   - The accelgate_result passed to a callback, and everything it points to
 *     except dst, belongs to the library and is valid only during the callback.
 *   - Key material in crypto requests, and decrypted plaintext held by the
 *     library, is zeroed before the library frees it (best effort: gRPC's own
 *     transport buffers are not under its control).
 *
 * THREAD SAFETY
 *   An accelgate_client may be shared by threads: synchronous calls, submits and
 *   accelgate_client_poll may run concurrently from any threads (each sync call
 *   uses its own completion queue; poll drains the client's shared one).
 *   Callbacks run on the thread that calls accelgate_client_poll (or
 *   accelgate_client_close), each exactly once; a callback may submit more jobs
 *   but must not call accelgate_client_poll or accelgate_client_close.
 *   accelgate_client_close must not run concurrently with any other call on the
 *   same client. Separate clients are independent.
 *
 * DEADLINES
 *   Every call takes timeout_ms: > 0 is a deadline that many milliseconds from
 *   now, sent to the server as grpc-timeout (it also bounds waiting in the
 *   server's queue); 0 uses config.default_timeout_ms; ACCELGATE_NO_DEADLINE (-1)
 *   waits as long as it takes (the server still applies its own default deadline).
 *   A passed deadline ends the call with ACCELGATE_E_RPC and DEADLINE_EXCEEDED.
 */
#ifndef ACCELGATE_CLIENT_H
#define ACCELGATE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The shared library exports only the functions declared here. */
#if defined(__GNUC__)
#define ACCELGATE_API __attribute__((visibility("default")))
#else
#define ACCELGATE_API
#endif

#define ACCELGATE_CLIENT_VERSION "0.1.0"

/** Nonce length of every AEAD algorithm the service offers. */
#define ACCELGATE_NONCE_LEN 12
/** AEAD tag length: raw-key ciphertext is plaintext length + this. */
#define ACCELGATE_TAG_LEN 16
/** Named-key envelope overhead (docs/KEYS.md): 6-byte header, nonce, tag. */
#define ACCELGATE_ENVELOPE_OVERHEAD (6 + ACCELGATE_NONCE_LEN + ACCELGATE_TAG_LEN)
/** Largest digest (SHA-512, HMAC-SHA512); checksums are 4 bytes, big-endian. */
#define ACCELGATE_DIGEST_MAX 64
/** Compression level "unset": the server's default for the format. */
#define ACCELGATE_LEVEL_DEFAULT (-1)
/** timeout_ms value for "no client deadline". */
#define ACCELGATE_NO_DEADLINE (-1)
/** Size of accelgate_error.message, including the terminating NUL. */
#define ACCELGATE_MESSAGE_MAX 256

/** Compression formats (values are the proto's CompressionFormat numbers). */
typedef enum accelgate_format {
    ACCELGATE_FORMAT_NONE = 0,    /* unset; for chained compression: none */
    ACCELGATE_FORMAT_DEFLATE = 1, /* raw DEFLATE (RFC 1951), levels 0-9 (default 6) */
    ACCELGATE_FORMAT_ZLIB = 2,    /* RFC 1950, levels 0-9 */
    ACCELGATE_FORMAT_GZIP = 3,    /* RFC 1952, levels 0-9; decompression accepts concatenated members */
    ACCELGATE_FORMAT_ZSTD = 4,    /* zstd frames, levels 1-19 (default 3); concatenated frames accepted */
    ACCELGATE_FORMAT_LZ4 = 5      /* LZ4 frames, levels 0-12 (default 0; 3+ = LZ4HC); concatenated frames accepted */
} accelgate_format;

/** AEAD algorithms (the proto's CipherAlgorithm numbers). */
typedef enum accelgate_cipher {
    ACCELGATE_CIPHER_UNSPECIFIED = 0, /* allowed with a named key: the key's own algorithm */
    ACCELGATE_CIPHER_AES_128_GCM = 16,       /* 16-byte key */
    ACCELGATE_CIPHER_AES_256_GCM = 17,       /* 32-byte key */
    ACCELGATE_CIPHER_CHACHA20_POLY1305 = 18  /* 32-byte key */
} accelgate_cipher;

/** Digest and checksum algorithms (the proto's DigestAlgorithm numbers). */
typedef enum accelgate_digest_alg {
    ACCELGATE_DIGEST_SHA256 = 32,      /* 32 bytes */
    ACCELGATE_DIGEST_SHA384 = 33,      /* 48 bytes */
    ACCELGATE_DIGEST_SHA512 = 34,      /* 64 bytes */
    ACCELGATE_DIGEST_HMAC_SHA256 = 35, /* 32 bytes; needs a key */
    ACCELGATE_DIGEST_HMAC_SHA512 = 36, /* 64 bytes; needs a key */
    ACCELGATE_DIGEST_CRC32C = 37,      /* 4 bytes, big-endian */
    ACCELGATE_DIGEST_CRC32 = 38,       /* 4 bytes, big-endian */
    ACCELGATE_DIGEST_ADLER32 = 39      /* 4 bytes, big-endian */
} accelgate_digest_alg;

/** gRPC status codes (same numbers as grpc/status.h, so this header needs no gRPC headers). */
enum {
    ACCELGATE_GRPC_OK = 0,
    ACCELGATE_GRPC_CANCELLED = 1,
    ACCELGATE_GRPC_UNKNOWN = 2,
    ACCELGATE_GRPC_INVALID_ARGUMENT = 3,
    ACCELGATE_GRPC_DEADLINE_EXCEEDED = 4,
    ACCELGATE_GRPC_NOT_FOUND = 5,
    ACCELGATE_GRPC_ALREADY_EXISTS = 6,
    ACCELGATE_GRPC_PERMISSION_DENIED = 7,
    ACCELGATE_GRPC_RESOURCE_EXHAUSTED = 8,
    ACCELGATE_GRPC_FAILED_PRECONDITION = 9,
    ACCELGATE_GRPC_ABORTED = 10,
    ACCELGATE_GRPC_OUT_OF_RANGE = 11,
    ACCELGATE_GRPC_UNIMPLEMENTED = 12,
    ACCELGATE_GRPC_INTERNAL = 13,
    ACCELGATE_GRPC_UNAVAILABLE = 14,
    ACCELGATE_GRPC_DATA_LOSS = 15,
    ACCELGATE_GRPC_UNAUTHENTICATED = 16
};

/** Return codes. */
typedef enum accelgate_rc {
    ACCELGATE_OK = 0,
    /** The call ended with a non-OK gRPC status (from the server, or from gRPC
        core: unreachable server, deadline, message too large, ...). */
    ACCELGATE_E_RPC = -1,
    /** A bad argument, found before anything was sent (grpc_code INVALID_ARGUMENT). */
    ACCELGATE_E_INVALID = -2,
    /** src (or the AAD) is larger than config.max_request_bytes; nothing was
        sent (grpc_code RESOURCE_EXHAUSTED). */
    ACCELGATE_E_TOO_LARGE = -3,
    /** The result did not fit in dst_cap bytes. The size needed is stored where
        the length would have been (*dst_len, or result->dst_len); the server's
        result was discarded and dst left unchanged (grpc_code RESOURCE_EXHAUSTED). */
    ACCELGATE_E_TOO_SMALL = -4,
    /** Out of memory (grpc_code RESOURCE_EXHAUSTED). */
    ACCELGATE_E_NOMEM = -5,
    /** The server's response could not be parsed (grpc_code INTERNAL). */
    ACCELGATE_E_PROTOCOL = -6
} accelgate_rc;

/** Error details. Plain data: no cleanup needed. */
typedef struct accelgate_error {
    int code;                 /* the accelgate_rc the function returned */
    int grpc_code;            /* gRPC status code (ACCELGATE_GRPC_*), 0 on success */
    uint32_t retry_after_ms;  /* the server's retry-after-ms hint (admission rejections), else 0 */
    char message[ACCELGATE_MESSAGE_MAX]; /* NUL-terminated, possibly truncated */
} accelgate_error;

typedef struct accelgate_client accelgate_client; /* opaque */

/** Client settings. Initialise with accelgate_client_config_init (or
    ACCELGATE_CLIENT_CONFIG_INIT), then set at least target. */
typedef struct accelgate_client_config {
    /** gRPC target: "host:port", "dns:///host:port", "ipv4:127.0.0.1:50051",
        "unix:///path"... Required. */
    const char *target;
    /** Tenant API key, sent as `authorization: Bearer <key>` on every call.
        NULL (default) sends none, which suits a server without --tenants. */
    const char *api_key;
    /** 0 (default): plaintext. 1: TLS. */
    int tls;
    /** TLS: PEM roots to verify the server; NULL = gRPC's default roots
        ($GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, then gRPC's bundled file). */
    const char *tls_root_certs_pem;
    /** mTLS: client certificate chain and private key (PEM); both or neither. */
    const char *tls_cert_chain_pem;
    const char *tls_private_key_pem;
    /** TLS: check the server certificate for this name instead of the target's
        host (e.g. "localhost" when dialling 127.0.0.1). NULL = target host. */
    const char *tls_server_name;
    /** Deadline for calls made with timeout_ms 0 [30000]. */
    int64_t default_timeout_ms;
    /** > 0: accelgate_client_open connects at once and fails (ACCELGATE_E_RPC,
        UNAVAILABLE or DEADLINE_EXCEEDED) if the server is not reachable within
        this many ms. 0 (default): connect lazily on the first call, which then
        fails with UNAVAILABLE if the server cannot be reached. */
    int64_t connect_timeout_ms;
    /** Largest src a call may send, checked before sending (ACCELGATE_E_TOO_LARGE)
        [4194304, the server's default --max-request-bytes]; 0 = no client check
        (the server's limit still applies: RESOURCE_EXHAUSTED). */
    size_t max_request_bytes;
    /** Largest response message accepted from the server [67108864]; 0 = gRPC's
        maximum (2 GiB). Must exceed the server's limits.max_response_bytes. */
    size_t max_response_bytes;
} accelgate_client_config;

#define ACCELGATE_CLIENT_CONFIG_INIT                                              \
    { NULL, NULL, 0, NULL, NULL, NULL, NULL, 30000, 0, (size_t)4 << 20, (size_t)64 << 20 }

/** Sets every field of *cfg to its default. */
ACCELGATE_API void accelgate_client_config_init(accelgate_client_config *cfg);

/**
 * Opens a client (a gRPC channel and the client's completion queue). On success
 * *out is a client the caller must pass to accelgate_client_close. On failure
 * *out is NULL and nothing needs freeing. Fails with ACCELGATE_E_INVALID for a
 * missing or malformed target (empty, whitespace or control characters), an
 * API key that is not a legal header value, half an mTLS key pair, or TLS
 * settings with tls = 0; with
 * ACCELGATE_E_RPC if connect_timeout_ms > 0 and the server is not reachable.
 */
ACCELGATE_API int accelgate_client_open(const accelgate_client_config *cfg, accelgate_client **out,
                          accelgate_error *err);

/**
 * Cancels jobs still pending (their callbacks run, with CANCELLED, before this
 * returns), closes the channel and frees the client. NULL is ignored.
 */
ACCELGATE_API void accelgate_client_close(accelgate_client *client);

/* ------------------------------------------------------------------------ */
/* Synchronous calls. Each writes at most dst_cap bytes to dst and stores the
 * output length in *dst_len (or, with ACCELGATE_E_TOO_SMALL, the length needed).
 * src may be NULL when src_len is 0. */

/** level: ACCELGATE_LEVEL_DEFAULT or a level of the format. A safe dst_cap is
    accelgate_compress_bound(src_len). */
ACCELGATE_API int accelgate_compress(accelgate_client *client, accelgate_format format, int level,
                       const void *src, size_t src_len, void *dst, size_t dst_cap,
                       size_t *dst_len, int64_t timeout_ms, accelgate_error *err);

/** The server caps the output at its --max-decompressed-bytes (RESOURCE_EXHAUSTED
    beyond it); a dst_cap below the real size gives ACCELGATE_E_TOO_SMALL with
    the size needed. */
ACCELGATE_API int accelgate_decompress(accelgate_client *client, accelgate_format format,
                         const void *src, size_t src_len, void *dst, size_t dst_cap,
                         size_t *dst_len, int64_t timeout_ms, accelgate_error *err);

/** A key: raw bytes in the request, or the name of a key of the caller's tenant
    in the server's keyring (docs/KEYS.md). Exactly one of raw / name. */
typedef struct accelgate_key {
    const void *raw;
    size_t raw_len;
    const char *name;
} accelgate_key;

/** AEAD parameters (input only). */
typedef struct accelgate_aead {
    accelgate_cipher algorithm;   /* required for raw keys */
    accelgate_key key;
    /** Encrypt: NULL/0 = the server draws a random nonce (returned via nonce_out
        or result->nonce); else ACCELGATE_NONCE_LEN bytes (raw keys only).
        Decrypt: the nonce for raw keys; NULL for named keys (it is in the envelope). */
    const uint8_t *nonce;
    size_t nonce_len;
    const void *aad;              /* additional authenticated data, may be NULL */
    size_t aad_len;               /* at most 64 KiB */
    /** Encrypt: compress the plaintext first; decrypt: decompress after, in the
        same device job. ACCELGATE_FORMAT_NONE (default) = no compression. */
    accelgate_format chain_format;
    int chain_level;              /* encrypt only; ACCELGATE_LEVEL_DEFAULT */
} accelgate_aead;

#define ACCELGATE_AEAD_INIT                                                       \
    { ACCELGATE_CIPHER_UNSPECIFIED, { NULL, 0, NULL }, NULL, 0, NULL, 0,          \
      ACCELGATE_FORMAT_NONE, ACCELGATE_LEVEL_DEFAULT }

/**
 * Raw keys: dst receives ciphertext || 16-byte tag (dst_cap >= src_len +
 * ACCELGATE_TAG_LEN). Named keys: the envelope (src_len +
 * ACCELGATE_ENVELOPE_OVERHEAD). With chain_format set, use
 * accelgate_compress_bound(src_len) + the overhead. nonce_out (may be NULL)
 * receives the ACCELGATE_NONCE_LEN-byte nonce used.
 */
ACCELGATE_API int accelgate_encrypt(accelgate_client *client, const accelgate_aead *aead,
                      const void *src, size_t src_len, void *dst, size_t dst_cap,
                      size_t *dst_len, uint8_t nonce_out[ACCELGATE_NONCE_LEN],
                      int64_t timeout_ms, accelgate_error *err);

/** A wrong key, nonce or AAD, or a tampered ciphertext or tag, gives
    ACCELGATE_E_RPC with INVALID_ARGUMENT "authentication failed"; no plaintext
    is written (*dst_len is 0). With a named key a damaged envelope header fails
    before the tag check: INVALID_ARGUMENT (not an envelope) or
    FAILED_PRECONDITION (unknown or retired key version, docs/KEYS.md). */
ACCELGATE_API int accelgate_decrypt(accelgate_client *client, const accelgate_aead *aead,
                      const void *src, size_t src_len, void *dst, size_t dst_cap,
                      size_t *dst_len, int64_t timeout_ms, accelgate_error *err);

/** key: NULL for unkeyed algorithms; required for HMAC. dst_cap >=
    ACCELGATE_DIGEST_MAX always suffices. Checksums are written as 4 big-endian
    bytes. */
ACCELGATE_API int accelgate_digest(accelgate_client *client, accelgate_digest_alg alg,
                     const accelgate_key *key, const void *src, size_t src_len,
                     void *dst, size_t dst_cap, size_t *dst_len, int64_t timeout_ms,
                     accelgate_error *err);

/** What the server enforces (from DescribeDevice). */
typedef struct accelgate_limits {
    uint64_t max_request_bytes;      /* largest payload of one request */
    uint64_t max_response_bytes;     /* largest response payload */
    uint64_t max_decompressed_bytes; /* decompression output cap */
    uint64_t default_deadline_ms;    /* applied to calls without a deadline */
    char tenant[64];                 /* the caller's tenant id (NUL-terminated) */
} accelgate_limits;

ACCELGATE_API int accelgate_get_limits(accelgate_client *client, accelgate_limits *out,
                         int64_t timeout_ms, accelgate_error *err);

/** Largest output the server produces for src_len bytes in any format (its
    accel_compress_bound: n + n/256 + 1024). */
ACCELGATE_API size_t accelgate_compress_bound(size_t src_len);

/* ------------------------------------------------------------------------ */
/* Asynchronous calls. A submit starts the call and returns at once; the job's
 * callback runs later from accelgate_client_poll. If a submit fails it returns
 * the error and the callback never runs. Errors from the server arrive in the
 * callback's result instead (result->rc, result->error), as the synchronous
 * call would return them: e.g. accelgate_submit_decrypt of a tampered
 * ciphertext returns ACCELGATE_OK, then its callback gets ACCELGATE_E_RPC,
 * INVALID_ARGUMENT "authentication failed", dst_len 0 and dst untouched. */

typedef enum accelgate_op {
    ACCELGATE_OP_COMPRESS = 1,
    ACCELGATE_OP_DECOMPRESS = 2,
    ACCELGATE_OP_ENCRYPT = 3,
    ACCELGATE_OP_DECRYPT = 4,
    ACCELGATE_OP_DIGEST = 5
} accelgate_op;

/** Per-job measurements the server returns with each result. */
typedef struct accelgate_job_stats {
    uint64_t queue_wait_ns;  /* admission until the job was on a hardware queue */
    uint64_t device_ns;      /* device time charged */
    uint64_t total_ns;       /* admission to completion */
    uint64_t input_bytes;
    uint64_t output_bytes;
    uint32_t queue_id;
    uint32_t engine_id;
    uint32_t batch_size;     /* descriptors behind the same doorbell */
    char engine[32];         /* engine library, e.g. "libdeflate" (NUL-terminated) */
} accelgate_job_stats;

/** The outcome of an asynchronous job, valid only during its callback. */
typedef struct accelgate_result {
    accelgate_op op;
    int rc;                  /* what the synchronous call would have returned */
    accelgate_error error;   /* details when rc != ACCELGATE_OK */
    void *dst;               /* the caller's dst, as submitted */
    size_t dst_len;          /* bytes written (ACCELGATE_E_TOO_SMALL: bytes needed) */
    accelgate_job_stats stats;      /* when rc == ACCELGATE_OK */
    uint8_t nonce[ACCELGATE_NONCE_LEN]; /* encrypt: the nonce used */
    size_t nonce_len;
    uint32_t key_version;    /* encrypt/decrypt with a named key: its version */
    uint32_t checksum;       /* digest of CRC-32C, CRC-32, Adler-32: as a number */
} accelgate_result;

typedef void (*accelgate_callback)(const accelgate_result *result, void *user);

ACCELGATE_API int accelgate_submit_compress(accelgate_client *client, accelgate_format format, int level,
                              const void *src, size_t src_len, void *dst, size_t dst_cap,
                              int64_t timeout_ms, accelgate_callback cb, void *user,
                              accelgate_error *err);
ACCELGATE_API int accelgate_submit_decompress(accelgate_client *client, accelgate_format format,
                                const void *src, size_t src_len, void *dst, size_t dst_cap,
                                int64_t timeout_ms, accelgate_callback cb, void *user,
                                accelgate_error *err);
ACCELGATE_API int accelgate_submit_encrypt(accelgate_client *client, const accelgate_aead *aead,
                             const void *src, size_t src_len, void *dst, size_t dst_cap,
                             int64_t timeout_ms, accelgate_callback cb, void *user,
                             accelgate_error *err);
ACCELGATE_API int accelgate_submit_decrypt(accelgate_client *client, const accelgate_aead *aead,
                             const void *src, size_t src_len, void *dst, size_t dst_cap,
                             int64_t timeout_ms, accelgate_callback cb, void *user,
                             accelgate_error *err);
ACCELGATE_API int accelgate_submit_digest(accelgate_client *client, accelgate_digest_alg alg,
                            const accelgate_key *key, const void *src, size_t src_len,
                            void *dst, size_t dst_cap, int64_t timeout_ms,
                            accelgate_callback cb, void *user, accelgate_error *err);

/**
 * Runs the callbacks of finished jobs. Waits up to timeout_ms for the first one
 * (0: do not wait; negative: wait until one finishes), then runs every other
 * callback that is ready without waiting. Returns the number of callbacks run
 * (0 when none finished in time, or at once when nothing is pending), or
 * ACCELGATE_E_INVALID for a NULL client.
 */
ACCELGATE_API int accelgate_client_poll(accelgate_client *client, int timeout_ms);

/** Jobs submitted whose callbacks have not returned yet (a running callback
    counts its own job). When it reaches 0, every callback has finished, on
    whichever thread polled it. */
ACCELGATE_API size_t accelgate_client_pending(accelgate_client *client);

/* ------------------------------------------------------------------------ */
/* Names, for messages. Static strings; never NULL. */

/** "OK", "INVALID_ARGUMENT", ..., "UNAUTHENTICATED"; "UNKNOWN_CODE" otherwise. */
ACCELGATE_API const char *accelgate_grpc_code_name(int grpc_code);
/** Short description of an accelgate_rc. */
ACCELGATE_API const char *accelgate_strerror(int rc);
/** "deflate", "zlib", "gzip", "zstd", "lz4"; "?" for other values. */
ACCELGATE_API const char *accelgate_format_name(accelgate_format format);
/** Parses a format name (as above); returns ACCELGATE_FORMAT_NONE if unknown. */
ACCELGATE_API accelgate_format accelgate_format_from_name(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* ACCELGATE_CLIENT_H */
