/*
 * Tests of libaccelgate-client against a live `accelgate serve`.
 * Driven by tests/interop/test_c_client.py, which starts the servers and runs
 * the ASan/UBSan/LSan build (build/asan/client_test) once per section:
 *
 *   client_test SECTION...     sections: compress crypto errors async threads tls
 *   client_test leak-selftest  leaks a client on purpose (LeakSanitizer must report it)
 *
 * Environment (set by the pytest wrapper):
 *   AG_TARGET          host:port of a server with --tenants and --keyring
 *   AG_API_KEY         a valid API key of tenant AG_TENANT
 *   AG_TENANT          that tenant's id
 *   AG_KEY_NAME        a named AES-256-GCM key of that tenant in the keyring
 *   AG_KEY_HEX         its key bytes (version 1), hex, for the independent check
 *   AG_CLOSED_PORT     a local port nobody listens on
 *   AG_TLS_TARGET      host:port of an mTLS server (open tenant), for `tls`
 *   AG_TLS_ROOTS       PEM file of its CA;  AG_TLS_OTHER_ROOTS  an unrelated CA
 *   AG_TLS_CERT, AG_TLS_KEY  a client certificate and key from the CA
 *   AG_OUT_DIR         where `compress` writes outputs for Python to cross-check
 *
 * Results are checked independently of the service where a reference exists:
 * zlib (deflate, zlib, gzip, CRC-32, Adler-32), libzstd, liblz4, OpenSSL (AEAD,
 * SHA-2, HMAC) and a bitwise CRC-32C. Prints one line per failed check and a
 * summary; exits 0 only if every check passed.
 */
#include "accelgate/client.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lz4frame.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <zlib.h>
#include <zstd.h>

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define MAX_REQUEST (4 * MiB) /* the server's default --max-request-bytes */
#define TIMEOUT_MS 30000

static int checks, failures;
static const char *section = "";

#define CHECK(cond, ...)                                                                                           \
    do {                                                                                                           \
        checks++;                                                                                                  \
        if (!(cond)) {                                                                                             \
            failures++;                                                                                            \
            fprintf(stderr, "FAIL [%s] %s:%d: ", section, __FILE__, __LINE__);                                    \
            fprintf(stderr, __VA_ARGS__);                                                                          \
            fputc('\n', stderr);                                                                                   \
        }                                                                                                          \
    } while (0)

/* rc and gRPC code of a call, with the error message on mismatch. */
#define CHECK_ERR(rc, want_rc, want_grpc, err, what)                                                               \
    CHECK((rc) == (want_rc) && (err).code == (want_rc) && (err).grpc_code == (want_grpc) &&                        \
              ((want_rc) == ACCELGATE_OK || (err).message[0] != '\0'),                                             \
          "%s: expected rc %d grpc %s, got rc %d grpc %s (%d): '%s'", what, want_rc,                               \
          accelgate_grpc_code_name(want_grpc), rc, accelgate_grpc_code_name((err).grpc_code), (err).grpc_code,     \
          (err).message)

#define CHECK_OK(rc, err, what) CHECK_ERR(rc, ACCELGATE_OK, ACCELGATE_GRPC_OK, err, what)

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "client_test: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static const char *env(const char *name) {
    const char *v = getenv(name);
    if (v == NULL || v[0] == '\0') die("%s is not set", name);
    return v;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (p == NULL) die("out of memory");
    return p;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------------ */
/* Payloads */

static _Thread_local uint64_t rng_state = 0x9E3779B97F4A7C15ull; /* threads fill buffers too */

static uint64_t rng(void) {
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static void fill_random(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(rng() >> 32);
}

/* English-ish word salad, compressible like logs. */
static void fill_text(uint8_t *p, size_t n) {
    static const char *const words[] = {"the",      "of",     "and",    "accelerator", "queue",   "engine",
                                        "doorbell", "tenant", "stream", "completion",  "payload", "device",
                                        "ring",     "batch",  "header", "checksum",    "latency", "buffer"};
    size_t i = 0;
    while (i < n) {
        const char *w = words[rng() % (sizeof words / sizeof words[0])];
        for (; *w && i < n; w++) p[i++] = (uint8_t)*w;
        if (i < n) p[i++] = (rng() % 11 == 0) ? '\n' : ' ';
    }
}

static void hex_decode(const char *hex, uint8_t *out, size_t *n) {
    size_t len = strlen(hex) / 2;
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) die("bad hex");
        out[i] = (uint8_t)v;
    }
    *n = len;
}

static int write_file(const char *dir, const char *name, const void *p, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    size_t w = fwrite(p, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

/* ------------------------------------------------------------------------ */
/* Reference implementations */

/* Inflates one complete stream (windowBits: -15 raw, 15 zlib, 31 gzip); gzip members may follow each other.
   Returns the output length, or (size_t)-1 if zlib rejects the stream or bytes are left over. */
static size_t ref_inflate(int window_bits, const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    size_t out = 0;
    const uint8_t *p = src;
    size_t left = n;
    do {
        z_stream z;
        memset(&z, 0, sizeof z);
        if (inflateInit2(&z, window_bits) != Z_OK) return (size_t)-1;
        z.next_in = (Bytef *)p;
        z.avail_in = (uInt)left;
        z.next_out = dst + out;
        z.avail_out = (uInt)(cap - out);
        int r = inflate(&z, Z_FINISH);
        size_t produced = (cap - out) - z.avail_out;
        size_t consumed = left - z.avail_in;
        inflateEnd(&z);
        if (r != Z_STREAM_END) return (size_t)-1;
        out += produced;
        p += consumed;
        left -= consumed;
    } while (window_bits == 31 && left > 0);
    return left == 0 ? out : (size_t)-1;
}

static size_t ref_zstd_decompress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    size_t r = ZSTD_decompress(dst, cap, src, n);
    return ZSTD_isError(r) ? (size_t)-1 : r;
}

static size_t ref_lz4_decompress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    LZ4F_dctx *d;
    if (LZ4F_isError(LZ4F_createDecompressionContext(&d, LZ4F_VERSION))) return (size_t)-1;
    size_t out = 0, in = 0, hint = 1;
    while (in < n && hint != 0) {
        size_t dlen = cap - out, slen = n - in;
        hint = LZ4F_decompress(d, dst + out, &dlen, src + in, &slen, NULL);
        if (LZ4F_isError(hint) || (dlen == 0 && slen == 0)) {
            out = (size_t)-1;
            break;
        }
        out += dlen;
        in += slen;
        if (hint == 0 && in < n) { /* another frame follows */
            LZ4F_resetDecompressionContext(d);
            hint = 1;
        }
    }
    LZ4F_freeDecompressionContext(d);
    if (out != (size_t)-1 && (hint != 0 || in != n)) out = (size_t)-1;
    return out;
}

static size_t ref_decompress(accelgate_format f, const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    switch (f) {
    case ACCELGATE_FORMAT_DEFLATE: return ref_inflate(-15, src, n, dst, cap);
    case ACCELGATE_FORMAT_ZLIB: return ref_inflate(15, src, n, dst, cap);
    case ACCELGATE_FORMAT_GZIP: return ref_inflate(31, src, n, dst, cap);
    case ACCELGATE_FORMAT_ZSTD: return ref_zstd_decompress(src, n, dst, cap);
    case ACCELGATE_FORMAT_LZ4: return ref_lz4_decompress(src, n, dst, cap);
    default: return (size_t)-1;
    }
}

static size_t ref_compress(accelgate_format f, const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    if (f == ACCELGATE_FORMAT_ZSTD) {
        size_t r = ZSTD_compress(dst, cap, src, n, 3);
        return ZSTD_isError(r) ? (size_t)-1 : r;
    }
    if (f == ACCELGATE_FORMAT_LZ4) {
        LZ4F_preferences_t prefs;
        memset(&prefs, 0, sizeof prefs);
        prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
        size_t r = LZ4F_compressFrame(dst, cap, src, n, &prefs);
        return LZ4F_isError(r) ? (size_t)-1 : r;
    }
    int wb = f == ACCELGATE_FORMAT_DEFLATE ? -15 : f == ACCELGATE_FORMAT_ZLIB ? 15 : 31;
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, 6, Z_DEFLATED, wb, 8, Z_DEFAULT_STRATEGY) != Z_OK) return (size_t)-1;
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)n;
    z.next_out = dst;
    z.avail_out = (uInt)cap;
    int r = deflate(&z, Z_FINISH);
    size_t out = cap - z.avail_out;
    deflateEnd(&z);
    return r == Z_STREAM_END ? out : (size_t)-1;
}

static const EVP_CIPHER *ref_cipher(accelgate_cipher c) {
    switch (c) {
    case ACCELGATE_CIPHER_AES_128_GCM: return EVP_aes_128_gcm();
    case ACCELGATE_CIPHER_AES_256_GCM: return EVP_aes_256_gcm();
    case ACCELGATE_CIPHER_CHACHA20_POLY1305: return EVP_chacha20_poly1305();
    default: return NULL;
    }
}

/* AEAD open with OpenSSL; ct includes the 16-byte tag. Returns plaintext length or -1. */
static long ref_aead_open(accelgate_cipher alg, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad,
                          size_t aad_len, const uint8_t *ct, size_t ct_len, uint8_t *out) {
    if (ct_len < ACCELGATE_TAG_LEN) return -1;
    size_t n = ct_len - ACCELGATE_TAG_LEN;
    EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
    int len = 0, ok = EVP_DecryptInit_ex(x, ref_cipher(alg), NULL, NULL, NULL) &&
                      EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_SET_IVLEN, ACCELGATE_NONCE_LEN, NULL) &&
                      EVP_DecryptInit_ex(x, NULL, NULL, key, nonce);
    if (ok && aad_len > 0) ok = EVP_DecryptUpdate(x, NULL, &len, aad, (int)aad_len);
    long total = 0;
    if (ok && n > 0) {
        ok = EVP_DecryptUpdate(x, out, &len, ct, (int)n);
        total = len;
    }
    if (ok) ok = EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_AEAD_SET_TAG, ACCELGATE_TAG_LEN, (void *)(ct + n));
    if (ok) ok = EVP_DecryptFinal_ex(x, out + total, &len) > 0;
    EVP_CIPHER_CTX_free(x);
    return ok ? total + len : -1;
}

