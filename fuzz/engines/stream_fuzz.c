/* libFuzzer harness for the device's stream engines (accel_stream.c), built with
 * clang -fsanitize=fuzzer,address by fuzz/engines/run.sh.
 *
 * The first input byte picks a game; the rest is shaped by the game:
 *   0  gzip members: 1..4 payloads, each a separate gzip member made by zlib, the
 *      concatenation cut into chunks at places the input chooses (member edges
 *      among them). Every payload must come out, in order: RFC 1952 and Python's
 *      gzip read several members as one stream.
 *   1  round trip: compress with the stream engine (deflate, zlib, gzip or zstd)
 *      in chunks, decompress in other chunks with a small output buffer; the
 *      result must equal the input.
 *   2  hostile input: the bytes as a compressed stream of each format, in chunks,
 *      with small output buffers. Any status is fine; reading or writing outside
 *      the buffers (ASan), an output past dst_cap or a loop that never ends is not.
 * A broken expectation calls abort(), which libFuzzer reports with the input. */
#include "accel_engines.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define MAX_OUT (1u << 20)
#define MAX_CALLS 100000u

typedef struct { const uint8_t *p; size_t n; } reader;

static unsigned take(reader *r, unsigned bound) {
    if (r->n == 0 || bound == 0) return 0;
    unsigned v = r->p[0] % bound;
    r->p++; r->n--;
    return v;
}

static void fail(const char *why, unsigned status) {
    fprintf(stderr, "stream_fuzz: %s (status %u)\n", why, status);
    abort();
}

/* Feeds src through s in chunks whose sizes come from `cuts` (cycled), output in
 * buffers of out_cap bytes. Returns the final status; output is appended to out. */
static uint16_t feed(accel_stream *s, const uint8_t *src, size_t len, const size_t *cuts, size_t ncuts,
                     uint32_t out_cap, uint8_t *out, size_t *out_len) {
    size_t off = 0, k = 0, calls = 0;
    uint8_t *buf = malloc(out_cap);
    if (!buf) abort();
    uint16_t st = ACCEL_STATUS_OK;
    do {
        size_t piece = ncuts ? cuts[k++ % ncuts] : len;
        if (piece > len - off) piece = len - off;
        int final = off + piece == len;
        const uint8_t *at = src + off;
        uint32_t left = (uint32_t)piece;
        for (;;) {
            uint32_t produced = 0, consumed = 0;
            st = accel_stream_process(s, at, left, final, buf, out_cap, &produced, &consumed);
            if (produced > out_cap || consumed > left) fail("engine reported more than it was given", st);
            if (*out_len + produced > MAX_OUT) { free(buf); return ACCEL_STATUS_OUTPUT_OVERFLOW; }
            memcpy(out + *out_len, buf, produced);
            *out_len += produced;
            at += consumed;
            left -= consumed;
            if (++calls > MAX_CALLS) fail("stream makes no progress", st);
            if (st != ACCEL_STATUS_MORE_OUTPUT) break;
        }
        if (st != ACCEL_STATUS_OK) break;
        off += piece;
        if (final) break;
    } while (1);
    free(buf);
    return st;
}

static size_t gzip_member(const uint8_t *src, size_t len, int level, uint8_t *dst, size_t cap) {
    z_stream z; memset(&z, 0, sizeof z);
    if (deflateInit2(&z, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) != Z_OK) abort();
    z.next_in = (Bytef *)src; z.avail_in = (uInt)len;
    z.next_out = dst; z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) abort();
    size_t n = cap - z.avail_out;
    deflateEnd(&z);
    return n;
}

