/*
 * accel_crypto.h — OpenSSL 3 primitives the gateway needs outside the device
 * (API-key hashing, secure zeroing). The device's crypto engines build on the
 * same library.
 */
#ifndef ACCEL_CRYPTO_H
#define ACCEL_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

/** SHA-256 of len bytes at data into out[32]. Returns 1 on success, 0 on failure. */
int accel_sha256(const void *data, size_t len, uint8_t out[32]);

/** SHA-512 of len bytes at data into out[64]. Returns 1 on success, 0 on failure. */
int accel_sha512(const void *data, size_t len, uint8_t out[64]);

/** Fills buf with len cryptographically secure random bytes. Returns 1 on success. */
int accel_random_bytes(uint8_t *buf, size_t len);

/** Zeroes memory in a way the compiler may not elide. */
void accel_secure_zero(void *p, size_t len);

#endif