static uint32_t ref_crc32c(const uint8_t *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
    }
    return ~crc;
}

/* Reference digest; returns its length. */
static size_t ref_digest(accelgate_digest_alg alg, const uint8_t *key, size_t key_len, const uint8_t *p, size_t n,
                         uint8_t *out) {
    unsigned len = 0;
    uint32_t v;
    switch (alg) {
    case ACCELGATE_DIGEST_SHA256: EVP_Digest(p, n, out, &len, EVP_sha256(), NULL); return len;
    case ACCELGATE_DIGEST_SHA384: EVP_Digest(p, n, out, &len, EVP_sha384(), NULL); return len;
    case ACCELGATE_DIGEST_SHA512: EVP_Digest(p, n, out, &len, EVP_sha512(), NULL); return len;
    case ACCELGATE_DIGEST_HMAC_SHA256: HMAC(EVP_sha256(), key, (int)key_len, p, n, out, &len); return len;
    case ACCELGATE_DIGEST_HMAC_SHA512: HMAC(EVP_sha512(), key, (int)key_len, p, n, out, &len); return len;
    case ACCELGATE_DIGEST_CRC32C: v = ref_crc32c(p, n); break;
    case ACCELGATE_DIGEST_CRC32: v = (uint32_t)crc32(0, p, (uInt)n); break;
    case ACCELGATE_DIGEST_ADLER32: v = (uint32_t)adler32(1, p, (uInt)n); break;
    default: return 0;
    }
    out[0] = (uint8_t)(v >> 24), out[1] = (uint8_t)(v >> 16), out[2] = (uint8_t)(v >> 8), out[3] = (uint8_t)v;
    return 4;
}

/* ------------------------------------------------------------------------ */
/* Clients */

static accelgate_client *open_client(const char *target, const char *api_key) {
    accelgate_client_config cfg;
    accelgate_client_config_init(&cfg);
    cfg.target = target;
    cfg.api_key = api_key;
    accelgate_client *c = NULL;
    accelgate_error err;
    int rc = accelgate_client_open(&cfg, &c, &err);
    if (rc != ACCELGATE_OK) die("open %s: %s", target, err.message);
    return c;
}

static accelgate_client *main_client(void) { return open_client(env("AG_TARGET"), env("AG_API_KEY")); }

/* ------------------------------------------------------------------------ */
/* compress: every format, both directions, checked against the reference libraries */

static const accelgate_format formats[] = {ACCELGATE_FORMAT_DEFLATE, ACCELGATE_FORMAT_ZLIB, ACCELGATE_FORMAT_GZIP,
                                           ACCELGATE_FORMAT_ZSTD, ACCELGATE_FORMAT_LZ4};
#define NFORMATS (sizeof formats / sizeof formats[0])

/* Levels to try on small payloads: default, lowest, highest. */
static void levels_of(accelgate_format f, int out[3]) {
    out[0] = ACCELGATE_LEVEL_DEFAULT;
    out[1] = f == ACCELGATE_FORMAT_ZSTD ? 1 : 0;
    out[2] = f == ACCELGATE_FORMAT_ZSTD ? 19 : f == ACCELGATE_FORMAT_LZ4 ? 12 : 9;
}

/* Compresses through the service, checks with the reference decoder and the
   service's own decompression. Returns the compressed size. */
static size_t round_trip(accelgate_client *c, accelgate_format f, int level, const uint8_t *data, size_t n,
                         uint8_t *comp, size_t comp_cap, uint8_t *back, size_t back_cap, const char *what) {
    accelgate_error err;
    size_t clen = 0, dlen = 0;
    char label[160];
    snprintf(label, sizeof label, "%s %s level %d, %zu B", what, accelgate_format_name(f), level, n);
    int rc = accelgate_compress(c, f, level, data, n, comp, comp_cap, &clen, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, label);
    if (rc != ACCELGATE_OK) return 0;
    CHECK(clen <= accelgate_compress_bound(n), "%s: %zu B is over the compress bound", label, clen);
    size_t ref = ref_decompress(f, comp, clen, back, back_cap);
    CHECK(ref == n && (n == 0 || memcmp(back, data, n) == 0), "%s: the reference decoder does not give the input back",
          label);
    memset(back, 0xAB, n < back_cap ? n : back_cap);
    if (clen > MAX_REQUEST) {
        /* Incompressible input grows past the request limit: it cannot be sent back
           (the client's own check stops it), the reference decoder checked it above. */
        rc = accelgate_decompress(c, f, comp, clen, back, back_cap, &dlen, TIMEOUT_MS, &err);
        CHECK_ERR(rc, ACCELGATE_E_TOO_LARGE, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, label);
        return clen;
    }
    rc = accelgate_decompress(c, f, comp, clen, back, back_cap, &dlen, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, label);
    CHECK(dlen == n && (n == 0 || memcmp(back, data, n) == 0), "%s: service decompression differs", label);
    if (level == 0 && n >= 4 * KiB && f != ACCELGATE_FORMAT_LZ4)
        CHECK(clen >= n, "%s: level 0 should store, got %zu B", label, clen);
    return clen;
}

static void test_compress(void) {
    accelgate_client *c = main_client();
    const char *out_dir = getenv("AG_OUT_DIR");
    size_t cap = accelgate_compress_bound(MAX_REQUEST);
    uint8_t *text = xmalloc(MAX_REQUEST), *rnd = xmalloc(MAX_REQUEST);
    uint8_t *comp = xmalloc(cap), *back = xmalloc(MAX_REQUEST + 1);
    fill_text(text, MAX_REQUEST);
    fill_random(rnd, MAX_REQUEST);
    if (out_dir && write_file(out_dir, "input.bin", text, MiB) != 0) die("cannot write to %s", out_dir);

    for (size_t fi = 0; fi < NFORMATS; fi++) {
        accelgate_format f = formats[fi];
        int levels[3];
        levels_of(f, levels);
        /* Small payloads at three levels each. */
        for (int li = 0; li < 3; li++) {
            round_trip(c, f, levels[li], text, 0, comp, cap, back, MAX_REQUEST, "empty");
            round_trip(c, f, levels[li], (const uint8_t *)"x", 1, comp, cap, back, MAX_REQUEST, "1 byte");
            size_t clen = round_trip(c, f, levels[li], text, 64 * KiB, comp, cap, back, MAX_REQUEST, "text");
            if (levels[li] != 0) CHECK(clen > 0 && clen < 32 * KiB, "%s text: %zu B is not compressed", accelgate_format_name(f), clen);
        }
        /* Larger ones at the default level, up to the server's request limit. */
        round_trip(c, f, ACCELGATE_LEVEL_DEFAULT, rnd, MiB, comp, cap, back, MAX_REQUEST, "random");
        round_trip(c, f, ACCELGATE_LEVEL_DEFAULT, rnd, MAX_REQUEST, comp, cap, back, MAX_REQUEST, "max random");
        size_t clen = round_trip(c, f, 1, text, MiB, comp, cap, back, MAX_REQUEST, "1 MiB text");
        if (out_dir && clen > 0) {
            char name[32];
            snprintf(name, sizeof name, "input.bin.%s", accelgate_format_name(f));
            CHECK(write_file(out_dir, name, comp, clen) == 0, "cannot write %s", name);
        }

        /* The service decompresses what the reference library wrote. */
        accelgate_error err;
        size_t rlen = ref_compress(f, text, 256 * KiB, comp, cap), dlen = 0;
        CHECK(rlen != (size_t)-1, "reference %s compression failed", accelgate_format_name(f));
        int rc = accelgate_decompress(c, f, comp, rlen, back, MAX_REQUEST, &dlen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "decompress of reference output");
        CHECK(dlen == 256 * KiB && memcmp(back, text, dlen) == 0, "%s: reference stream decompressed wrongly",
              accelgate_format_name(f));

        /* A dst too small: the size needed is reported, dst is untouched, and that size works. */
        size_t need = 0;
        memset(back, 0x5A, 64);
        rc = accelgate_decompress(c, f, comp, rlen, back, 64, &need, TIMEOUT_MS, &err);
        CHECK_ERR(rc, ACCELGATE_E_TOO_SMALL, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "decompress into 64 bytes");
        CHECK(need == 256 * KiB, "decompress: needed %zu, expected %zu", need, 256 * KiB);
        CHECK(back[0] == 0x5A && back[63] == 0x5A, "dst was written although it was too small");
        rc = accelgate_compress(c, f, ACCELGATE_LEVEL_DEFAULT, text, 64 * KiB, comp, 16, &need, TIMEOUT_MS, &err);
        CHECK_ERR(rc, ACCELGATE_E_TOO_SMALL, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "compress into 16 bytes");
        size_t again = 0;
        rc = accelgate_compress(c, f, ACCELGATE_LEVEL_DEFAULT, text, 64 * KiB, comp, need, &again, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "compress into the size reported as needed");
        CHECK(again == need, "compress: reported %zu needed, then produced %zu", need, again);
    }

    /* Concatenated gzip members, zstd and lz4 frames decompress as one. */
    for (size_t fi = 2; fi < NFORMATS; fi++) {
        accelgate_format f = formats[fi];
        accelgate_error err;
        size_t a = 0, b = 0, dlen = 0;
        int rc = accelgate_compress(c, f, ACCELGATE_LEVEL_DEFAULT, text, 100 * KiB, comp, cap, &a, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "first member");
        rc = accelgate_compress(c, f, ACCELGATE_LEVEL_DEFAULT, text + 100 * KiB, 50 * KiB, comp + a, cap - a, &b,
                                TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "second member");
        rc = accelgate_decompress(c, f, comp, a + b, back, MAX_REQUEST, &dlen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "concatenated members");
        CHECK(dlen == 150 * KiB && memcmp(back, text, dlen) == 0, "%s: concatenation decompressed wrongly",
              accelgate_format_name(f));
    }

    /* The server's limits and the caller's tenant, from DescribeDevice. */
    accelgate_limits lim;
    accelgate_error err;
    int rc = accelgate_get_limits(c, &lim, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, "get_limits");
    CHECK(lim.max_request_bytes == MAX_REQUEST, "max_request_bytes %" PRIu64, lim.max_request_bytes);
    CHECK(lim.max_response_bytes >= accelgate_compress_bound(MAX_REQUEST) - 1024, "max_response_bytes %" PRIu64,
          lim.max_response_bytes);
    CHECK(strcmp(lim.tenant, env("AG_TENANT")) == 0, "tenant '%s'", lim.tenant);

    free(text);
    free(rnd);
    free(comp);
    free(back);
    accelgate_client_close(c);
}

