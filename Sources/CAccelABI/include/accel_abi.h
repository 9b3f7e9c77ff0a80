/*
 * accel_abi.h — the AccelGate device ABI ("uapi").
 *
 * This header is the single source of truth for the memory layout shared by
 * the emulated device and any driver, in any language. It is plain C11 with
 * fixed-width types and no padding surprises: every struct has static
 * assertions on its size and on the offsets other processes rely on.
 *
 * A hardware queue is one shared-memory region (memfd or /dev/shm file):
 *
 *   +----------------------+ 0
 *   | accel_region_header  |  4 KiB, one cache line per writer
 *   +----------------------+ sq_offset
 *   | SQ: sq_entries x 64B |  written by the driver, read by the device
 *   +----------------------+ cq_offset
 *   | CQ: cq_entries x 32B |  written by the device, read by the driver
 *   +----------------------+ keyslot_offset   (reserved, may be empty)
 *   | key slots            |
 *   +----------------------+ stream_ctx_offset (reserved, may be empty)
 *   | stream contexts      |
 *   +----------------------+ data_offset
 *   | data pool ("DMA")    |  job input and output buffers
 *   +----------------------+ region_size
 *
 * Ring indices are free-running uint32 counters; the slot is index & (entries-1).
 * A ring is empty when head == tail and full when tail - head == entries.
 *
 * Memory ordering (both sides):
 *   producer: write slot; store-release tail
 *   consumer: load-acquire tail; read slot; store-release head
 * Doorbells follow io_uring's SQPOLL NEED_WAKEUP protocol; see docs/DEVICE_ABI.md.
 *
 * Versioning: major changes break compatibility (a driver refuses a region whose
 * major differs); minor changes only give meaning to reserved fields that
 * older peers leave zero.
 */
#ifndef ACCEL_ABI_H
#define ACCEL_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ACCEL_ABI_MAGIC          0x4C434341u /* "ACCL" in little-endian memory order */
#define ACCEL_ABI_VERSION_MAJOR  1u
#define ACCEL_ABI_VERSION_MINOR  4u
#define ACCEL_ABI_VERSION        0x00010004u /* (MAJOR << 16) | MINOR */

#define ACCEL_CACHELINE          64u
#define ACCEL_HEADER_SIZE        4096u
#define ACCEL_SQE_SIZE           64u
#define ACCEL_CQE_SIZE           32u
/** Every data-pool buffer handed to the device starts on this boundary. */
#define ACCEL_BUFFER_ALIGN       64u

/* ---------------------------------------------------------------------------
 * Opcodes (accel_sqe.opcode)
 * ------------------------------------------------------------------------- */
enum accel_opcode {
    ACCEL_OP_NOP        = 0, /* completes at once; for ring benchmarks */
    ACCEL_OP_COMPRESS   = 1,
    ACCEL_OP_DECOMPRESS = 2,
    ACCEL_OP_ENCRYPT    = 3, /* 1.1: AEAD seal: dst = ct || tag */
    ACCEL_OP_DECRYPT    = 4, /* 1.1: AEAD open: src = ct || tag, dst = plaintext */
    ACCEL_OP_DIGEST     = 5, /* 1.1: hashes, HMAC, checksums */
};

/* ---------------------------------------------------------------------------
 * Algorithms (accel_sqe.algorithm). Numbers are stable forever.
 * ------------------------------------------------------------------------- */
enum accel_algorithm {
    ACCEL_ALG_NONE              = 0,
    /* compression: 1..15 */
    ACCEL_ALG_DEFLATE_RAW       = 1, /* RFC 1951 */
    ACCEL_ALG_ZLIB              = 2, /* RFC 1950 */
    ACCEL_ALG_GZIP              = 3, /* RFC 1952 */
    ACCEL_ALG_ZSTD              = 4, /* 1.2: zstd frames (RFC 8878), levels 1..19 (0 = 3), content checksum on */
    ACCEL_ALG_LZ4               = 5, /* 1.2: LZ4 frame format, levels 0..12 (3+ = LZ4HC), content checksum on */
    /* AEAD: 16..31 (1.1) */
    ACCEL_ALG_AES128_GCM        = 16,
    ACCEL_ALG_AES256_GCM        = 17,
    ACCEL_ALG_CHACHA20_POLY1305 = 18,
    /* digests and checksums: 32..63 (1.1). Checksums are written as 4 bytes, big-endian. */
    ACCEL_ALG_SHA256            = 32,
    ACCEL_ALG_SHA384            = 33,
    ACCEL_ALG_SHA512            = 34,
    ACCEL_ALG_HMAC_SHA256       = 35,
    ACCEL_ALG_HMAC_SHA512       = 36,
    ACCEL_ALG_CRC32C            = 37,
    ACCEL_ALG_CRC32             = 38,
    ACCEL_ALG_ADLER32           = 39,
};

