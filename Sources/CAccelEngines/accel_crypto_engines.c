/*
 * Crypto engines for the emulated device (ABI 1.1): AEAD through OpenSSL 3 EVP,
 * digests and HMAC through EVP/EVP_MAC, checksums through ISA-L and zlib. All
 * work on raw pointers into the queue's data pool.
 */
#include "accel_engines.h"

#include <isa-l/crc.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <string.h>
#include <zlib.h>

struct accel_crypto_state {
    EVP_CIPHER_CTX *cipher;
    EVP_MD_CTX *md;
    EVP_MAC *hmac;
    EVP_MAC_CTX *mac;
};

static struct accel_crypto_state *state(accel_engine_ctx *ctx);

int accel_aead_key_length(uint8_t algorithm) {
    switch (algorithm) {
    case ACCEL_ALG_AES128_GCM: return 16;
    case ACCEL_ALG_AES256_GCM: return 32;
    case ACCEL_ALG_CHACHA20_POLY1305: return 32;
    default: return -1;
    }
}

int accel_digest_length(uint8_t algorithm) {
    switch (algorithm) {
    case ACCEL_ALG_SHA256: case ACCEL_ALG_HMAC_SHA256: return 32;
    case ACCEL_ALG_SHA384: return 48;
    case ACCEL_ALG_SHA512: case ACCEL_ALG_HMAC_SHA512: return 64;
    case ACCEL_ALG_CRC32C: case ACCEL_ALG_CRC32: case ACCEL_ALG_ADLER32: return 4;
    default: return -1;
    }
}

static const EVP_CIPHER *cipher_for(uint8_t algorithm) {
    switch (algorithm) {
    case ACCEL_ALG_AES128_GCM: return EVP_aes_128_gcm();
    case ACCEL_ALG_AES256_GCM: return EVP_aes_256_gcm();
    case ACCEL_ALG_CHACHA20_POLY1305: return EVP_chacha20_poly1305();
    default: return NULL;
    }
}

uint16_t accel_engine_aead(accel_engine_ctx *ctx, int encrypt, uint8_t algorithm,
                           const uint8_t *key, uint32_t key_len,
                           const accel_aead_params *params, const uint8_t *aad,
                           const uint8_t *src, uint32_t src_len,
                           uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    *produced = 0;
    const EVP_CIPHER *cipher = cipher_for(algorithm);
    if (!cipher) return ACCEL_STATUS_UNSUPPORTED;
    if ((int)key_len != accel_aead_key_length(algorithm)) return ACCEL_STATUS_BAD_KEY;
    uint32_t tag_len = params->tag_length;
    if (tag_len != 16 || params->reserved[0] || params->reserved[1] || params->reserved[2]) return ACCEL_STATUS_BAD_PARAMS;
    uint32_t body = encrypt ? src_len : src_len - tag_len;
    if (!encrypt && src_len < tag_len) return ACCEL_STATUS_CORRUPT_INPUT;
    if ((uint64_t)body + (encrypt ? tag_len : 0) > dst_cap) return ACCEL_STATUS_OUTPUT_OVERFLOW;
    if (body > INT32_MAX || params->aad_length > INT32_MAX) return ACCEL_STATUS_UNSUPPORTED;

    struct accel_crypto_state *st = state(ctx);
    if (!st) return ACCEL_STATUS_ENGINE_ERROR;
    EVP_CIPHER_CTX *c = st->cipher;
    int n = 0;
    uint16_t status = ACCEL_STATUS_ENGINE_ERROR;
    if (EVP_CipherInit_ex(c, cipher, NULL, NULL, NULL, encrypt) != 1) goto out;
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1) goto out;
    if (EVP_CipherInit_ex(c, NULL, NULL, key, params->nonce, encrypt) != 1) goto out;
    if (params->aad_length && EVP_CipherUpdate(c, NULL, &n, aad, (int)params->aad_length) != 1) goto out;
    if (EVP_CipherUpdate(c, dst, &n, src, (int)body) != 1) goto out;
    uint32_t written = (uint32_t)n;
    if (encrypt) {
        if (EVP_CipherFinal_ex(c, dst + written, &n) != 1) goto out;
        written += (uint32_t)n;
        if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, (int)tag_len, dst + written) != 1) goto out;
        *produced = written + tag_len;
        status = ACCEL_STATUS_OK;
    } else {
        if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, (int)tag_len, (void *)(src + body)) != 1) goto out;
        if (EVP_CipherFinal_ex(c, dst + written, &n) != 1) {
            /* Tag mismatch: release no plaintext. */
            OPENSSL_cleanse(dst, body);
            status = ACCEL_STATUS_AUTH_FAILED;
            goto out;
        }
        *produced = written + (uint32_t)n;
        status = ACCEL_STATUS_OK;
    }