/* ------------------------------------------------------------------------ */
/* crypto: AEAD with raw and named keys, chaining, digests and HMAC */

static const accelgate_cipher ciphers[] = {ACCELGATE_CIPHER_AES_128_GCM, ACCELGATE_CIPHER_AES_256_GCM,
                                           ACCELGATE_CIPHER_CHACHA20_POLY1305};

static void test_aead_raw(accelgate_client *c, accelgate_cipher alg, const uint8_t *pt, size_t n) {
    size_t key_len = alg == ACCELGATE_CIPHER_AES_128_GCM ? 16 : 32;
    uint8_t key[32], nonce[ACCELGATE_NONCE_LEN], aad[40];
    fill_random(key, sizeof key);
    fill_random(aad, sizeof aad);
    uint8_t *ct = xmalloc(n + ACCELGATE_TAG_LEN), *back = xmalloc(n + 1);
    char label[96];
    snprintf(label, sizeof label, "encrypt alg %d, %zu B", alg, n);
    accelgate_aead a = ACCELGATE_AEAD_INIT;
    a.algorithm = alg;
    a.key.raw = key;
    a.key.raw_len = key_len;
    a.aad = aad;
    a.aad_len = sizeof aad;
    accelgate_error err;
    size_t clen = 0, plen = 0;

    /* Random nonce from the server, returned to the caller. */
    int rc = accelgate_encrypt(c, &a, pt, n, ct, n + ACCELGATE_TAG_LEN, &clen, nonce, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, label);
    CHECK(clen == n + ACCELGATE_TAG_LEN, "%s: ciphertext of %zu B", label, clen);
    long ref = ref_aead_open(alg, key, nonce, aad, sizeof aad, ct, clen, back);
    CHECK(ref == (long)n && (n == 0 || memcmp(back, pt, n) == 0), "%s: OpenSSL cannot open the ciphertext", label);
    a.nonce = nonce;
    a.nonce_len = sizeof nonce;
    rc = accelgate_decrypt(c, &a, ct, clen, back, n + 1, &plen, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, "decrypt");
    CHECK(plen == n && (n == 0 || memcmp(back, pt, n) == 0), "%s: decrypt differs", label);

    /* Caller's nonce is used as given. */
    uint8_t mine[ACCELGATE_NONCE_LEN], used[ACCELGATE_NONCE_LEN];
    fill_random(mine, sizeof mine);
    a.nonce = mine;
    rc = accelgate_encrypt(c, &a, pt, n, ct, n + ACCELGATE_TAG_LEN, &clen, used, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, "encrypt with a caller nonce");
    CHECK(memcmp(used, mine, sizeof mine) == 0, "the server did not use the caller's nonce");
    ref = ref_aead_open(alg, key, mine, aad, sizeof aad, ct, clen, back);
    CHECK(ref == (long)n, "%s: OpenSSL cannot open the ciphertext made with the caller's nonce", label);

    /* Tampering, a wrong AAD and a wrong key all fail authentication, and write nothing. */
    ct[clen - 1] ^= 1;
    memset(back, 0x77, n + 1);
    rc = accelgate_decrypt(c, &a, ct, clen, back, n + 1, &plen, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "tampered tag");
    CHECK(strstr(err.message, "authentication failed") != NULL, "tampered tag: '%s'", err.message);
    CHECK(back[0] == 0x77 && plen == 0, "plaintext released after a failed tag check");
    ct[clen - 1] ^= 1;
    a.aad_len = sizeof aad - 1;
    rc = accelgate_decrypt(c, &a, ct, clen, back, n + 1, &plen, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "wrong AAD");
    a.aad_len = sizeof aad;
    /* Wrong key length → INVALID_ARGUMENT from the service's checks. */
    a.key.raw_len = key_len == 16 ? 32 : 16;
    rc = accelgate_encrypt(c, &a, pt, n, ct, n + ACCELGATE_TAG_LEN, &clen, NULL, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "wrong key length");
    free(ct);
    free(back);
}

static void test_crypto(void) {
    accelgate_client *c = main_client();
    size_t sizes[] = {0, 1, 4 * KiB + 3, MiB};
    uint8_t *pt = xmalloc(MiB);
    fill_text(pt, MiB);
    for (size_t ci = 0; ci < 3; ci++)
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) test_aead_raw(c, ciphers[ci], pt, sizes[si]);

    accelgate_error err;
    int rc;
    /* Compress-then-encrypt in one job, and decrypt-then-decompress. */
    {
        uint8_t key[32], nonce[ACCELGATE_NONCE_LEN];
        fill_random(key, sizeof key);
        size_t n = 256 * KiB, cap = accelgate_compress_bound(n) + ACCELGATE_TAG_LEN, clen = 0, plen = 0;
        uint8_t *ct = xmalloc(cap), *back = xmalloc(n), *inner = xmalloc(cap);
        accelgate_aead a = ACCELGATE_AEAD_INIT;
        a.algorithm = ACCELGATE_CIPHER_AES_256_GCM;
        a.key.raw = key;
        a.key.raw_len = 32;
        a.chain_format = ACCELGATE_FORMAT_GZIP;
        a.chain_level = 1;
        rc = accelgate_encrypt(c, &a, pt, n, ct, cap, &clen, nonce, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "compress+encrypt");
        CHECK(clen < n / 2, "compress+encrypt did not compress: %zu B", clen);
        long ilen = ref_aead_open(a.algorithm, key, nonce, NULL, 0, ct, clen, inner);
        CHECK(ilen > 0, "OpenSSL cannot open the chained ciphertext");
        if (ilen > 0) {
            size_t r = ref_inflate(31, inner, (size_t)ilen, back, n);
            CHECK(r == n && memcmp(back, pt, n) == 0, "the chained plaintext is not the gzip of the input");
        }
        a.nonce = nonce;
        a.nonce_len = sizeof nonce;
        memset(back, 0, n);
        rc = accelgate_decrypt(c, &a, ct, clen, back, n, &plen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "decrypt+decompress");
        CHECK(plen == n && memcmp(back, pt, n) == 0, "decrypt+decompress differs");
        free(ct);
        free(back);
        free(inner);
    }

    /* A named key of the tenant: the envelope (docs/KEYS.md) opens with the key from the keyring. */
    {
        uint8_t key[64];
        size_t key_len = 0, n = 10 * KiB, clen = 0, plen = 0;
        hex_decode(env("AG_KEY_HEX"), key, &key_len);
        size_t cap = n + ACCELGATE_ENVELOPE_OVERHEAD;
        uint8_t *env_ = xmalloc(cap), *back = xmalloc(n), aad[7] = "context";
        accelgate_aead a = ACCELGATE_AEAD_INIT;
        a.key.name = env("AG_KEY_NAME");
        a.aad = aad;
        a.aad_len = sizeof aad;
        rc = accelgate_encrypt(c, &a, pt, n, env_, cap, &clen, NULL, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "encrypt with a named key");
        CHECK(clen == cap, "envelope of %zu B, expected %zu", clen, cap);
        if (rc == ACCELGATE_OK) {
            uint8_t full_aad[6 + sizeof aad];
            memcpy(full_aad, env_, 6);
            memcpy(full_aad + 6, aad, sizeof aad);
            CHECK(env_[0] == 0xA6 && env_[1] == 1 && env_[5] == 1, "envelope header %02x %02x .. %02x", env_[0],
                  env_[1], env_[5]);
            long ref = ref_aead_open(ACCELGATE_CIPHER_AES_256_GCM, key, env_ + 6, full_aad, sizeof full_aad, env_ + 18,
                                     clen - 18, back);
            CHECK(ref == (long)n && memcmp(back, pt, n) == 0, "OpenSSL cannot open the envelope");
        }
        memset(back, 0, n);
        rc = accelgate_decrypt(c, &a, env_, clen, back, n, &plen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "decrypt with a named key");
        CHECK(plen == n && memcmp(back, pt, n) == 0, "named-key decrypt differs");
        a.key.name = "no-such-key";
        rc = accelgate_encrypt(c, &a, pt, n, env_, cap, &clen, NULL, TIMEOUT_MS, &err);
        CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_NOT_FOUND, err, "unknown key name");
        free(env_);
        free(back);
    }

    /* Digests and checksums against OpenSSL, zlib and a bitwise CRC-32C. */
    static const accelgate_digest_alg digests[] = {
        ACCELGATE_DIGEST_SHA256,      ACCELGATE_DIGEST_SHA384, ACCELGATE_DIGEST_SHA512,
        ACCELGATE_DIGEST_HMAC_SHA256, ACCELGATE_DIGEST_HMAC_SHA512, ACCELGATE_DIGEST_CRC32C,
        ACCELGATE_DIGEST_CRC32,       ACCELGATE_DIGEST_ADLER32};
    uint8_t hkey[37];
    fill_random(hkey, sizeof hkey);
    accelgate_key k = {hkey, sizeof hkey, NULL};
    size_t dsizes[] = {0, 9, 100 * KiB + 1, MiB};
    for (size_t di = 0; di < sizeof digests / sizeof digests[0]; di++) {
        accelgate_digest_alg alg = digests[di];
        int keyed = alg == ACCELGATE_DIGEST_HMAC_SHA256 || alg == ACCELGATE_DIGEST_HMAC_SHA512;
        for (size_t si = 0; si < sizeof dsizes / sizeof dsizes[0]; si++) {
            uint8_t got[ACCELGATE_DIGEST_MAX], want[ACCELGATE_DIGEST_MAX];
            size_t glen = 0, wlen = ref_digest(alg, hkey, sizeof hkey, pt, dsizes[si], want);
            rc = accelgate_digest(c, alg, keyed ? &k : NULL, pt, dsizes[si], got, sizeof got, &glen, TIMEOUT_MS, &err);
            CHECK_OK(rc, err, "digest");
            CHECK(glen == wlen && memcmp(got, want, wlen) == 0, "digest %d of %zu B differs from the reference", alg,
                  dsizes[si]);
        }
        uint8_t small[3];
        size_t need = 0;
        rc = accelgate_digest(c, alg, keyed ? &k : NULL, pt, 10, small, sizeof small, &need, TIMEOUT_MS, &err);
        CHECK_ERR(rc, ACCELGATE_E_TOO_SMALL, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "digest into 3 bytes");
        CHECK(need >= 4, "digest: needed %zu", need);
    }
    /* HMAC without a key, and a key for an unkeyed digest: INVALID_ARGUMENT from the service. */
    uint8_t out[ACCELGATE_DIGEST_MAX];
    size_t olen;
    rc = accelgate_digest(c, ACCELGATE_DIGEST_HMAC_SHA256, NULL, pt, 10, out, sizeof out, &olen, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "HMAC without a key");
    rc = accelgate_digest(c, ACCELGATE_DIGEST_SHA256, &k, pt, 10, out, sizeof out, &olen, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "key for SHA-256");
    free(pt);
    accelgate_client_close(c);
}