/* ---------------------------------------------------------------------------
 * Descriptor flags (accel_sqe.flags)
 * ------------------------------------------------------------------------- */
#define ACCEL_SQE_F_CHAIN        (1u << 0) /* 1.1: the next SQE continues this job (see below) */
#define ACCEL_SQE_F_STREAM       (1u << 1) /* 1.3: a chunk of the stream in context stream_ctx (1-based) */
#define ACCEL_SQE_F_STREAM_FINAL (1u << 2) /* 1.3: the stream's last chunk */
#define ACCEL_SQE_F_VERIFY       (1u << 3) /* 1.2: compress-and-verify: the device decompresses the
                                              result and compares it with the input before completing;
                                              a mismatch completes with ACCEL_STATUS_VERIFY_FAILED */
#define ACCEL_SQE_F_STREAM_START (1u << 4) /* 1.3: the stream's first chunk: (re)open the context */
#define ACCEL_SQE_F_KNOWN_MASK   0x1Fu

/* ---------------------------------------------------------------------------
 * Key slots (ABI 1.1). A region may carry keyslot_count slots of
 * ACCEL_KEYSLOT_SIZE bytes at keyslot_offset. The driver writes a key into a
 * free slot, names it in accel_sqe.key_slot (1-based) and zeroes the slot when
 * the job completes. The device reads keys only from slots.
 * ------------------------------------------------------------------------- */
#define ACCEL_KEYSLOT_SIZE  256u
#define ACCEL_KEY_MAX       128u /* HMAC keys up to the SHA-512 block size; longer keys are pre-hashed (RFC 2104) */

typedef struct accel_key_slot {
    uint32_t length;                 /* key bytes in key[] */
    uint32_t flags;                  /* reserved, zero */
    uint8_t  key[ACCEL_KEY_MAX];
    uint8_t  reserved[ACCEL_KEYSLOT_SIZE - 8 - ACCEL_KEY_MAX];
} accel_key_slot;

/* ---------------------------------------------------------------------------
 * AEAD parameter block (ABI 1.1), at accel_sqe.aux_offset in the data pool:
 * this header, then aad_length bytes of additional authenticated data.
 * aux_length must be at least sizeof(accel_aead_params) + aad_length.
 * Encrypt: dst_capacity >= src_length + tag_length; output is ct || tag.
 * Decrypt: src is ct || tag (src_length >= tag_length); output is the
 * plaintext, written only if the tag verifies (else AUTH_FAILED, produced 0
 * and the output buffer is zeroed).
 * ------------------------------------------------------------------------- */
typedef struct accel_aead_params {
    uint8_t  nonce[12];
    uint32_t aad_length;
    uint32_t tag_length;             /* 16 */
    uint32_t reserved[3];            /* zero */
} accel_aead_params;

/* Streams (ABI 1.3): a device offers stream_ctx_count contexts per queue
 * (accel_region_header; 1.3 devices set it, ACCEL_STREAM_CTX_MAX at most). The
 * context's engine state is device-private (stream_ctx_offset stays 0). A
 * compress or decompress SQE with ACCEL_SQE_F_STREAM names its context in
 * stream_ctx; STREAM_START (re)opens it with the SQE's algorithm and level,
 * STREAM_FINAL marks the last input. A chunk may complete with MORE_OUTPUT: dst
 * filled before the chunk was done; `consumed` says how much input was taken and
 * the driver submits the rest (possibly none) with a fresh dst. Only one chunk
 * of a stream may be on the device at a time. A queue reset closes every
 * context; the next chunk of such a stream gets INVALID_DESCRIPTOR. Streams
 * cannot be chained. */
#define ACCEL_STREAM_CTX_MAX 64u

/* Chains (ABI 1.1): SQEs with ACCEL_SQE_F_CHAIN continue into the next SQE of
 * the same ring; the last one has the flag clear. At most ACCEL_CHAIN_MAX
 * entries. A follower's src_offset must equal its predecessor's dst_offset;
 * its input length is what the predecessor produced (src_length is the upper
 * bound). The device runs the steps back to back and posts one CQE, with the
 * last SQE's cookie, the last step's produced bytes and the summed engine time.
 * The first failing step ends the chain with its status. */
