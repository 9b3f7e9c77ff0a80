#include "accel_crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

int accel_sha256(const void *data, size_t len, uint8_t out[32]) {
    unsigned int n = 0;
    return EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) == 1 && n == 32;
}

int accel_sha512(const void *data, size_t len, uint8_t out[64]) {
    unsigned int n = 0;
    return EVP_Digest(data, len, out, &n, EVP_sha512(), NULL) == 1 && n == 64;
}

int accel_random_bytes(uint8_t *buf, size_t len) { return RAND_bytes(buf, (int)len) == 1; }

void accel_secure_zero(void *p, size_t len) { OPENSSL_cleanse(p, len); }