/* ------------------------------------------------------------------------ */
/* errors: bad targets, unreachable server, API keys, sizes, deadlines, bad input */

static int open_with(const accelgate_client_config *cfg, accelgate_client **c, accelgate_error *err) {
    *c = (accelgate_client *)&checks; /* must be reset to NULL on failure */
    return accelgate_client_open(cfg, c, err);
}

static void test_errors(void) {
    accelgate_client_config cfg;
    accelgate_client *c;
    accelgate_error err;
    int rc;
    uint8_t buf[256], out[1024];
    size_t n;
    fill_text(buf, sizeof buf);

    /* Bad target strings are refused at open. */
    const char *bad_targets[] = {"", "127.0.0.1: 50051", "host\n:1", "\x7f"};
    for (size_t i = 0; i < sizeof bad_targets / sizeof bad_targets[0]; i++) {
        accelgate_client_config_init(&cfg);
        cfg.target = bad_targets[i];
        rc = open_with(&cfg, &c, &err);
        CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "bad target");
        CHECK(c == NULL, "*out not NULL after a failed open");
    }
    accelgate_client_config_init(&cfg);
    rc = open_with(&cfg, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL target");
    rc = accelgate_client_open(NULL, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL config");
    cfg.target = env("AG_TARGET");
    cfg.api_key = "two words";
    rc = open_with(&cfg, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "API key with a space");
    cfg.api_key = "key\r\nx-evil: 1";
    rc = open_with(&cfg, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "API key with CRLF");
    cfg.api_key = NULL;
    cfg.tls_root_certs_pem = "x";
    rc = open_with(&cfg, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "TLS roots without tls");

    /* A target that parses but names no server: the call fails, or open with connect_timeout_ms. */
    char closed[64];
    snprintf(closed, sizeof closed, "127.0.0.1:%s", env("AG_CLOSED_PORT"));
    const char *unreachable[] = {closed, "dns:///no-such-host.invalid:50051", "unix:///nonexistent/accelgate.sock",
                                 "127.0.0.1:99999"};
    for (size_t i = 0; i < sizeof unreachable / sizeof unreachable[0]; i++) {
        char what[160];
        snprintf(what, sizeof what, "call to %s", unreachable[i]);
        accelgate_client_config_init(&cfg);
        cfg.target = unreachable[i];
        double t0 = now_s();
        rc = accelgate_client_open(&cfg, &c, &err);
        CHECK_OK(rc, err, "lazy open");
        if (rc == ACCELGATE_OK) {
            rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, buf, sizeof buf, out, sizeof out, &n, 2000, &err);
            if (strncmp(unreachable[i], "dns:", 4) == 0 && err.grpc_code == ACCELGATE_GRPC_DEADLINE_EXCEEDED)
                CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_DEADLINE_EXCEEDED, err, what); /* a slow DNS */
            else
                CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAVAILABLE, err, what);
            accelgate_client_close(c);
        }
        cfg.connect_timeout_ms = 2000;
        snprintf(what, sizeof what, "open of %s with connect_timeout_ms", unreachable[i]);
        rc = open_with(&cfg, &c, &err);
        CHECK(rc == ACCELGATE_E_RPC &&
                  (err.grpc_code == ACCELGATE_GRPC_UNAVAILABLE || err.grpc_code == ACCELGATE_GRPC_DEADLINE_EXCEEDED),
              "%s: rc %d grpc %s '%s'", what, rc, accelgate_grpc_code_name(err.grpc_code), err.message);
        CHECK(c == NULL, "*out not NULL after a failed open");
        CHECK(now_s() - t0 < 6, "%s took %.1f s", what, now_s() - t0);
    }
    /* A DNS name resolves (gRPC's c-ares resolver; see tests/lsan.supp). */
    {
        const char *port = strrchr(env("AG_TARGET"), ':');
        char by_name[64];
        snprintf(by_name, sizeof by_name, "localhost%s", port ? port : "");
        c = open_client(by_name, env("AG_API_KEY"));
        rc = accelgate_digest(c, ACCELGATE_DIGEST_CRC32, NULL, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, by_name);
        accelgate_client_close(c);
    }
    /* connect_timeout_ms against the live server succeeds. */
    accelgate_client_config_init(&cfg);
    cfg.target = env("AG_TARGET");
    cfg.api_key = env("AG_API_KEY");
    cfg.connect_timeout_ms = 5000;
    rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "open with connect_timeout_ms");
    if (rc == ACCELGATE_OK) accelgate_client_close(c);

    /* API keys: wrong and missing → UNAUTHENTICATED. */
    c = open_client(env("AG_TARGET"), "wrong-key-0123456789");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAUTHENTICATED, err, "wrong API key");
    accelgate_limits lim;
    rc = accelgate_get_limits(c, &lim, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAUTHENTICATED, err, "wrong API key, DescribeDevice");
    accelgate_client_close(c);
    c = open_client(env("AG_TARGET"), NULL);
    rc = accelgate_digest(c, ACCELGATE_DIGEST_SHA256, NULL, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAUTHENTICATED, err, "no API key");
    accelgate_client_close(c);

    /* Oversize buffers. */
    size_t big_n = MAX_REQUEST + 64 * KiB + 1;
    uint8_t *big = xmalloc(big_n), *big_out = xmalloc(accelgate_compress_bound(big_n));
    fill_random(big, big_n);
    c = main_client(); /* max_request_bytes = 4 MiB: checked before sending */
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, big, MAX_REQUEST + 1, big_out, accelgate_compress_bound(big_n),
                            &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_TOO_LARGE, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "client-side size check");
    accelgate_aead a = ACCELGATE_AEAD_INIT;
    a.algorithm = ACCELGATE_CIPHER_AES_256_GCM;
    a.key.raw = big;
    a.key.raw_len = 32;
    rc = accelgate_encrypt(c, &a, big, MAX_REQUEST + 1, big_out, big_n + 16, &n, NULL, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_TOO_LARGE, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "client-side size check, encrypt");
    accelgate_client_close(c);
    accelgate_client_config_init(&cfg);
    cfg.target = env("AG_TARGET");
    cfg.api_key = env("AG_API_KEY");
    cfg.max_request_bytes = 0; /* let the server decide */
    rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "open without a client size check");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, big, MAX_REQUEST + 1, big_out, accelgate_compress_bound(big_n),
                            &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "payload over the server's limit");
    CHECK(strstr(err.message, "exceeds") != NULL, "server size message: '%s'", err.message);
    CHECK(err.retry_after_ms == 0, "no retry hint for an oversize payload (got %u)", err.retry_after_ms);
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, big, big_n, big_out, accelgate_compress_bound(big_n), &n,
                            TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "message over the transport limit");
    rc = accelgate_digest(c, ACCELGATE_DIGEST_SHA256, NULL, big, MAX_REQUEST + 1, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_RESOURCE_EXHAUSTED, err, "digest over the server's limit");

    /* Deadline: zstd level 19 on 1 MiB of text takes far longer than 5 ms. */
    fill_text(big, MiB);
    double t0 = now_s();
    rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 19, big, MiB, big_out, accelgate_compress_bound(big_n), &n, 5,
                            &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_DEADLINE_EXCEEDED, err, "5 ms deadline");
    CHECK(now_s() - t0 < 2, "the 5 ms deadline returned after %.2f s", now_s() - t0);
    rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 3, big, 1000, big_out, accelgate_compress_bound(big_n), &n,
                            ACCELGATE_NO_DEADLINE, &err);
    CHECK_OK(rc, err, "no deadline");
    accelgate_client_close(c);
    /* timeout_ms 0 takes config.default_timeout_ms. */
    cfg.default_timeout_ms = 5;
    rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "open with a 5 ms default deadline");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 19, big, MiB, big_out, accelgate_compress_bound(big_n), &n, 0,
                            &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_DEADLINE_EXCEEDED, err, "default deadline of 5 ms");
    accelgate_client_close(c);
    free(big);
    free(big_out);

    /* Bad requests: the service's status codes come through unchanged. */
    c = main_client();
    rc = accelgate_compress(c, ACCELGATE_FORMAT_NONE, 1, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "format unset");
    rc = accelgate_compress(c, (accelgate_format)9, 1, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "unknown format");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 12, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "gzip level 12");
    rc = accelgate_decompress(c, ACCELGATE_FORMAT_ZLIB, buf, sizeof buf, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "corrupt zlib");
    size_t glen = 0;
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 6, buf, sizeof buf, out, sizeof out, &glen, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, "gzip");
    out[glen - 8] ^= 0xFF; /* CRC-32 in the trailer */
    rc = accelgate_decompress(c, ACCELGATE_FORMAT_GZIP, out, glen, buf, sizeof buf, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_DATA_LOSS, err, "gzip CRC mismatch");
    rc = accelgate_decompress(c, ACCELGATE_FORMAT_GZIP, out, glen / 2, buf, sizeof buf, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "truncated gzip");

    /* Bad arguments are caught before anything is sent. */
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, NULL, 10, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL src");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, buf, 10, NULL, 10, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL dst");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, buf, 10, out, sizeof out, NULL, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL dst_len");
    rc = accelgate_compress(NULL, ACCELGATE_FORMAT_GZIP, 1, buf, 10, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL client");
    rc = accelgate_encrypt(c, NULL, buf, 10, out, sizeof out, &n, NULL, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "NULL aead");
    accelgate_aead both = ACCELGATE_AEAD_INIT;
    both.key.raw = buf;
    both.key.raw_len = 32;
    both.key.name = "orders";
    rc = accelgate_encrypt(c, &both, buf, 10, out, sizeof out, &n, NULL, TIMEOUT_MS, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "raw and named key");
    rc = accelgate_compress(c, ACCELGATE_FORMAT_GZIP, 1, buf, 10, out, sizeof out, &n, TIMEOUT_MS, NULL);
    CHECK(rc == ACCELGATE_OK, "a NULL err is allowed (rc %d)", rc);
    CHECK(accelgate_client_poll(NULL, 0) == ACCELGATE_E_INVALID, "poll(NULL)");
    accelgate_client_close(NULL);
    accelgate_client_close(c);
}

