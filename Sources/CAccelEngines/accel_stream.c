/* Stateful stream engines (ABI 1.3): one context per open stream, kept by the
 * device (like hardware keeping stream state on chip), fed chunk by chunk.
 * deflate, zlib and gzip through zlib's z_stream; zstd through ZSTD_CStream and
 * ZSTD_DStream. Every call writes at most dst_cap bytes; when the output fills up
 * before the chunk is done the call returns ACCEL_STATUS_MORE_OUTPUT and the
 * driver calls again with the rest of the input (or none) and a fresh buffer. */
#include "accel_engines.h"

#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

struct accel_stream {
    uint8_t algorithm;
    uint8_t compress;
    uint8_t finished;   /* the stream's end has been produced or seen */
    uint8_t member_done; /* gzip decompression: a member ended exactly at a chunk's end; another may follow */
    z_stream zs;
    int zs_ready;
    ZSTD_CStream *zc;
    ZSTD_DStream *zd;
    size_t zstd_hint;   /* decompression: 0 once a frame has ended */
};

static int window_bits(uint8_t algorithm) {
    return algorithm == ACCEL_ALG_DEFLATE_RAW ? -15 : algorithm == ACCEL_ALG_GZIP ? 31 : 15;
}

accel_stream *accel_stream_create(uint8_t algorithm, int compress, uint8_t level) {
    if (algorithm != ACCEL_ALG_DEFLATE_RAW && algorithm != ACCEL_ALG_ZLIB && algorithm != ACCEL_ALG_GZIP &&
        algorithm != ACCEL_ALG_ZSTD)
        return NULL;
    accel_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->algorithm = algorithm;
    s->compress = compress ? 1 : 0;
    if (algorithm == ACCEL_ALG_ZSTD) {
        if (compress) {
            s->zc = ZSTD_createCStream();
            if (!s->zc || ZSTD_isError(ZSTD_CCtx_setParameter(s->zc, ZSTD_c_compressionLevel, level ? level : 3)) ||
                ZSTD_isError(ZSTD_CCtx_setParameter(s->zc, ZSTD_c_checksumFlag, 1))) {
                accel_stream_destroy(s);
                return NULL;
            }
        } else {
            s->zd = ZSTD_createDStream();
            if (!s->zd) { accel_stream_destroy(s); return NULL; }
            ZSTD_DCtx_setParameter(s->zd, ZSTD_d_windowLogMax, 27);
            s->zstd_hint = 1;
        }
        return s;
    }
    int rc = compress ? deflateInit2(&s->zs, level > 9 ? 9 : level, Z_DEFLATED, window_bits(algorithm), 8, Z_DEFAULT_STRATEGY)
                      : inflateInit2(&s->zs, window_bits(algorithm));
    if (rc != Z_OK) { free(s); return NULL; }
    s->zs_ready = 1;
    return s;
}

void accel_stream_destroy(accel_stream *s) {
    if (!s) return;
    if (s->zs_ready) { if (s->compress) deflateEnd(&s->zs); else inflateEnd(&s->zs); }
    ZSTD_freeCStream(s->zc);
    ZSTD_freeDStream(s->zd);
    free(s);
}

static uint16_t zstd_error(size_t e) {
    switch (ZSTD_getErrorCode(e)) {
    case ZSTD_error_checksum_wrong: return ACCEL_STATUS_CHECKSUM_MISMATCH;
    case ZSTD_error_frameParameter_windowTooLarge: return ACCEL_STATUS_UNSUPPORTED;
    default: return ACCEL_STATUS_CORRUPT_INPUT;
    }
}