#define ACCEL_CHAIN_MAX 4u

/* ---------------------------------------------------------------------------
 * Completion status (accel_cqe.status) and error class (accel_cqe.error_class)
 * ------------------------------------------------------------------------- */
enum accel_status {
    ACCEL_STATUS_OK                 = 0,
    ACCEL_STATUS_INVALID_DESCRIPTOR = 1,  /* offsets/lengths/fields failed validation */
    ACCEL_STATUS_UNSUPPORTED        = 2,  /* opcode, algorithm or level not offered */
    ACCEL_STATUS_CORRUPT_INPUT      = 3,  /* malformed compressed stream, trailing data */
    ACCEL_STATUS_OUTPUT_OVERFLOW    = 4,  /* result does not fit dst_capacity */
    ACCEL_STATUS_CHECKSUM_MISMATCH  = 5,  /* gzip CRC / zlib Adler-32 trailer mismatch */
    ACCEL_STATUS_TRUNCATED_INPUT    = 6,  /* stream ended before its final block */
    ACCEL_STATUS_AUTH_FAILED        = 7,  /* AEAD tag mismatch; no plaintext released */
    ACCEL_STATUS_ENGINE_ERROR       = 8,  /* the engine library failed unexpectedly */
    ACCEL_STATUS_QUEUE_STOPPED      = 9,  /* queue is stopped or in error; job not run */
    ACCEL_STATUS_DEVICE_FAULT       = 10, /* device-side fault (e.g. injected) */
    ACCEL_STATUS_BAD_KEY            = 11, /* 1.1: key slot missing or key length wrong for the algorithm */
    ACCEL_STATUS_BAD_PARAMS         = 12, /* 1.1: AEAD parameter block or chain malformed */
    ACCEL_STATUS_VERIFY_FAILED      = 13, /* 1.2: compress-and-verify found the engine's output wrong */
    ACCEL_STATUS_MORE_OUTPUT        = 14, /* 1.3: stream chunk not finished: dst filled first (not an error) */
};

enum accel_error_class {
    ACCEL_ERRCLASS_NONE  = 0, /* status OK */
    ACCEL_ERRCLASS_JOB   = 1, /* the job's own fault: return it to its caller */
    ACCEL_ERRCLASS_QUEUE = 2, /* the queue's fault: counts toward isolation, job may be retried */
};

/* ---------------------------------------------------------------------------
 * Queue state flags (accel_region_header.state_flags), written by the device
 * ------------------------------------------------------------------------- */
#define ACCEL_QF_ERROR    (1u << 0) /* queue hit a queue-class error; needs reset */
#define ACCEL_QF_STOPPED  (1u << 1) /* queue accepts no new work */
#define ACCEL_QF_ISOLATED (1u << 2) /* device isolated the queue after repeated errors */

/* Queue errors and reset (ABI 1.2). When a job on a queue completes with a
 * queue-class status the device sets ACCEL_QF_ERROR. A queue in error (or
 * isolated) runs nothing more: the device completes every descriptor still in
 * its SQ with ACCEL_STATUS_QUEUE_STOPPED ("flushed, not run"). The driver stops
 * submitting, waits for its in-flight jobs to come back, then asks for a reset
 * by incrementing reset_request (and ringing the SQ doorbell). The device
 * performs the reset once no engine holds a job of the queue: it discards any
 * unfetched descriptors (sq_head = sq_tail), clears ACCEL_QF_ERROR and stores
 * reset_ack = reset_request. Only then may the driver reuse the queue's
 * buffers for new jobs. A driver that gave up on jobs itself (a lost
 * completion, a stalled engine, a malformed completion) asks for a reset the
 * same way; the device counts such a reset as a queue error.
 * Isolation is device-wide: after isolation_threshold queue errors within the
 * device's window every queue is marked ACCEL_QF_ISOLATED until the device
 * lifts it (after a cool-down, or by an operator). */

/* ---------------------------------------------------------------------------
 * Submission queue entry: 64 bytes
 * ------------------------------------------------------------------------- */
