/* Internal to CAccelEngines: per-engine contexts of the zstd and LZ4 engines. */
#ifndef ACCEL_ENGINES_INTERNAL_H
#define ACCEL_ENGINES_INTERNAL_H
#include <stdint.h>

typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
typedef struct LZ4F_dctx_s LZ4F_dctx;
struct accel_engine_ctx;

ZSTD_CCtx *accel_engine_zstd_cctx(struct accel_engine_ctx *ctx);
ZSTD_DCtx *accel_engine_zstd_dctx(struct accel_engine_ctx *ctx);
LZ4F_dctx *accel_engine_lz4_dctx(struct accel_engine_ctx *ctx);
void accel_engine_lz4_dctx_discard(struct accel_engine_ctx *ctx);

uint16_t accel_zstd_compress(struct accel_engine_ctx *ctx, uint8_t level, const uint8_t *src, uint32_t src_len,
                             uint8_t *dst, uint32_t dst_cap, uint32_t *produced);
uint16_t accel_zstd_decompress(struct accel_engine_ctx *ctx, const uint8_t *src, uint32_t src_len,
                               uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed);
uint16_t accel_lz4_compress(const uint8_t *src, uint32_t src_len, uint8_t level,
                            uint8_t *dst, uint32_t dst_cap, uint32_t *produced);
uint16_t accel_lz4_decompress(struct accel_engine_ctx *ctx, const uint8_t *src, uint32_t src_len,
                              uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed);
#endif