/* ------------------------------------------------------------------------ */
/* async: many jobs in flight, driven by poll */

typedef struct job {
    accelgate_op op;
    accelgate_format format;
    accelgate_digest_alg digest;
    const uint8_t *src;
    size_t src_len;
    uint8_t *dst;
    size_t dst_cap;
    uint8_t key[32];
    int done;         /* times the callback ran */
    int rc, grpc_code;
    size_t dst_len;
    uint8_t nonce[ACCELGATE_NONCE_LEN];
    size_t nonce_len;
    uint64_t device_ns;
    accelgate_client *chain; /* submit a decompression of the result from the callback */
    struct job *next_job;
} job;

static void on_done(const accelgate_result *r, void *user) {
    job *j = user;
    j->done++;
    j->rc = r->rc;
    j->grpc_code = r->error.grpc_code;
    j->dst_len = r->dst_len;
    j->device_ns = r->stats.device_ns;
    memcpy(j->nonce, r->nonce, sizeof j->nonce);
    j->nonce_len = r->nonce_len;
    if (r->dst != j->dst) j->rc = 12345;
    if (j->chain != NULL && r->rc == ACCELGATE_OK) {
        job *k = j->next_job;
        accelgate_error err;
        int rc = accelgate_submit_decompress(j->chain, j->format, j->dst, r->dst_len, k->dst, k->dst_cap, TIMEOUT_MS,
                                             on_done, k, &err);
        if (rc != ACCELGATE_OK) k->rc = rc, k->done = 99;
    }
}

static int drive(accelgate_client *c, double limit_s) {
    double t0 = now_s();
    while (accelgate_client_pending(c) > 0 && now_s() - t0 < limit_s) {
        int r = accelgate_client_poll(c, 200);
        if (r < 0) return r;
    }
    return (int)accelgate_client_pending(c);
}

/* async decrypt: accelgate_submit_decrypt gives the plaintext back byte for byte, and a
   flipped tag byte completes through the callback with the authentication failure
   (ACCELGATE_E_RPC, INVALID_ARGUMENT "authentication failed", nothing written to dst),
   after which the same client still decrypts. Called from test_async. */

typedef struct {
    void *dst; /* the dst submitted, to compare with result->dst */
    int done;  /* times the callback ran */
    accelgate_op op;
    int rc, code, grpc_code;
    char message[ACCELGATE_MESSAGE_MAX];
    void *got_dst;
    size_t dst_len;
    uint8_t nonce[ACCELGATE_NONCE_LEN];
    size_t nonce_len;
    uint32_t key_version;
} aead_job;

static void on_aead_done(const accelgate_result *r, void *user) {
    aead_job *j = user;
    j->done++;
    j->op = r->op;
    j->rc = r->rc;
    j->code = r->error.code;
    j->grpc_code = r->error.grpc_code;
    snprintf(j->message, sizeof j->message, "%s", r->error.message);
    j->got_dst = r->dst;
    j->dst_len = r->dst_len;
    memcpy(j->nonce, r->nonce, sizeof j->nonce);
    j->nonce_len = r->nonce_len;
    j->key_version = r->key_version;
}

static int all_bytes(const uint8_t *p, size_t n, uint8_t v) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != v) return 0;
    return 1;
}

/* A decrypt job that must have succeeded with want (n bytes) in dst; dst has one spare byte, preset to 0x77. */
static void check_decrypted(const aead_job *j, const uint8_t *dst, const uint8_t *want, size_t n, const char *what) {
    CHECK(j->done == 1, "%s: callback ran %d times", what, j->done);
    CHECK(j->op == ACCELGATE_OP_DECRYPT && j->got_dst == j->dst, "%s: op %d, dst %s", what, j->op,
          j->got_dst == j->dst ? "as submitted" : "not the one submitted");
    CHECK(j->rc == ACCELGATE_OK && j->code == ACCELGATE_OK && j->grpc_code == ACCELGATE_GRPC_OK &&
              j->message[0] == '\0',
          "%s: rc %d grpc %s '%s'", what, j->rc, accelgate_grpc_code_name(j->grpc_code), j->message);
    CHECK(j->dst_len == n && (n == 0 || memcmp(dst, want, n) == 0), "%s: %zu B back, not the %zu B plaintext", what,
          j->dst_len, n);
    CHECK(dst[n] == 0x77, "%s: wrote past the plaintext", what);
}

/* A decrypt job that must have failed authentication, leaving dst (cap bytes, preset to 0x77) untouched. */
static void check_auth_failed(const aead_job *j, const uint8_t *dst, size_t cap, const char *what) {
    CHECK(j->done == 1, "%s: callback ran %d times", what, j->done);
    CHECK(j->op == ACCELGATE_OP_DECRYPT && j->got_dst == j->dst, "%s: op %d", what, j->op);
    CHECK(j->rc == ACCELGATE_E_RPC && j->code == ACCELGATE_E_RPC && j->grpc_code == ACCELGATE_GRPC_INVALID_ARGUMENT &&
              strstr(j->message, "authentication failed") != NULL,
          "%s: expected rc %d INVALID_ARGUMENT 'authentication failed', got rc %d grpc %s '%s'", what,
          ACCELGATE_E_RPC, j->rc, accelgate_grpc_code_name(j->grpc_code), j->message);
    CHECK(j->dst_len == 0 && all_bytes(dst, cap, 0x77), "%s: plaintext released after a failed tag check (%zu B)",
          what, j->dst_len);
}