out:
    EVP_CIPHER_CTX_reset(c); /* drops the expanded key schedule */
    return status;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

uint16_t accel_engine_digest(accel_engine_ctx *ctx, uint8_t algorithm,
                             const uint8_t *key, uint32_t key_len,
                             const uint8_t *src, uint32_t src_len,
                             uint8_t *dst, uint32_t dst_cap, uint32_t *produced) {
    *produced = 0;
    int need = accel_digest_length(algorithm);
    if (need < 0) return ACCEL_STATUS_UNSUPPORTED;
    if ((uint32_t)need > dst_cap) return ACCEL_STATUS_OUTPUT_OVERFLOW;
    int keyed = algorithm == ACCEL_ALG_HMAC_SHA256 || algorithm == ACCEL_ALG_HMAC_SHA512;
    if (keyed ? key_len == 0 : key_len != 0) return ACCEL_STATUS_BAD_KEY;
    switch (algorithm) {
    case ACCEL_ALG_CRC32C: {
        /* ISA-L's iSCSI CRC is CRC-32C without the final inversion. */
        uint32_t crc = 0xFFFFFFFFu;
        const uint8_t *p = src;
        uint32_t left = src_len;
        while (left) {
            int chunk = left > (1u << 30) ? (1 << 30) : (int)left;
            crc = crc32_iscsi((unsigned char *)p, chunk, crc);
            p += chunk; left -= (uint32_t)chunk;
        }
        put_be32(dst, crc ^ 0xFFFFFFFFu);
        break;
    }
    case ACCEL_ALG_CRC32:
        put_be32(dst, crc32_gzip_refl(0, src, src_len));
        break;
    case ACCEL_ALG_ADLER32:
        put_be32(dst, (uint32_t)adler32_z(1, src, src_len));
        break;
    default: {
        struct accel_crypto_state *st = state(ctx);
        if (!st) return ACCEL_STATUS_ENGINE_ERROR;
        const char *md = (algorithm == ACCEL_ALG_SHA384) ? "SHA384"
                       : (algorithm == ACCEL_ALG_SHA512 || algorithm == ACCEL_ALG_HMAC_SHA512) ? "SHA512" : "SHA256";
        if (keyed) {
            OSSL_PARAM params[2] = { OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)md, 0),
                                     OSSL_PARAM_construct_end() };
            size_t out = 0;
            if (EVP_MAC_init(st->mac, key, key_len, params) != 1 || EVP_MAC_update(st->mac, src, src_len) != 1 ||
                EVP_MAC_final(st->mac, dst, &out, dst_cap) != 1 || out != (size_t)need)
                return ACCEL_STATUS_ENGINE_ERROR;
        } else {
            const EVP_MD *type = algorithm == ACCEL_ALG_SHA384 ? EVP_sha384()
                               : algorithm == ACCEL_ALG_SHA512 ? EVP_sha512() : EVP_sha256();
            unsigned int out = 0;
            if (EVP_DigestInit_ex(st->md, type, NULL) != 1 || EVP_DigestUpdate(st->md, src, src_len) != 1 ||
                EVP_DigestFinal_ex(st->md, dst, &out) != 1 || out != (unsigned int)need)
                return ACCEL_STATUS_ENGINE_ERROR;
        }
    }
    }
    *produced = (uint32_t)need;
    return ACCEL_STATUS_OK;
}

/* ---- per-engine state ---------------------------------------------------- */

struct accel_crypto_state *accel_crypto_state_create(void) {
    struct accel_crypto_state *st = OPENSSL_zalloc(sizeof(*st));
    if (!st) return NULL;
    st->cipher = EVP_CIPHER_CTX_new();
    st->md = EVP_MD_CTX_new();
    st->hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    st->mac = st->hmac ? EVP_MAC_CTX_new(st->hmac) : NULL;
    if (!st->cipher || !st->md || !st->mac) { accel_crypto_state_destroy(st); return NULL; }
    return st;
}

void accel_crypto_state_destroy(struct accel_crypto_state *st) {
    if (!st) return;
    EVP_CIPHER_CTX_free(st->cipher);
    EVP_MD_CTX_free(st->md);
    EVP_MAC_CTX_free(st->mac);
    EVP_MAC_free(st->hmac);
    OPENSSL_free(st);
}

static struct accel_crypto_state *state(accel_engine_ctx *ctx) { return accel_engine_crypto_state(ctx); }
