/* zstd (RFC 8878 frames) and LZ4 (frame format) engines for the emulated device.
 * Same contract as the deflate family: never write past dst_cap, report what was
 * produced and consumed, and map library errors to accel_status values. */
#include "accel_engines.h"
#include "accel_engines_internal.h"

#include <lz4frame.h>
#include <lz4hc.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

/* ---- zstd ------------------------------------------------------------------ */

uint16_t accel_zstd_compress(accel_engine_ctx *ctx, uint8_t level, const uint8_t *src, uint32_t src_len,
                             uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    ZSTD_CCtx *cctx = accel_engine_zstd_cctx(ctx);
    if (!cctx) return ACCEL_STATUS_ENGINE_ERROR;
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level == 0 ? 3 : level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1)))
        return ACCEL_STATUS_ENGINE_ERROR;
    size_t n = ZSTD_compress2(cctx, dst, dst_cap, src, src_len);
    if (ZSTD_isError(n))
        return ZSTD_getErrorCode(n) == ZSTD_error_dstSize_tooSmall ? ACCEL_STATUS_OUTPUT_OVERFLOW : ACCEL_STATUS_ENGINE_ERROR;
    *produced = (uint32_t)n;
    return ACCEL_STATUS_OK;
}

uint16_t accel_zstd_decompress(accel_engine_ctx *ctx, const uint8_t *src, uint32_t src_len,
                               uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed) {
    ZSTD_DCtx *dctx = accel_engine_zstd_dctx(ctx);
    if (!dctx) return ACCEL_STATUS_ENGINE_ERROR;
    if (src_len == 0) return ACCEL_STATUS_TRUNCATED_INPUT;
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_and_parameters);
    /* Bound the window so a hostile frame cannot ask for more than 128 MiB of history. */
    ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, 27);
    /* Streaming decode: output never exceeds dst_cap, and the stop reason is exact. */
    ZSTD_inBuffer in = {src, src_len, 0};
    ZSTD_outBuffer out = {dst, dst_cap, 0};
    size_t hint = 1;
    while (in.pos < in.size) {
        size_t before_in = in.pos, before_out = out.pos;
        hint = ZSTD_decompressStream(dctx, &out, &in);
        *produced = (uint32_t)out.pos;
        *consumed = (uint32_t)in.pos;
        if (ZSTD_isError(hint)) {
            switch (ZSTD_getErrorCode(hint)) {
            case ZSTD_error_checksum_wrong: return ACCEL_STATUS_CHECKSUM_MISMATCH;
            case ZSTD_error_dstSize_tooSmall: return ACCEL_STATUS_OUTPUT_OVERFLOW;
            case ZSTD_error_frameParameter_windowTooLarge: return ACCEL_STATUS_UNSUPPORTED;
            case ZSTD_error_dictionary_wrong: return ACCEL_STATUS_UNSUPPORTED;
            default: return ACCEL_STATUS_CORRUPT_INPUT;
            }
        }
        if (out.pos == out.size && hint != 0 && in.pos == before_in) return ACCEL_STATUS_OUTPUT_OVERFLOW;
        if (out.pos == out.size && hint != 0) {
            /* Output is full but the frame goes on: one more byte would overflow. */
            uint8_t probe;
            ZSTD_outBuffer one = {&probe, 1, 0};
            size_t h = ZSTD_decompressStream(dctx, &one, &in);
            if (!ZSTD_isError(h) && one.pos == 0 && h == 0 && in.pos == in.size) { hint = 0; break; }
            return ACCEL_STATUS_OUTPUT_OVERFLOW;
        }
        if (in.pos == before_in && out.pos == before_out) return ACCEL_STATUS_CORRUPT_INPUT; /* no progress */
    }
    *produced = (uint32_t)out.pos;
    *consumed = (uint32_t)in.pos;
    /* hint == 0: the last frame ended exactly at the end of the input (more frames may follow one another). */
    return hint == 0 ? ACCEL_STATUS_OK : ACCEL_STATUS_TRUNCATED_INPUT;
}

/* ---- LZ4 frame ------------------------------------------------------------- */

uint16_t accel_lz4_compress(const uint8_t *src, uint32_t src_len, uint8_t level,
                            uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    LZ4F_preferences_t prefs;
    memset(&prefs, 0, sizeof prefs);
    prefs.compressionLevel = level; /* 0-2: fast; 3-12: high compression (LZ4HC) */
    prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
    prefs.frameInfo.contentSize = src_len;
    prefs.frameInfo.blockSizeID = LZ4F_max64KB;
    if (dst_cap < LZ4F_compressFrameBound(src_len, &prefs)) return ACCEL_STATUS_OUTPUT_OVERFLOW;
    size_t n = LZ4F_compressFrame(dst, dst_cap, src, src_len, &prefs);
    if (LZ4F_isError(n)) return ACCEL_STATUS_ENGINE_ERROR;
    *produced = (uint32_t)n;
    return ACCEL_STATUS_OK;
}

uint16_t accel_lz4_decompress(accel_engine_ctx *ctx, const uint8_t *src, uint32_t src_len,
                              uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed) {
    LZ4F_dctx *dctx = accel_engine_lz4_dctx(ctx);
    if (!dctx) return ACCEL_STATUS_ENGINE_ERROR;
    if (src_len == 0) return ACCEL_STATUS_TRUNCATED_INPUT;
    LZ4F_resetDecompressionContext(dctx);
    size_t in_pos = 0, out_pos = 0, hint = 1;
    LZ4F_decompressOptions_t opts;
    memset(&opts, 0, sizeof opts);
    opts.stableDst = 1;
    while (in_pos < src_len) {
        size_t in_size = src_len - in_pos, out_size = dst_cap - out_pos;
        hint = LZ4F_decompress(dctx, dst + out_pos, &out_size, src + in_pos, &in_size, &opts);
        in_pos += in_size;
        out_pos += out_size;
        *produced = (uint32_t)out_pos;
        *consumed = (uint32_t)in_pos;
        if (LZ4F_isError(hint)) {
            accel_engine_lz4_dctx_discard(ctx);
            /* The error enum is static-linking-only; its names are public and stable. */
            const char *name = LZ4F_getErrorName(hint);
            return name && strstr(name, "Checksum_invalid") ? ACCEL_STATUS_CHECKSUM_MISMATCH : ACCEL_STATUS_CORRUPT_INPUT;
        }
        if (in_size == 0 && out_size == 0) {
            accel_engine_lz4_dctx_discard(ctx);
            return out_pos == dst_cap ? ACCEL_STATUS_OUTPUT_OVERFLOW : ACCEL_STATUS_CORRUPT_INPUT;
        }
    }
    /* All input consumed; a frame still open means the input was cut short, unless
       only the output cap stopped it. */
    if (hint != 0) {
        accel_engine_lz4_dctx_discard(ctx);
        if (out_pos == dst_cap) return ACCEL_STATUS_OUTPUT_OVERFLOW;
        return ACCEL_STATUS_TRUNCATED_INPUT;
    }
    return ACCEL_STATUS_OK;
}
