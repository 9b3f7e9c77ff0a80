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

/** Name of the library that runs (algorithm, level), for DescribeDevice and stats. */
const char *accel_engine_name(uint8_t opcode, uint8_t algorithm, uint8_t level);

/** Highest level accepted for a compression algorithm, or -1 if unsupported. */
int accel_engine_max_level(uint8_t algorithm);

#endif