static void test_async_decrypt(accelgate_client *c) {
    enum { S = 3 };
    static const size_t sizes[S] = {0, 1, 64 * KiB + 5};
    const size_t max_n = 64 * KiB + 5;
    uint8_t key[32], aad[24];
    fill_random(key, sizeof key);
    fill_random(aad, sizeof aad);
    uint8_t *pt = xmalloc(max_n), *ct[S], *good[S], *bad[S];
    fill_text(pt, max_n);
    aead_job enc[S], dec[S], tam[S];
    memset(enc, 0, sizeof enc);
    memset(dec, 0, sizeof dec);
    memset(tam, 0, sizeof tam);
    accelgate_error err;
    int rc, left;
    char what[96];

    /* Encrypt asynchronously (AES-256-GCM, AAD, nonce drawn by the server); OpenSSL checks the ciphertext. */
    accelgate_aead a = ACCELGATE_AEAD_INIT;
    a.algorithm = ACCELGATE_CIPHER_AES_256_GCM;
    a.key.raw = key;
    a.key.raw_len = sizeof key;
    a.aad = aad;
    a.aad_len = sizeof aad;
    for (int s = 0; s < S; s++) {
        ct[s] = xmalloc(sizes[s] + ACCELGATE_TAG_LEN);
        good[s] = xmalloc(sizes[s] + 1);
        bad[s] = xmalloc(sizes[s] + 1);
        enc[s].dst = ct[s];
        rc = accelgate_submit_encrypt(c, &a, pt, sizes[s], ct[s], sizes[s] + ACCELGATE_TAG_LEN, TIMEOUT_MS,
                                      on_aead_done, &enc[s], &err);
        CHECK_OK(rc, err, "submit_encrypt (for the async decrypt)");
    }
    left = drive(c, 30);
    CHECK(left == 0, "%d encrypt jobs still pending after 30 s", left);
    int encrypted = 1;
    for (int s = 0; s < S; s++) {
        aead_job *e = &enc[s];
        int ok = e->done == 1 && e->rc == ACCELGATE_OK && e->dst_len == sizes[s] + ACCELGATE_TAG_LEN &&
                 e->nonce_len == ACCELGATE_NONCE_LEN;
        CHECK(ok, "async encrypt of %zu B: done %d rc %d grpc %s '%s', %zu B, nonce %zu B", sizes[s], e->done, e->rc,
              accelgate_grpc_code_name(e->grpc_code), e->message, e->dst_len, e->nonce_len);
        if (ok) {
            long r = ref_aead_open(a.algorithm, key, e->nonce, aad, sizeof aad, ct[s], e->dst_len, good[s]);
            CHECK(r == (long)sizes[s] && (sizes[s] == 0 || memcmp(good[s], pt, sizes[s]) == 0),
                  "OpenSSL cannot open the async ciphertext of %zu B", sizes[s]);
        }
        encrypted &= ok;
    }
    if (!encrypted) goto out;

    /* A good and a tampered decrypt of each ciphertext, all in flight together. Key, nonce,
       AAD and ciphertext are copies wiped and freed as soon as submit returns (it copies them). */
    for (int s = 0; s < S; s++) {
        size_t clen = enc[s].dst_len;
        uint8_t key_copy[32], nonce_copy[ACCELGATE_NONCE_LEN], aad_copy[sizeof aad];
        uint8_t *ct_copy = xmalloc(clen);
        memcpy(key_copy, key, sizeof key);
        memcpy(nonce_copy, enc[s].nonce, sizeof nonce_copy);
        memcpy(aad_copy, aad, sizeof aad);
        memcpy(ct_copy, ct[s], clen);
        accelgate_aead d = ACCELGATE_AEAD_INIT;
        d.algorithm = ACCELGATE_CIPHER_AES_256_GCM;
        d.key.raw = key_copy;
        d.key.raw_len = sizeof key_copy;
        d.nonce = nonce_copy;
        d.nonce_len = sizeof nonce_copy;
        d.aad = aad_copy;
        d.aad_len = sizeof aad_copy;
        memset(good[s], 0x77, sizes[s] + 1);
        memset(bad[s], 0x77, sizes[s] + 1);
        dec[s].dst = good[s];
        tam[s].dst = bad[s];
        rc = accelgate_submit_decrypt(c, &d, ct_copy, clen, good[s], sizes[s] + 1, TIMEOUT_MS, on_aead_done, &dec[s],
                                      &err);
        CHECK_OK(rc, err, "submit_decrypt");
        ct_copy[clen - 1] ^= 0x01; /* the last byte of the tag */
        rc = accelgate_submit_decrypt(c, &d, ct_copy, clen, bad[s], sizes[s] + 1, TIMEOUT_MS, on_aead_done, &tam[s],
                                      &err);
        CHECK_OK(rc, err, "submit_decrypt with a flipped tag byte"); /* the failure comes through the callback */
        memset(key_copy, 0, sizeof key_copy);
        memset(nonce_copy, 0, sizeof nonce_copy);
        memset(aad_copy, 0, sizeof aad_copy);
        memset(ct_copy, 0, clen);
        free(ct_copy);
    }
    left = drive(c, 30);
    CHECK(left == 0, "%d decrypt jobs still pending after 30 s", left);
    for (int s = 0; s < S; s++) {
        snprintf(what, sizeof what, "async decrypt of %zu B", sizes[s]);
        check_decrypted(&dec[s], good[s], pt, sizes[s], what);
        snprintf(what, sizeof what, "async decrypt of %zu B with a flipped tag byte", sizes[s]);
        check_auth_failed(&tam[s], bad[s], sizes[s] + 1, what);
    }

    /* After the failures the client still works: an async and a sync decrypt. */
    {
        int s = S - 1;
        aead_job again;
        memset(&again, 0, sizeof again);
        again.dst = good[s];
        memset(good[s], 0x77, sizes[s] + 1);
        a.nonce = enc[s].nonce;
        a.nonce_len = ACCELGATE_NONCE_LEN;
        rc = accelgate_submit_decrypt(c, &a, ct[s], enc[s].dst_len, good[s], sizes[s] + 1, TIMEOUT_MS, on_aead_done,
                                      &again, &err);
        CHECK_OK(rc, err, "submit_decrypt after the failed ones");
        left = drive(c, 30);
        CHECK(left == 0, "the decrypt after the failed ones is still pending after 30 s");
        check_decrypted(&again, good[s], pt, sizes[s], "async decrypt after the failed ones");
        size_t plen = 0;
        memset(good[s], 0x77, sizes[s] + 1);
        rc = accelgate_decrypt(c, &a, ct[s], enc[s].dst_len, good[s], sizes[s] + 1, &plen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "sync decrypt after the failed ones");
        CHECK(plen == sizes[s] && memcmp(good[s], pt, sizes[s]) == 0, "sync decrypt after the failed ones differs");
    }

    /* A named key: the envelope decrypts asynchronously with the key's version in the result,
       and a flipped tag byte fails the same way. */
    {
        size_t n = 10 * KiB, cap = n + ACCELGATE_ENVELOPE_OVERHEAD, elen = 0;
        uint8_t *envl = xmalloc(cap), *back = xmalloc(n + 1), *back_bad = xmalloc(n + 1), *back_hdr = xmalloc(n + 1);
        accelgate_aead nk = ACCELGATE_AEAD_INIT;
        nk.key.name = env("AG_KEY_NAME");
        nk.aad = aad;
        nk.aad_len = sizeof aad;
        rc = accelgate_encrypt(c, &nk, pt, n, envl, cap, &elen, NULL, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "encrypt with a named key (for the async decrypt)");
        if (rc == ACCELGATE_OK) {
            aead_job nd, nt, nh;
            memset(&nd, 0, sizeof nd);
            memset(&nt, 0, sizeof nt);
            memset(&nh, 0, sizeof nh);
            nd.dst = back;
            nt.dst = back_bad;
            nh.dst = back_hdr;
            memset(back, 0x77, n + 1);
            memset(back_bad, 0x77, n + 1);
            memset(back_hdr, 0x77, n + 1);
            rc = accelgate_submit_decrypt(c, &nk, envl, elen, back, n + 1, TIMEOUT_MS, on_aead_done, &nd, &err);
            CHECK_OK(rc, err, "submit_decrypt with a named key");
            envl[elen - 1] ^= 0x80;
            rc = accelgate_submit_decrypt(c, &nk, envl, elen, back_bad, n + 1, TIMEOUT_MS, on_aead_done, &nt, &err);
            CHECK_OK(rc, err, "submit_decrypt of an envelope with a flipped tag byte");
            envl[elen - 1] ^= 0x80;
            envl[5] ^= 0x02; /* the header's key version: 1 -> 3, which the keyring does not have */
            rc = accelgate_submit_decrypt(c, &nk, envl, elen, back_hdr, n + 1, TIMEOUT_MS, on_aead_done, &nh, &err);
            CHECK_OK(rc, err, "submit_decrypt of an envelope with a damaged header");
            left = drive(c, 30);
            CHECK(left == 0, "%d named-key decrypt jobs still pending after 30 s", left);
            check_decrypted(&nd, back, pt, n, "async named-key decrypt");
            CHECK(nd.key_version == 1, "async named-key decrypt: key_version %u, expected 1", nd.key_version);
            check_auth_failed(&nt, back_bad, n + 1, "async named-key decrypt with a flipped tag byte");
            CHECK(nh.done == 1 && nh.rc == ACCELGATE_E_RPC && nh.grpc_code == ACCELGATE_GRPC_FAILED_PRECONDITION &&
                      nh.dst_len == 0 && all_bytes(back_hdr, n + 1, 0x77),
                  "async named-key decrypt, unknown key version in the header: done %d rc %d grpc %s '%s', %zu B",
                  nh.done, nh.rc, accelgate_grpc_code_name(nh.grpc_code), nh.message, nh.dst_len);
        }
        free(envl);
        free(back);
        free(back_bad);
        free(back_hdr);
    }

out:
    for (int s = 0; s < S; s++) {
        free(ct[s]);
        free(good[s]);
        free(bad[s]);
    }
    free(pt);
}