uint16_t accel_stream_process(accel_stream *s, const uint8_t *src, uint32_t src_len, int final,
                              uint8_t *dst, uint32_t dst_cap, uint32_t *produced, uint32_t *consumed) {
    *produced = 0;
    *consumed = 0;
    if (s->finished) return src_len == 0 ? ACCEL_STATUS_OK : ACCEL_STATUS_CORRUPT_INPUT;
    if (s->algorithm == ACCEL_ALG_ZSTD) {
        ZSTD_inBuffer in = {src, src_len, 0};
        ZSTD_outBuffer out = {dst, dst_cap, 0};
        if (s->compress) {
            size_t left = ZSTD_compressStream2(s->zc, &out, &in, final ? ZSTD_e_end : ZSTD_e_continue);
            *produced = (uint32_t)out.pos;
            *consumed = (uint32_t)in.pos;
            if (ZSTD_isError(left)) return ACCEL_STATUS_ENGINE_ERROR;
            if (in.pos < in.size || (final && left != 0)) return ACCEL_STATUS_MORE_OUTPUT;
            if (final) s->finished = 1;
            return ACCEL_STATUS_OK;
        }
        while (in.pos < in.size || (out.pos < out.size && s->zstd_hint != 0 && final && in.size == 0)) {
            size_t before_in = in.pos, before_out = out.pos;
            size_t hint = ZSTD_decompressStream(s->zd, &out, &in);
            if (ZSTD_isError(hint)) { *produced = (uint32_t)out.pos; *consumed = (uint32_t)in.pos; return zstd_error(hint); }
            s->zstd_hint = hint;
            if (out.pos == out.size) break;
            if (in.pos == before_in && out.pos == before_out) break;
        }
        *produced = (uint32_t)out.pos;
        *consumed = (uint32_t)in.pos;
        if (out.pos == out.size && (in.pos < in.size || s->zstd_hint != 0)) return ACCEL_STATUS_MORE_OUTPUT;
        if (final) {
            if (s->zstd_hint != 0) return ACCEL_STATUS_TRUNCATED_INPUT;
            s->finished = 1;
        }
        return ACCEL_STATUS_OK;
    }
    if (s->member_done) {
        /* A gzip member ended at the end of the previous chunk. An empty chunk keeps
         * waiting (or ends the stream when final); anything else must open a member. */
        if (src_len == 0) {
            if (final) s->finished = 1;
            return ACCEL_STATUS_OK;
        }
        if (src[0] != 0x1f || (src_len >= 2 && src[1] != 0x8b)) return ACCEL_STATUS_CORRUPT_INPUT;
        inflateReset(&s->zs);
        s->member_done = 0;
    }
    z_stream *z = &s->zs;
    z->next_in = (Bytef *)src;
    z->avail_in = src_len;
    z->next_out = dst;
    z->avail_out = dst_cap;
    if (s->compress) {
        int rc = deflate(z, final ? Z_FINISH : Z_NO_FLUSH);
        *produced = dst_cap - z->avail_out;
        *consumed = src_len - z->avail_in;
        if (rc == Z_STREAM_END) { s->finished = 1; return ACCEL_STATUS_OK; }
        if (rc != Z_OK && rc != Z_BUF_ERROR) return ACCEL_STATUS_ENGINE_ERROR;
        if (z->avail_in > 0 || final) return ACCEL_STATUS_MORE_OUTPUT;
        return ACCEL_STATUS_OK;
    }
    for (;;) {
        int rc = inflate(z, Z_NO_FLUSH);
        *produced = dst_cap - z->avail_out;
        *consumed = src_len - z->avail_in;
        if (rc == Z_STREAM_END) {
            /* gzip: another member may follow (RFC 1952 allows several). */
            if (s->algorithm == ACCEL_ALG_GZIP) {
                if (z->avail_in > 0) {
                    /* The next member's header may be split across chunks: one byte is enough to go on. */
                    if (z->next_in[0] == 0x1f && (z->avail_in < 2 || z->next_in[1] == 0x8b)) {
                        inflateReset(z);
                        continue;
                    }
                    return ACCEL_STATUS_CORRUPT_INPUT;
                }
                if (final) s->finished = 1;
                else s->member_done = 1;
                return ACCEL_STATUS_OK;
            }
            if (z->avail_in > 0) return ACCEL_STATUS_CORRUPT_INPUT; /* bytes after the end */
            s->finished = 1; /* the stream ended; later chunks must be empty */
            return ACCEL_STATUS_OK;
        }
        if (rc == Z_DATA_ERROR) {
            /* zlib says "incorrect data check" or "incorrect length check" for a failed
             * trailer; "incorrect header check" is a damaged header, not a checksum. */
            int trailer = z->msg && (strstr(z->msg, "data check") || strstr(z->msg, "length check"));
            return trailer ? ACCEL_STATUS_CHECKSUM_MISMATCH : ACCEL_STATUS_CORRUPT_INPUT;
        }
        if (rc == Z_NEED_DICT) return ACCEL_STATUS_UNSUPPORTED;
        if (rc == Z_MEM_ERROR) return ACCEL_STATUS_ENGINE_ERROR;
        /* Z_OK or Z_BUF_ERROR: out of input or out of output. */
        if (z->avail_out == 0) return ACCEL_STATUS_MORE_OUTPUT;
        return final ? ACCEL_STATUS_TRUNCATED_INPUT : ACCEL_STATUS_OK;
    }
}
