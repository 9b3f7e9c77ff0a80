/*
 * Software engines for the emulated device. See accel_engines.h.
 */
#include "accel_engines.h"
#include "accel_engines_internal.h"

#include <isa-l/igzip_lib.h>
#include <libdeflate.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <lz4frame.h>

#define ACCEL_LIBDEFLATE_MIN_LEVEL 4
#define ACCEL_LIBDEFLATE_MAX_LEVEL 9

struct accel_engine_ctx {
    struct isal_zstream zs;
    struct inflate_state inflate;
    uint8_t *isal_level_buf;         /* sized for the largest level used (3) */
    uint32_t isal_level_buf_size;
    struct libdeflate_compressor *ld[ACCEL_LIBDEFLATE_MAX_LEVEL + 1]; /* created on first use */
    z_stream stored[3];                /* level-0 streams per wrapper, created on first use */
    int stored_ready[3];
    struct accel_crypto_state *crypto; /* created on first crypto job */
    uint8_t *verify_buf;               /* compress-and-verify scratch, grown on demand */
    uint32_t verify_buf_size;
    ZSTD_CCtx *zstd_c;                 /* created on first use */
    ZSTD_DCtx *zstd_d;
    LZ4F_dctx *lz4_d;
};

ZSTD_CCtx *accel_engine_zstd_cctx(struct accel_engine_ctx *ctx) {
    if (!ctx->zstd_c) ctx->zstd_c = ZSTD_createCCtx();
    return ctx->zstd_c;
}

ZSTD_DCtx *accel_engine_zstd_dctx(struct accel_engine_ctx *ctx) {
    if (!ctx->zstd_d) ctx->zstd_d = ZSTD_createDCtx();
    return ctx->zstd_d;
}

/* LZ4F_resetDecompressionContext does not clear everything a failed frame
   leaves behind (liblz4 1.9.4 keeps frameRemainingSize from a frame that declared
   its content size, so the next frame without one fails at its end mark): after
   a failure the context is thrown away and a fresh one is made. */
void accel_engine_lz4_dctx_discard(struct accel_engine_ctx *ctx) {
    if (ctx->lz4_d) LZ4F_freeDecompressionContext(ctx->lz4_d);
    ctx->lz4_d = NULL;
}

LZ4F_dctx *accel_engine_lz4_dctx(struct accel_engine_ctx *ctx) {
    if (!ctx->lz4_d && LZ4F_isError(LZ4F_createDecompressionContext(&ctx->lz4_d, LZ4F_VERSION))) ctx->lz4_d = NULL;
    return ctx->lz4_d;
}

struct accel_crypto_state *accel_engine_crypto_state(accel_engine_ctx *ctx) {
    if (!ctx->crypto) ctx->crypto = accel_crypto_state_create();
    return ctx->crypto;
}

accel_engine_ctx *accel_engine_create(void) {
    accel_engine_ctx *ctx = calloc(1, sizeof(*ctx));
    if (!ctx) return NULL;
    ctx->isal_level_buf_size = ISAL_DEF_LVL3_DEFAULT;
    ctx->isal_level_buf = malloc(ctx->isal_level_buf_size);
    if (!ctx->isal_level_buf) { free(ctx); return NULL; }
    return ctx;
}

void accel_engine_destroy(accel_engine_ctx *ctx) {
    if (!ctx) return;
    for (int i = 0; i <= ACCEL_LIBDEFLATE_MAX_LEVEL; i++)
        if (ctx->ld[i]) libdeflate_free_compressor(ctx->ld[i]);
    for (int i = 0; i < 3; i++)
        if (ctx->stored_ready[i]) deflateEnd(&ctx->stored[i]);
    accel_crypto_state_destroy(ctx->crypto);
    free(ctx->verify_buf);
    ZSTD_freeCCtx(ctx->zstd_c);
    ZSTD_freeDCtx(ctx->zstd_d);
    if (ctx->lz4_d) LZ4F_freeDecompressionContext(ctx->lz4_d);
    free(ctx->isal_level_buf);
    free(ctx);
}


int accel_engine_max_level(uint8_t algorithm) {
    switch (algorithm) {
    case ACCEL_ALG_DEFLATE_RAW:
    case ACCEL_ALG_ZLIB:
    case ACCEL_ALG_GZIP: return 9;
    case ACCEL_ALG_ZSTD: return 19;
    case ACCEL_ALG_LZ4: return 12;
    default: return -1;
    }
}