static void game_gzip_members(reader *r) {
    static uint8_t packed[4 * 70000], out[MAX_OUT];
    size_t plain_total = 0, packed_len = 0, edges[4];
    unsigned members = 1 + take(r, 4);
    const uint8_t *plain[4]; size_t plain_len[4];
    for (unsigned m = 0; m < members; m++) {
        size_t len = take(r, 64) * 37u;       /* 0 .. 2331 bytes, empty members too */
        if (len > r->n) len = r->n;
        plain[m] = r->p; plain_len[m] = len;
        r->p += len; r->n -= len;
        packed_len += gzip_member(plain[m], len, (int)take(r, 10), packed + packed_len, sizeof packed - packed_len);
        edges[m] = packed_len;
        plain_total += len;
    }
    /* Chunk sizes: either "up to the next member edge" or a small odd size. */
    size_t cuts[16], ncuts = 0, pos = 0;
    while (ncuts < 16 && pos < packed_len) {
        unsigned kind = take(r, 3);
        size_t piece = 1 + take(r, 200);
        if (kind == 0) {
            for (unsigned m = 0; m < members; m++) if (edges[m] > pos) { piece = edges[m] - pos; break; }
        }
        cuts[ncuts++] = piece;
        pos += piece;
    }
    accel_stream *s = accel_stream_create(ACCEL_ALG_GZIP, 0, 0);
    if (!s) abort();
    size_t out_len = 0;
    uint16_t st = feed(s, packed, packed_len, cuts, ncuts, 1 + take(r, 255) * 64u, out, &out_len);
    accel_stream_destroy(s);
    if (st != ACCEL_STATUS_OK) fail("valid multi-member gzip refused", st);
    if (out_len != plain_total) fail("members lost", (unsigned)out_len);
    size_t at = 0;
    for (unsigned m = 0; m < members; m++) {
        if (memcmp(out + at, plain[m], plain_len[m]) != 0) fail("member output differs", m);
        at += plain_len[m];
    }
}

static const uint8_t stream_algs[] = {ACCEL_ALG_DEFLATE_RAW, ACCEL_ALG_ZLIB, ACCEL_ALG_GZIP, ACCEL_ALG_ZSTD};

static void game_round_trip(reader *r) {
    static uint8_t packed[MAX_OUT], back[MAX_OUT];
    uint8_t alg = stream_algs[take(r, 4)];
    uint8_t level = (uint8_t)take(r, alg == ACCEL_ALG_ZSTD ? 20 : 10);
    size_t cuts[8], ncuts = 1 + take(r, 8);
    for (size_t i = 0; i < ncuts; i++) cuts[i] = 1 + take(r, 250) * 17u;
    size_t cuts2[8], ncuts2 = 1 + take(r, 8);
    for (size_t i = 0; i < ncuts2; i++) cuts2[i] = 1 + take(r, 250) * 3u;
    uint32_t cap1 = 1 + take(r, 255) * 97u, cap2 = 1 + take(r, 255) * 31u;
    accel_stream *c = accel_stream_create(alg, 1, level);
    if (!c) abort();
    size_t packed_len = 0;
    uint16_t st = feed(c, r->p, r->n, cuts, ncuts, cap1, packed, &packed_len);
    accel_stream_destroy(c);
    if (st == ACCEL_STATUS_OUTPUT_OVERFLOW) return;
    if (st != ACCEL_STATUS_OK) fail("stream compression failed", st);
    accel_stream *d = accel_stream_create(alg, 0, 0);
    if (!d) abort();
    size_t back_len = 0;
    st = feed(d, packed, packed_len, cuts2, ncuts2, cap2, back, &back_len);
    accel_stream_destroy(d);
    if (st != ACCEL_STATUS_OK) fail("own stream refused on the way back", st);
    if (back_len != r->n || memcmp(back, r->p, r->n) != 0) fail("round trip differs", alg);
}

static void game_hostile(reader *r) {
    static uint8_t out[MAX_OUT];
    uint8_t alg = stream_algs[take(r, 4)];
    size_t cuts[8], ncuts = 1 + take(r, 8);
    for (size_t i = 0; i < ncuts; i++) cuts[i] = 1 + take(r, 64);
    accel_stream *d = accel_stream_create(alg, 0, 0);
    if (!d) abort();
    size_t out_len = 0;
    (void)feed(d, r->p, r->n, cuts, ncuts, 1 + take(r, 255) * 13u, out, &out_len);
    accel_stream_destroy(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    reader r = {data + 1, size - 1};
    switch (data[0] % 3) {
    case 0: game_gzip_members(&r); break;
    case 1: game_round_trip(&r); break;
    default: game_hostile(&r); break;
    }
    return 0;
}