static void test_async(void) {
    accelgate_client *c = main_client();
    accelgate_error err;
    int rc;
    CHECK(accelgate_client_poll(c, 0) == 0 && accelgate_client_poll(c, 1000) == 0 && accelgate_client_poll(c, -1) == 0,
          "poll with nothing pending must return 0 at once");

    enum { N = 60 };
    size_t n = 96 * KiB;
    uint8_t *text = xmalloc(n);
    fill_text(text, n);
    job *jobs = calloc(N, sizeof *jobs);
    static const accelgate_digest_alg dg[] = {ACCELGATE_DIGEST_SHA256, ACCELGATE_DIGEST_CRC32C, ACCELGATE_DIGEST_CRC32,
                                              ACCELGATE_DIGEST_ADLER32, ACCELGATE_DIGEST_SHA512};
    for (int i = 0; i < N; i++) {
        job *j = &jobs[i];
        j->src = text + (size_t)i * 97;
        j->src_len = n - (size_t)i * 97;
        switch (i % 3) {
        case 0:
            j->op = ACCELGATE_OP_COMPRESS;
            j->format = formats[(i / 3) % NFORMATS];
            j->dst_cap = accelgate_compress_bound(j->src_len);
            j->dst = xmalloc(j->dst_cap);
            rc = accelgate_submit_compress(c, j->format, ACCELGATE_LEVEL_DEFAULT, j->src, j->src_len, j->dst,
                                           j->dst_cap, TIMEOUT_MS, on_done, j, &err);
            break;
        case 1:
            j->op = ACCELGATE_OP_DIGEST;
            j->digest = dg[(i / 3) % 5];
            j->dst_cap = ACCELGATE_DIGEST_MAX;
            j->dst = xmalloc(j->dst_cap);
            rc = accelgate_submit_digest(c, j->digest, NULL, j->src, j->src_len, j->dst, j->dst_cap, TIMEOUT_MS,
                                         on_done, j, &err);
            break;
        default: {
            j->op = ACCELGATE_OP_ENCRYPT;
            fill_random(j->key, sizeof j->key);
            j->dst_cap = j->src_len + ACCELGATE_TAG_LEN;
            j->dst = xmalloc(j->dst_cap);
            /* Parameters live on the stack: submit copies them. */
            uint8_t key_copy[32];
            memcpy(key_copy, j->key, 32);
            accelgate_aead a = ACCELGATE_AEAD_INIT;
            a.algorithm = ACCELGATE_CIPHER_CHACHA20_POLY1305;
            a.key.raw = key_copy;
            a.key.raw_len = 32;
            rc = accelgate_submit_encrypt(c, &a, j->src, j->src_len, j->dst, j->dst_cap, TIMEOUT_MS, on_done, j, &err);
            memset(key_copy, 0, sizeof key_copy);
            break;
        }
        }
        CHECK_OK(rc, err, "submit");
    }
    CHECK(accelgate_client_pending(c) <= N, "pending %zu", accelgate_client_pending(c));
    int left = drive(c, 60);
    CHECK(left == 0, "%d jobs still pending after 60 s", left);
    uint8_t *back = xmalloc(n), ref[ACCELGATE_DIGEST_MAX];
    for (int i = 0; i < N; i++) {
        job *j = &jobs[i];
        CHECK(j->done == 1, "job %d: callback ran %d times", i, j->done);
        CHECK(j->rc == ACCELGATE_OK, "job %d: rc %d grpc %s", i, j->rc, accelgate_grpc_code_name(j->grpc_code));
        if (j->rc != ACCELGATE_OK) continue;
        CHECK(j->device_ns > 0, "job %d: no stats", i);
        if (j->op == ACCELGATE_OP_COMPRESS) {
            size_t r = ref_decompress(j->format, j->dst, j->dst_len, back, n);
            CHECK(r == j->src_len && memcmp(back, j->src, r) == 0, "job %d (%s): wrong output", i,
                  accelgate_format_name(j->format));
        } else if (j->op == ACCELGATE_OP_DIGEST) {
            size_t rl = ref_digest(j->digest, NULL, 0, j->src, j->src_len, ref);
            CHECK(j->dst_len == rl && memcmp(j->dst, ref, rl) == 0, "job %d: digest differs", i);
        } else {
            CHECK(j->nonce_len == ACCELGATE_NONCE_LEN, "job %d: nonce of %zu B", i, j->nonce_len);
            long r = ref_aead_open(ACCELGATE_CIPHER_CHACHA20_POLY1305, j->key, j->nonce, NULL, 0, j->dst, j->dst_len,
                                   back);
            CHECK(r == (long)j->src_len && memcmp(back, j->src, j->src_len) == 0, "job %d: OpenSSL cannot open", i);
        }
    }
    for (int i = 0; i < N; i++) free(jobs[i].dst);

    /* Errors arrive through the callback; a failed submit calls nothing. */
    memset(jobs, 0, 4 * sizeof *jobs);
    uint8_t small[8];
    jobs[0].dst = small;
    rc = accelgate_submit_compress(c, (accelgate_format)9, 1, text, 100, small, sizeof small, TIMEOUT_MS, on_done,
                                   &jobs[0], &err);
    CHECK_OK(rc, err, "submit with a bad format");
    jobs[1].dst = small;
    rc = accelgate_submit_compress(c, ACCELGATE_FORMAT_ZSTD, 1, text, n, small, sizeof small, TIMEOUT_MS, on_done,
                                   &jobs[1], &err);
    CHECK_OK(rc, err, "submit with a small dst");
    rc = accelgate_submit_compress(c, ACCELGATE_FORMAT_ZSTD, 1, NULL, 5, small, sizeof small, TIMEOUT_MS, on_done,
                                   &jobs[2], &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "submit with NULL src");
    rc = accelgate_submit_compress(c, ACCELGATE_FORMAT_ZSTD, 1, text, 5, small, sizeof small, TIMEOUT_MS, NULL, NULL,
                                   &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "submit without a callback");
    CHECK(drive(c, 30) == 0, "error jobs still pending");
    CHECK(jobs[0].done == 1 && jobs[0].rc == ACCELGATE_E_RPC && jobs[0].grpc_code == ACCELGATE_GRPC_INVALID_ARGUMENT,
          "bad format via callback: done %d rc %d grpc %d", jobs[0].done, jobs[0].rc, jobs[0].grpc_code);
    CHECK(jobs[1].done == 1 && jobs[1].rc == ACCELGATE_E_TOO_SMALL && jobs[1].dst_len > sizeof small,
          "small dst via callback: done %d rc %d needed %zu", jobs[1].done, jobs[1].rc, jobs[1].dst_len);
    CHECK(jobs[2].done == 0, "a failed submit ran its callback");

    /* A callback submits the next job: compress, then decompress its output. */
    memset(jobs, 0, 2 * sizeof *jobs);
    jobs[0].format = ACCELGATE_FORMAT_LZ4;
    jobs[0].dst_cap = accelgate_compress_bound(n);
    jobs[0].dst = xmalloc(jobs[0].dst_cap);
    jobs[0].chain = c;
    jobs[0].next_job = &jobs[1];
    jobs[1].dst_cap = n;
    jobs[1].dst = back;
    memset(back, 0, n);
    rc = accelgate_submit_compress(c, ACCELGATE_FORMAT_LZ4, 1, text, n, jobs[0].dst, jobs[0].dst_cap, TIMEOUT_MS,
                                   on_done, &jobs[0], &err);
    CHECK_OK(rc, err, "submit chained");
    CHECK(drive(c, 30) == 0, "chained jobs still pending");
    CHECK(jobs[0].done == 1 && jobs[1].done == 1 && jobs[1].rc == ACCELGATE_OK && jobs[1].dst_len == n &&
              memcmp(back, text, n) == 0,
          "chained: done %d/%d rc %d len %zu", jobs[0].done, jobs[1].done, jobs[1].rc, jobs[1].dst_len);
    free(jobs[0].dst);

    /* An unreachable server fails each job with UNAVAILABLE. */
    char closed[64];
    snprintf(closed, sizeof closed, "127.0.0.1:%s", env("AG_CLOSED_PORT"));
    accelgate_client *dead = open_client(closed, NULL);
    memset(jobs, 0, 3 * sizeof *jobs);
    for (int i = 0; i < 3; i++) {
        jobs[i].dst = small;
        rc = accelgate_submit_digest(dead, ACCELGATE_DIGEST_CRC32, NULL, text, 10, small, sizeof small, 3000, on_done,
                                     &jobs[i], &err);
        CHECK_OK(rc, err, "submit to an unreachable server");
    }
    CHECK(drive(dead, 10) == 0, "jobs to an unreachable server still pending");
    for (int i = 0; i < 3; i++)
        CHECK(jobs[i].done == 1 && jobs[i].rc == ACCELGATE_E_RPC && jobs[i].grpc_code == ACCELGATE_GRPC_UNAVAILABLE,
              "unreachable job %d: done %d rc %d grpc %s", i, jobs[i].done, jobs[i].rc,
              accelgate_grpc_code_name(jobs[i].grpc_code));
    accelgate_client_close(dead);

    test_async_decrypt(c);

    /* Closing with jobs in flight runs every callback once (CANCELLED unless already done) and leaks nothing. */
    size_t big_n = 256 * KiB;
    uint8_t *big = xmalloc(big_n);
    fill_text(big, big_n);
    memset(jobs, 0, 8 * sizeof *jobs);
    for (int i = 0; i < 8; i++) {
        jobs[i].dst_cap = accelgate_compress_bound(big_n);
        jobs[i].dst = xmalloc(jobs[i].dst_cap);
        rc = accelgate_submit_compress(c, ACCELGATE_FORMAT_ZSTD, 19, big, big_n, jobs[i].dst, jobs[i].dst_cap,
                                       TIMEOUT_MS, on_done, &jobs[i], &err);
        CHECK_OK(rc, err, "submit slow job");
    }
    free(big); /* submit copied the input */
    double t0 = now_s();
    accelgate_client_close(c);
    CHECK(now_s() - t0 < 5, "close with jobs in flight took %.1f s", now_s() - t0);
    int cancelled = 0;
    for (int i = 0; i < 8; i++) {
        CHECK(jobs[i].done == 1, "slow job %d: callback ran %d times", i, jobs[i].done);
        CHECK(jobs[i].rc == ACCELGATE_OK || jobs[i].grpc_code == ACCELGATE_GRPC_CANCELLED,
              "slow job %d: rc %d grpc %s", i, jobs[i].rc, accelgate_grpc_code_name(jobs[i].grpc_code));
        cancelled += jobs[i].grpc_code == ACCELGATE_GRPC_CANCELLED;
        free(jobs[i].dst);
    }
    CHECK(cancelled > 0, "close cancelled none of the slow jobs");
    free(jobs);
    free(text);
    free(back);
}