const char *accel_engine_name(uint8_t opcode, uint8_t algorithm, uint8_t level) {
    if (opcode == ACCEL_OP_NOP) return "nop";
    if (opcode == ACCEL_OP_ENCRYPT || opcode == ACCEL_OP_DECRYPT) return "openssl-evp";
    if (opcode == ACCEL_OP_DIGEST) {
        switch (algorithm) {
        case ACCEL_ALG_CRC32C: case ACCEL_ALG_CRC32: return "isal-crc";
        case ACCEL_ALG_ADLER32: return "zlib";
        default: return "openssl-evp";
        }
    }
    if (accel_engine_max_level(algorithm) < 0) return "unsupported";
    if (algorithm == ACCEL_ALG_ZSTD) return "zstd";
    if (algorithm == ACCEL_ALG_LZ4) return opcode == ACCEL_OP_COMPRESS && level >= 3 ? "lz4hc" : "lz4";
    if (opcode == ACCEL_OP_DECOMPRESS) return "isal-inflate";
    if (level == 0) return "zlib";
    if (level <= 3) return "isal-igzip";
    return "libdeflate";
}

/* ---- compression ---------------------------------------------------------- */

static uint16_t compress_zlib_stored(accel_engine_ctx *ctx, uint8_t algorithm, const uint8_t *src, uint32_t src_len,
                                     uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    int which = algorithm == ACCEL_ALG_DEFLATE_RAW ? 0 : algorithm == ACCEL_ALG_GZIP ? 2 : 1;
    z_stream *zs = &ctx->stored[which];
    if (!ctx->stored_ready[which]) {
        int window = which == 0 ? -15 : which == 2 ? 31 : 15;
        memset(zs, 0, sizeof(*zs));
        if (deflateInit2(zs, 0, Z_DEFLATED, window, 8, Z_DEFAULT_STRATEGY) != Z_OK) return ACCEL_STATUS_ENGINE_ERROR;
        ctx->stored_ready[which] = 1;
    } else if (deflateReset(zs) != Z_OK) {
        return ACCEL_STATUS_ENGINE_ERROR;
    }
    zs->next_in = (Bytef *)src;
    zs->avail_in = src_len;
    zs->next_out = dst;
    zs->avail_out = dst_cap;
    int rc = deflate(zs, Z_FINISH);
    *produced = (uint32_t)zs->total_out;
    if (rc == Z_STREAM_END) return ACCEL_STATUS_OK;
    return rc == Z_OK || rc == Z_BUF_ERROR ? ACCEL_STATUS_OUTPUT_OVERFLOW : ACCEL_STATUS_ENGINE_ERROR;
}

static uint16_t compress_isal(accel_engine_ctx *ctx, uint8_t algorithm, uint8_t level,
                              const uint8_t *src, uint32_t src_len,
                              uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    struct isal_zstream *zs = &ctx->zs;
    isal_deflate_init(zs);
    zs->level = level;
    zs->level_buf = ctx->isal_level_buf;
    zs->level_buf_size = ctx->isal_level_buf_size;
    zs->gzip_flag = algorithm == ACCEL_ALG_GZIP ? IGZIP_GZIP : algorithm == ACCEL_ALG_ZLIB ? IGZIP_ZLIB : IGZIP_DEFLATE;
    zs->end_of_stream = 1;
    zs->flush = NO_FLUSH;
    zs->next_in = (uint8_t *)src;
    zs->avail_in = src_len;
    zs->next_out = dst;
    zs->avail_out = dst_cap;
    int rc = isal_deflate(zs);
    *produced = zs->total_out;
    if (rc != COMP_OK) return ACCEL_STATUS_ENGINE_ERROR;
    if (zs->internal_state.state != ZSTATE_END) return ACCEL_STATUS_OUTPUT_OVERFLOW;
    return ACCEL_STATUS_OK;
}