typedef struct accel_sqe {
    uint64_t cookie;        /*  0: opaque to the device, echoed in the CQE */
    uint8_t  opcode;        /*  8: enum accel_opcode */
    uint8_t  algorithm;     /*  9: enum accel_algorithm */
    uint8_t  level;         /* 10: compression level, 0..9 for the deflate family */
    uint8_t  flags;         /* 11: ACCEL_SQE_F_* */
    uint32_t key_slot;      /* 12: 1-based key slot index, 0 = none (1.1) */
    uint64_t src_offset;    /* 16: region offset of the input (must lie in the data pool) */
    uint64_t dst_offset;    /* 24: region offset of the output (must lie in the data pool) */
    uint32_t src_length;    /* 32: input bytes */
    uint32_t dst_capacity;  /* 36: output buffer bytes; the device never writes past it */
    uint64_t aux_offset;    /* 40: parameter block (accel_aead_params + AAD), 0 = none (1.1) */
    uint32_t aux_length;    /* 48 */
    uint32_t stream_ctx;    /* 52: reserved: 1-based stream context index, 0 = stateless */
    uint16_t src_region;    /* 56: 1.4: 0 = src_offset is in this region's data pool; n = in
                             *     the queue's attached external region n (a client's memory) */
    uint16_t dst_region;    /* 58: 1.4: the same for dst_offset */
    uint32_t reserved;      /* 60: must be zero */
} accel_sqe;

/** 1.4: largest external region id a queue accepts (ids are 1..MAX). */
#define ACCEL_EXT_REGION_MAX 4096u

/* ---------------------------------------------------------------------------
 * Completion queue entry: 32 bytes
 * ------------------------------------------------------------------------- */
typedef struct accel_cqe {
    uint64_t cookie;        /*  0: copied from the SQE */
    uint16_t status;        /*  8: enum accel_status */
    uint8_t  error_class;   /* 10: enum accel_error_class */
    uint8_t  flags;         /* 11: reserved, zero */
    uint32_t produced;      /* 12: bytes written at dst_offset */
    uint32_t consumed;      /* 16: input bytes consumed */
    uint16_t engine_id;     /* 20: engine that ran the job */
    uint16_t reserved;      /* 22 */
    uint64_t engine_ns;     /* 24: device time charged for the job, in nanoseconds */
} accel_cqe;

/* ---------------------------------------------------------------------------
 * Region header: 4096 bytes. Each ring index has a cache line to itself with
 * exactly one writer; the doorbell lines are written by the sleeper (the
 * need-wakeup flag) and by the waker (the futex word), as the protocol requires.
 * ------------------------------------------------------------------------- */
typedef struct accel_region_header {
    /* line 0: identity and geometry, written once by the device at creation */
    uint32_t magic;              /*   0: ACCEL_ABI_MAGIC */
    uint32_t abi_version;        /*   4: ACCEL_ABI_VERSION */
    uint32_t header_size;        /*   8: ACCEL_HEADER_SIZE */
    uint32_t queue_id;           /*  12: device-wide queue number */
    uint64_t region_size;        /*  16: total bytes of the region */
    uint64_t sq_offset;          /*  24 */
    uint64_t cq_offset;          /*  32 */
    uint64_t data_offset;        /*  40: start of the data pool */
    uint64_t data_size;          /*  48: bytes of the data pool */
    uint32_t sq_entries;         /*  56: power of two */
    uint32_t cq_entries;         /*  60: power of two, >= sq_entries */
    /* line 1: more geometry, reserved areas */
    uint32_t sqe_size;           /*  64: ACCEL_SQE_SIZE */
    uint32_t cqe_size;           /*  68: ACCEL_CQE_SIZE */
    uint64_t keyslot_offset;     /*  72: key slot table (1.1), 0 = none */
    uint32_t keyslot_count;      /*  80 */
    uint32_t keyslot_size;       /*  84 */
    uint64_t stream_ctx_offset;  /*  88: reserved: stream context area, 0 = none */
    uint32_t stream_ctx_count;   /*  96 */
    uint32_t stream_ctx_size;    /* 100 */
    uint32_t weight;             /* 104: arbitration weight given at allocation */
    uint32_t reserved1[5];       /* 108..127 */
    /* line 2: written by the driver */
    uint32_t sq_tail;            /* 128 */
    uint32_t pad2[15];
    /* line 3: written by the device */
    uint32_t sq_head;            /* 192 */
    uint32_t pad3[15];
    /* line 4: written by the device */
    uint32_t cq_tail;            /* 256 */
    uint32_t pad4[15];
    /* line 5: written by the driver */
    uint32_t cq_head;            /* 320 */
    uint32_t pad5[15];
    /* line 6: SQ doorbell. The device sets sq_need_wakeup before it parks on
       the futex word sq_doorbell; the driver bumps sq_doorbell and calls
       FUTEX_WAKE only when sq_need_wakeup is set. */
    uint32_t sq_doorbell;        /* 384: futex word */
    uint32_t sq_need_wakeup;     /* 388: "device sleeping" flag */
    uint32_t pad6[14];
    /* line 7: CQ doorbell, the mirror image for the driver's reaper */
    uint32_t cq_doorbell;        /* 448: futex word */
    uint32_t cq_need_wakeup;     /* 452: "reaper sleeping" flag */
    uint32_t pad7[14];
    /* line 8: queue state, written by the device */
    uint32_t state_flags;        /* 512: ACCEL_QF_* */
    uint32_t error_status;       /* 516: status that first put the queue in error */
    uint64_t error_count;        /* 520: queue-class errors since reset */
    uint64_t heartbeat;          /* 528: bumped by the device while it is alive */
    uint64_t completed;          /* 536: CQEs posted since creation */
    uint32_t reset_ack;          /* 544: 1.2: last reset_request the device carried out */
    uint32_t pad8[7];
    /* line 9: written by the driver */
    uint32_t reset_request;      /* 576: 1.2: incremented by the driver to ask for a queue reset */
    uint32_t pad9[15];
    uint8_t  reserved_tail[ACCEL_HEADER_SIZE - 640];
} accel_region_header;