/* ------------------------------------------------------------------------ */
/* threads: one client shared by threads making sync calls while another polls */

typedef struct {
    accelgate_client *c;
    int id;
    int bad;
} worker;

static void *sync_worker(void *arg) {
    worker *w = arg;
    size_t n = 32 * KiB + (size_t)w->id;
    uint8_t *src = xmalloc(n), *comp = xmalloc(accelgate_compress_bound(n)), *back = xmalloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (uint8_t)("abcdefgh"[(i * (size_t)(w->id + 1)) % 8] + (i % 61 == 0));
    for (int k = 0; k < 15; k++) {
        accelgate_format f = formats[(w->id + k) % NFORMATS];
        accelgate_error err;
        size_t clen = 0, dlen = 0;
        int rc = accelgate_compress(w->c, f, ACCELGATE_LEVEL_DEFAULT, src, n, comp, accelgate_compress_bound(n), &clen,
                                    TIMEOUT_MS, &err);
        if (rc == ACCELGATE_OK) rc = accelgate_decompress(w->c, f, comp, clen, back, n, &dlen, TIMEOUT_MS, &err);
        if (rc != ACCELGATE_OK || dlen != n || memcmp(back, src, n) != 0) w->bad++;
    }
    free(src);
    free(comp);
    free(back);
    return NULL;
}

static void *async_worker(void *arg) {
    worker *w = arg;
    enum { M = 40 };
    uint8_t data[1000], out[M][ACCELGATE_DIGEST_MAX];
    job js[M];
    memset(js, 0, sizeof js);
    fill_text(data, sizeof data);
    for (int i = 0; i < M; i++) {
        accelgate_error err;
        js[i].dst = out[i];
        if (accelgate_submit_digest(w->c, ACCELGATE_DIGEST_SHA256, NULL, data, sizeof data - (size_t)i, out[i],
                                    sizeof out[i], TIMEOUT_MS, on_done, &js[i], &err) != ACCELGATE_OK)
            w->bad++;
        accelgate_client_poll(w->c, 0);
    }
    drive(w->c, 60);
    for (int i = 0; i < M; i++) {
        uint8_t ref[ACCELGATE_DIGEST_MAX];
        ref_digest(ACCELGATE_DIGEST_SHA256, NULL, 0, data, sizeof data - (size_t)i, ref);
        if (js[i].done != 1 || js[i].rc != ACCELGATE_OK || memcmp(out[i], ref, 32) != 0) w->bad++;
    }
    return NULL;
}

static void test_threads(void) {
    accelgate_client *c = main_client();
    enum { T = 6 };
    pthread_t th[T + 2];
    worker w[T + 2];
    for (int i = 0; i < T + 2; i++) {
        w[i].c = c;
        w[i].id = i;
        w[i].bad = 0;
        if (pthread_create(&th[i], NULL, i < T ? sync_worker : async_worker, &w[i]) != 0) die("pthread_create");
    }
    for (int i = 0; i < T + 2; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].bad == 0, "thread %d: %d bad results", i, w[i].bad);
    }
    CHECK(accelgate_client_pending(c) == 0, "jobs left after the threads");
    accelgate_client_close(c);
}

/* ------------------------------------------------------------------------ */
/* tls: server verified against the given roots */

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die("%s: %s", path, strerror(errno));
    char *s = xmalloc(65536);
    size_t n = fread(s, 1, 65535, f);
    fclose(f);
    s[n] = '\0';
    return s;
}

static void test_tls(void) {
    char *roots = read_text(env("AG_TLS_ROOTS")), *other = read_text(env("AG_TLS_OTHER_ROOTS"));
    char *cert = read_text(env("AG_TLS_CERT")), *key = read_text(env("AG_TLS_KEY"));
    accelgate_client_config cfg;
    accelgate_client_config_init(&cfg);
    cfg.target = env("AG_TLS_TARGET");
    cfg.tls = 1;
    cfg.tls_root_certs_pem = roots;
    cfg.tls_cert_chain_pem = cert;
    cfg.tls_private_key_pem = key;
    cfg.tls_server_name = "localhost";
    cfg.connect_timeout_ms = 5000;
    accelgate_client *c;
    accelgate_error err;
    uint8_t data[5000], comp[8192], back[5000];
    size_t clen = 0, dlen = 0;
    fill_text(data, sizeof data);

    /* mTLS: the server is verified with the roots, the client shows its certificate. */
    int rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "mTLS open");
    if (rc == ACCELGATE_OK) {
        rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 3, data, sizeof data, comp, sizeof comp, &clen, TIMEOUT_MS,
                                &err);
        CHECK_OK(rc, err, "compress over mTLS");
        CHECK(ref_zstd_decompress(comp, clen, back, sizeof back) == sizeof data && memcmp(back, data, sizeof data) == 0,
              "TLS: wrong zstd output");
        rc = accelgate_decompress(c, ACCELGATE_FORMAT_ZSTD, comp, clen, back, sizeof back, &dlen, TIMEOUT_MS, &err);
        CHECK_OK(rc, err, "decompress over mTLS");
        accelgate_client_close(c);
    }
    /* Everything was copied by open. */
    memset(roots, 0, strlen(roots));
    memset(cert, 0, strlen(cert));
    memset(key, 0, strlen(key));
    free(roots);
    free(cert);
    free(key);

    /* Without a client certificate the server refuses the handshake. */
    cfg.tls_root_certs_pem = read_text(env("AG_TLS_ROOTS"));
    cfg.tls_cert_chain_pem = cfg.tls_private_key_pem = NULL;
    cfg.connect_timeout_ms = 0;
    rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "TLS open (lazy) without a client certificate");
    if (rc == ACCELGATE_OK) {
        rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 3, data, sizeof data, comp, sizeof comp, &clen, 5000, &err);
        CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAVAILABLE, err, "TLS without a client certificate");
        accelgate_client_close(c);
    }
    free((char *)cfg.tls_root_certs_pem);
    /* A server certificate from another CA is refused, lazily and at open. */
    cfg.tls_root_certs_pem = other;
    rc = accelgate_client_open(&cfg, &c, &err);
    CHECK_OK(rc, err, "TLS open (lazy) with other roots");
    if (rc == ACCELGATE_OK) {
        rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 3, data, sizeof data, comp, sizeof comp, &clen, 5000, &err);
        CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAVAILABLE, err, "TLS with the wrong roots");
        accelgate_client_close(c);
    }
    cfg.connect_timeout_ms = 3000;
    rc = open_with(&cfg, &c, &err);
    CHECK(rc == ACCELGATE_E_RPC && c == NULL, "TLS connect with the wrong roots: rc %d '%s'", rc, err.message);
    free(other);
    /* Plaintext to a TLS port. */
    c = open_client(env("AG_TLS_TARGET"), NULL);
    rc = accelgate_compress(c, ACCELGATE_FORMAT_ZSTD, 3, data, sizeof data, comp, sizeof comp, &clen, 5000, &err);
    CHECK_ERR(rc, ACCELGATE_E_RPC, ACCELGATE_GRPC_UNAVAILABLE, err, "plaintext to a TLS port");
    accelgate_client_close(c);
    /* Half an mTLS key pair is refused at open. */
    accelgate_client_config_init(&cfg);
    cfg.target = env("AG_TLS_TARGET");
    cfg.tls = 1;
    cfg.tls_cert_chain_pem = "x";
    rc = open_with(&cfg, &c, &err);
    CHECK_ERR(rc, ACCELGATE_E_INVALID, ACCELGATE_GRPC_INVALID_ARGUMENT, err, "half an mTLS key pair");
}

/* leak-selftest: deliberately never closes a client, so that the pytest wrapper
   can check that LeakSanitizer reports leaks of library and gRPC objects. */
static void test_leak_selftest(void) {
    accelgate_client *c = main_client();
    uint8_t out[ACCELGATE_DIGEST_MAX];
    size_t n;
    accelgate_error err;
    int rc = accelgate_digest(c, ACCELGATE_DIGEST_SHA256, NULL, "x", 1, out, sizeof out, &n, TIMEOUT_MS, &err);
    CHECK_OK(rc, err, "digest");
    /* no accelgate_client_close(c) */
}

/* ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    void (*fn)(void);
} sections[] = {{"compress", test_compress}, {"crypto", test_crypto}, {"errors", test_errors},
                {"async", test_async},       {"threads", test_threads}, {"tls", test_tls},
                {"leak-selftest", test_leak_selftest}};

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* lines reach the log even if a sanitizer ends the process */
    if (argc < 2) {
        fprintf(stderr, "usage: %s SECTION...  (compress crypto errors async threads tls)\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        size_t k;
        for (k = 0; k < sizeof sections / sizeof sections[0]; k++)
            if (strcmp(argv[i], sections[k].name) == 0) break;
        if (k == sizeof sections / sizeof sections[0]) die("unknown section %s", argv[i]);
        section = argv[i];
        int before = failures;
        double t0 = now_s();
        sections[k].fn();
        printf("%s %s (%.2f s)\n", failures == before ? "ok" : "FAILED", section, now_s() - t0);
    }
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