static uint16_t compress_libdeflate(accel_engine_ctx *ctx, uint8_t algorithm, uint8_t level,
                                    const uint8_t *src, uint32_t src_len,
                                    uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    if (!ctx->ld[level]) {
        ctx->ld[level] = libdeflate_alloc_compressor((int)level);
        if (!ctx->ld[level]) return ACCEL_STATUS_ENGINE_ERROR;
    }
    size_t n;
    switch (algorithm) {
    case ACCEL_ALG_GZIP: n = libdeflate_gzip_compress(ctx->ld[level], src, src_len, dst, dst_cap); break;
    case ACCEL_ALG_ZLIB: n = libdeflate_zlib_compress(ctx->ld[level], src, src_len, dst, dst_cap); break;
    default: n = libdeflate_deflate_compress(ctx->ld[level], src, src_len, dst, dst_cap); break;
    }
    *produced = (uint32_t)n;
    return n == 0 ? ACCEL_STATUS_OUTPUT_OVERFLOW : ACCEL_STATUS_OK;
}

uint16_t accel_engine_compress(accel_engine_ctx *ctx, uint8_t algorithm, uint8_t level,
                               const uint8_t *src, uint32_t src_len,
                               uint8_t *dst, uint32_t dst_cap,
                               uint32_t *produced, uint32_t *consumed) {
    *produced = 0;
    *consumed = 0;
    int max = accel_engine_max_level(algorithm);
    if (max < 0 || level > max) return ACCEL_STATUS_UNSUPPORTED;
    uint16_t st;
    if (algorithm == ACCEL_ALG_ZSTD)
        st = accel_zstd_compress(ctx, level, src, src_len, dst, dst_cap, produced);
    else if (algorithm == ACCEL_ALG_LZ4)
        st = accel_lz4_compress(src, src_len, level, dst, dst_cap, produced);
    else if (level == 0)
        st = compress_zlib_stored(ctx, algorithm, src, src_len, dst, dst_cap, produced);
    else if (level <= ISAL_DEF_MAX_LEVEL)
        st = compress_isal(ctx, algorithm, level, src, src_len, dst, dst_cap, produced);
    else
        st = compress_libdeflate(ctx, algorithm, level, src, src_len, dst, dst_cap, produced);
    if (st == ACCEL_STATUS_OK) *consumed = src_len;
    else *produced = 0;
    return st;
}

/* ---- decompression -------------------------------------------------------- */

static int is_gzip_member_start(const uint8_t *p, uint32_t n) {
    return n >= 2 && p[0] == 0x1f && p[1] == 0x8b;
}

/* Header checks ISA-L leaves loose or reports as a checksum error. Returns
   ACCEL_STATUS_OK when the wrapper header (if enough bytes are present) is sane. */
static uint16_t check_wrapper_header(uint8_t algorithm, const uint8_t *p, uint32_t n) {
    if (algorithm == ACCEL_ALG_ZLIB && n >= 2) {
        /* RFC 1950: CM = 8, CINFO <= 7, (CMF*256 + FLG) % 31 == 0; FDICT needs a preset dictionary. */
        if ((p[0] & 0x0F) != 8 || (p[0] >> 4) > 7 || ((p[0] << 8) | p[1]) % 31 != 0) return ACCEL_STATUS_CORRUPT_INPUT;
        if (p[1] & 0x20) return ACCEL_STATUS_UNSUPPORTED;
    } else if (algorithm == ACCEL_ALG_GZIP && n >= 4) {
        /* RFC 1952: ID1 ID2 = 1f 8b, CM = 8, reserved FLG bits 5..7 must be zero. */
        if (p[0] != 0x1f || p[1] != 0x8b || p[2] != 8 || (p[3] & 0xE0) != 0) return ACCEL_STATUS_CORRUPT_INPUT;
    }
    return ACCEL_STATUS_OK;
}