#define ACCEL_STATIC_ASSERT(c, m) _Static_assert(c, m)
ACCEL_STATIC_ASSERT(ACCEL_ABI_VERSION == ((ACCEL_ABI_VERSION_MAJOR << 16) | ACCEL_ABI_VERSION_MINOR), "version");
ACCEL_STATIC_ASSERT(sizeof(accel_sqe) == ACCEL_SQE_SIZE, "SQE must be 64 bytes");
ACCEL_STATIC_ASSERT(sizeof(accel_cqe) == ACCEL_CQE_SIZE, "CQE must be 32 bytes");
ACCEL_STATIC_ASSERT(sizeof(accel_region_header) == ACCEL_HEADER_SIZE, "header must be 4 KiB");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, sq_tail) == 128, "sq_tail offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, sq_head) == 192, "sq_head offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, cq_tail) == 256, "cq_tail offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, cq_head) == 320, "cq_head offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, sq_doorbell) == 384, "sq_doorbell offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, cq_doorbell) == 448, "cq_doorbell offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, state_flags) == 512, "state offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, reset_ack) == 544, "reset_ack offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_region_header, reset_request) == 576, "reset_request offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_cqe, engine_ns) == 24, "cqe engine_ns offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_sqe, aux_offset) == 40, "sqe aux offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_sqe, src_region) == 56, "sqe src_region offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_sqe, dst_region) == 58, "sqe dst_region offset");
ACCEL_STATIC_ASSERT(__builtin_offsetof(accel_sqe, reserved) == 60, "sqe reserved offset");
ACCEL_STATIC_ASSERT(sizeof(accel_key_slot) == ACCEL_KEYSLOT_SIZE, "key slot size");
ACCEL_STATIC_ASSERT(sizeof(accel_aead_params) == 32, "AEAD params size");

/** Output capacity that always suffices for compressing n bytes with any
    engine: the deflate family with any wrapper, zstd (whose bound is
    n + n/256 + 64) and LZ4 frames (n + 4 bytes per 64 KiB block + 27). Stored blocks cost 5 bytes per 64 KiB;
    1/256 plus 1 KiB covers wrappers and block headers with a wide margin.
    A driver that reserves less may see ACCEL_STATUS_OUTPUT_OVERFLOW. */
static inline uint64_t accel_compress_bound(uint64_t n) { return n + (n >> 8) + 1024; }

/** Error class a status belongs to. Documented in docs/DEVICE_ABI.md. */
static inline uint8_t accel_status_error_class(uint16_t status) {
    switch (status) {
    case ACCEL_STATUS_OK:
    case ACCEL_STATUS_MORE_OUTPUT: return ACCEL_ERRCLASS_NONE;
    case ACCEL_STATUS_QUEUE_STOPPED:
    case ACCEL_STATUS_DEVICE_FAULT:
    case ACCEL_STATUS_VERIFY_FAILED:
    case ACCEL_STATUS_ENGINE_ERROR: return ACCEL_ERRCLASS_QUEUE;
    default: return ACCEL_ERRCLASS_JOB;
    }
}

#ifdef __cplusplus
}
#endif
#endif /* ACCEL_ABI_H */
