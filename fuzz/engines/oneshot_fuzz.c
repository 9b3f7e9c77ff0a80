/* libFuzzer harness for the one-shot engines (accel_engines.c, accel_zstd_lz4.c),
 * built with clang -fsanitize=fuzzer,address by fuzz/engines/run.sh.
 *
 * byte 0: algorithm (deflate, zlib, gzip, zstd, lz4); byte 1: level; byte 2: output cap.
 *   - the rest as hostile compressed input: any status, but never a write past the
 *     cap (the buffer is exactly cap bytes, so ASan sees one) and never produced > cap;
 *   - the rest as plain data: compress, decompress, compare; and the verify engine
 *     accepts the engine's own output and refuses it with one byte changed. */
#include "accel_engines.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t algs[] = {ACCEL_ALG_DEFLATE_RAW, ACCEL_ALG_ZLIB, ACCEL_ALG_GZIP, ACCEL_ALG_ZSTD, ACCEL_ALG_LZ4};

static void fail(const char *why, unsigned status) {
    fprintf(stderr, "oneshot_fuzz: %s (status %u)\n", why, status);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static accel_engine_ctx *ctx;
    if (!ctx && !(ctx = accel_engine_create())) abort();
    if (size < 3) return 0;
    uint8_t alg = algs[data[0] % 5];
    int max_level = accel_engine_max_level(alg);
    uint8_t level = (uint8_t)(data[1] % (unsigned)(max_level + 1));
    uint32_t cap = 1u + data[2] * 67u;
    const uint8_t *src = data + 3;
    uint32_t len = (uint32_t)(size - 3);

    uint8_t *out = malloc(cap);
    if (!out) abort();
    uint32_t produced = 0, consumed = 0;
    uint16_t st = accel_engine_decompress(ctx, alg, src, len, out, cap, &produced, &consumed);
    if (produced > cap || consumed > len) fail("hostile input: reported past the buffers", st);
    free(out);

    uint32_t bound = len + len / 2 + 1024;
    uint8_t *packed = malloc(bound), *back = malloc(len ? len : 1);
    if (!packed || !back) abort();
    st = accel_engine_compress(ctx, alg, level, src, len, packed, bound, &produced, &consumed);
    if (st != ACCEL_STATUS_OK) fail("compression within the bound failed", st);
    uint32_t packed_len = produced;
    st = accel_engine_decompress(ctx, alg, packed, packed_len, back, len, &produced, &consumed);
    if (st != ACCEL_STATUS_OK || produced != len || memcmp(back, src, len) != 0) fail("round trip differs", st);
    if (accel_engine_verify(ctx, alg, packed, packed_len, src, len) != ACCEL_STATUS_OK) fail("verify refused good output", alg);
    if (len > 0) {
        uint8_t *wrong = malloc(len);
        if (!wrong) abort();
        memcpy(wrong, src, len);
        wrong[len / 2] ^= 0x01;
        if (accel_engine_verify(ctx, alg, packed, packed_len, wrong, len) == ACCEL_STATUS_OK) fail("verify accepted a different original", alg);
        free(wrong);
    }
    free(packed);
    free(back);
    return 0;
}