uint16_t accel_engine_decompress(accel_engine_ctx *ctx, uint8_t algorithm,
                                 const uint8_t *src, uint32_t src_len,
                                 uint8_t *dst, uint32_t dst_cap,
                                 uint32_t *produced, uint32_t *consumed) {
    *produced = 0;
    *consumed = 0;
    if (accel_engine_max_level(algorithm) < 0) return ACCEL_STATUS_UNSUPPORTED;
    if (algorithm == ACCEL_ALG_ZSTD) return accel_zstd_decompress(ctx, src, src_len, dst, dst_cap, produced, consumed);
    if (algorithm == ACCEL_ALG_LZ4) return accel_lz4_decompress(ctx, src, src_len, dst, dst_cap, produced, consumed);
    struct inflate_state *st = &ctx->inflate;
    uint32_t in_pos = 0, out_pos = 0;
    for (;;) { /* one iteration per gzip member; one in total for zlib and raw deflate */
        uint16_t header = check_wrapper_header(algorithm, src + in_pos, src_len - in_pos);
        if (header != ACCEL_STATUS_OK) return header;
        isal_inflate_init(st);
        st->crc_flag = algorithm == ACCEL_ALG_GZIP ? ISAL_GZIP : algorithm == ACCEL_ALG_ZLIB ? ISAL_ZLIB : ISAL_DEFLATE;
        st->next_in = (uint8_t *)src + in_pos;
        st->avail_in = src_len - in_pos;
        st->next_out = dst + out_pos;
        st->avail_out = dst_cap - out_pos;
        int rc = isal_inflate(st);
        /* On a corrupt stream ISA-L can leave avail_in one below zero (it wraps) after
           reading ahead (found by fuzz/engines/oneshot_fuzz): never report past the input. */
        uint32_t given = src_len - in_pos;
        uint32_t used_in = st->avail_in <= given ? given - st->avail_in : given;
        uint32_t made = (dst_cap - out_pos) - st->avail_out;
        in_pos += used_in;
        out_pos += made;
        *produced = out_pos;
        *consumed = in_pos;
        if (rc == ISAL_INCORRECT_CHECKSUM) return ACCEL_STATUS_CHECKSUM_MISMATCH;
        if (rc == ISAL_NEED_DICT) return ACCEL_STATUS_UNSUPPORTED; /* zlib preset dictionary */
        if (rc < 0) return ACCEL_STATUS_CORRUPT_INPUT;
        if (st->block_state != ISAL_BLOCK_FINISH) {
            /* Not finished: either the output cap was hit, or the input ran out. */
            if (st->avail_out == 0 || rc == ISAL_OUT_OVERFLOW) return ACCEL_STATUS_OUTPUT_OVERFLOW;
            return ACCEL_STATUS_TRUNCATED_INPUT;
        }
        /* ISA-L reads ahead into a bit buffer; whole bytes still buffered there
           were not part of the stream. */
        uint32_t unread = (uint32_t)(st->read_in_length > 0 ? st->read_in_length / 8 : 0);
        in_pos = unread <= in_pos ? in_pos - unread : 0;
        *consumed = in_pos;
        if (in_pos == src_len) return ACCEL_STATUS_OK;
        /* Bytes remain after the end of the stream. gzip allows further members (RFC 1952 §2.2). */
        if (algorithm == ACCEL_ALG_GZIP && is_gzip_member_start(src + in_pos, src_len - in_pos)) continue;
        return ACCEL_STATUS_CORRUPT_INPUT;
    }
}

/* Verify scratch kept between jobs; a larger buffer is freed after use. */
#define ACCEL_VERIFY_RETAINED_BYTES (4u << 20)

uint16_t accel_engine_verify(accel_engine_ctx *ctx, uint8_t algorithm,
                             const uint8_t *compressed, uint32_t compressed_len,
                             const uint8_t *original, uint32_t original_len) {
    /* One byte more than the original, so output that runs long is caught too. */
    uint32_t need = original_len + 1;
    if (need == 0) return ACCEL_STATUS_VERIFY_FAILED;
    if (ctx->verify_buf_size < need) {
        uint8_t *b = realloc(ctx->verify_buf, need);
        if (!b) return ACCEL_STATUS_ENGINE_ERROR;
        ctx->verify_buf = b;
        ctx->verify_buf_size = need;
    }
    uint32_t produced = 0, consumed = 0;
    uint16_t st = accel_engine_decompress(ctx, algorithm, compressed, compressed_len,
                                          ctx->verify_buf, need, &produced, &consumed);
    if (st != ACCEL_STATUS_OK || produced != original_len || consumed != compressed_len)
        return ACCEL_STATUS_VERIFY_FAILED;
    int same = !original_len || memcmp(ctx->verify_buf, original, original_len) == 0;
    if (ctx->verify_buf_size > ACCEL_VERIFY_RETAINED_BYTES) {
        /* One large job does not pin its scratch for ever. */
        free(ctx->verify_buf);
        ctx->verify_buf = NULL;
        ctx->verify_buf_size = 0;
    }
    return same ? ACCEL_STATUS_OK : ACCEL_STATUS_VERIFY_FAILED;
}
