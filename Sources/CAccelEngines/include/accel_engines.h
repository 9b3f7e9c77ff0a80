/*
 * accel_engines.h — the emulated device's software engines.
 *
 * Engines work in place on raw pointers into a queue's data pool: they read
 * src, write at most dst_capacity bytes to dst, and report what they produced
 * and consumed. They never allocate per job; per-engine scratch state lives in
 * an accel_engine_ctx owned by one engine thread (allocated lazily on first
 * use of a level, then reused).
 *
 * Level mapping for the deflate family (zlib's 0..9; documented in docs/DEVICE_ABI.md):
 *   0     zlib deflate, stored blocks
 *   1..3  ISA-L igzip levels 1..3
 *   4..9  libdeflate levels 4..9
 * Decompression uses ISA-L isal_inflate with a hard output cap.
 */
#ifndef ACCEL_ENGINES_H
#define ACCEL_ENGINES_H

#include <stdint.h>
#include "accel_abi.h"

typedef struct accel_engine_ctx accel_engine_ctx;

/** Allocates an engine's scratch state. Returns NULL when out of memory. */
accel_engine_ctx *accel_engine_create(void);
void accel_engine_destroy(accel_engine_ctx *ctx);

/** One-shot compression. Returns an accel_status. */
uint16_t accel_engine_compress(accel_engine_ctx *ctx, uint8_t algorithm, uint8_t level,
                               const uint8_t *src, uint32_t src_len,
                               uint8_t *dst, uint32_t dst_cap,
                               uint32_t *produced, uint32_t *consumed);

/** One-shot decompression with a hard output cap: output past dst_cap is never written,
    and the job fails with ACCEL_STATUS_OUTPUT_OVERFLOW. Returns an accel_status. */
uint16_t accel_engine_decompress(accel_engine_ctx *ctx, uint8_t algorithm,
                                 const uint8_t *src, uint32_t src_len,
                                 uint8_t *dst, uint32_t dst_cap,
                                 uint32_t *produced, uint32_t *consumed);

/** Compress-and-verify (ABI 1.2): decompresses `compressed` into the engine's
    scratch buffer and compares it with `original`. Returns ACCEL_STATUS_OK when
    they match exactly, else ACCEL_STATUS_VERIFY_FAILED. */
uint16_t accel_engine_verify(accel_engine_ctx *ctx, uint8_t algorithm,
                             const uint8_t *compressed, uint32_t compressed_len,
                             const uint8_t *original, uint32_t original_len);

/** A stream context (ABI 1.3): device-private state of one open stream. */
typedef struct accel_stream accel_stream;
/** Opens a stream: deflate, zlib, gzip or zstd; compress (1) or decompress (0). NULL if unsupported or out of memory. */
accel_stream *accel_stream_create(uint8_t algorithm, int compress, uint8_t level);
void accel_stream_destroy(accel_stream *s);
/** Feeds one chunk (final = the stream's last). Returns OK when the chunk is done,
    ACCEL_STATUS_MORE_OUTPUT when dst filled first (call again with the rest of the
    input and a fresh buffer), or an error status. */
uint16_t accel_stream_process(accel_stream *s, const uint8_t *src, uint32_t src_len, int final,
                              uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed);

/** AEAD seal (encrypt = 1) or open (encrypt = 0); see accel_aead_params in accel_abi.h.
    On open, a tag mismatch returns ACCEL_STATUS_AUTH_FAILED and zeroes dst. */
uint16_t accel_engine_aead(accel_engine_ctx *ctx, int encrypt, uint8_t algorithm,
                           const uint8_t *key, uint32_t key_len,
                           const accel_aead_params *params, const uint8_t *aad,
                           const uint8_t *src, uint32_t src_len,
                           uint8_t *dst, uint32_t dst_cap, uint32_t *produced);

/** Hash, HMAC (key required) or checksum (4 bytes, big-endian) of src into dst. */
uint16_t accel_engine_digest(accel_engine_ctx *ctx, uint8_t algorithm,
                             const uint8_t *key, uint32_t key_len,
                             const uint8_t *src, uint32_t src_len,
                             uint8_t *dst, uint32_t dst_cap, uint32_t *produced);

/** Key bytes an AEAD algorithm needs, or -1. */
int accel_aead_key_length(uint8_t algorithm);
/** Output bytes of a digest algorithm, or -1. */
int accel_digest_length(uint8_t algorithm);

struct accel_crypto_state;
struct accel_crypto_state *accel_crypto_state_create(void);
void accel_crypto_state_destroy(struct accel_crypto_state *st);
/** The engine's crypto contexts, created on first use (NULL if OpenSSL fails). */
struct accel_crypto_state *accel_engine_crypto_state(accel_engine_ctx *ctx);

/** Name of the library that runs (algorithm, level), for DescribeDevice and stats. */
const char *accel_engine_name(uint8_t opcode, uint8_t algorithm, uint8_t level);

/** Highest level accepted for a compression algorithm, or -1 if unsupported. */
int accel_engine_max_level(uint8_t algorithm);

#endif
