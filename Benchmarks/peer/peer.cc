// accelgate-peer: an inline libgrpc++ sync server of accelgate.v1.Accelerator
// (issue 18's comparison baseline). Each job runs on the gRPC thread that
// received the call, through the same engine functions the AccelGate device
// runs (Sources/CAccelEngines), with one engine context per gRPC thread. No
// scheduler, no device queue, no authentication: the point is to measure what
// a plain gRPC server doing the same work inline reaches on this machine.
//
//   accelgate-peer --port 0            # prints "peer listening on 127.0.0.1:<port>"
//   accelgate-peer --port 50061 --no-work
//
// Served: Compress, Decompress, Encrypt, Decrypt, Digest (raw keys only; no
// chained jobs, no local-lane regions). Everything else is UNIMPLEMENTED.
// --no-work: every method answers at once with an empty response (the streaming
// ones answer each request message with an empty message; Submit echoes the id).

#include <grpcpp/grpcpp.h>

#include <openssl/rand.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>

#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "accelgate/v1/accelerator.grpc.pb.h"

// accel_abi.h is C11: its layout checks use _Static_assert, which C++ spells
// static_assert. The checks hold the same in C++.
#ifndef _Static_assert
#define _Static_assert static_assert
#define PEER_DEFINED_STATIC_ASSERT 1
#endif
extern "C" {
#include "accel_engines.h"
}
#ifdef PEER_DEFINED_STATIC_ASSERT
#undef _Static_assert
#endif

namespace v1 = accelgate::v1;
using grpc::ServerContext;
using grpc::Status;
using grpc::StatusCode;

namespace {

constexpr int kMaxMessageBytes = 64 << 20;
constexpr uint32_t kTagLength = 16;
constexpr uint32_t kNonceLength = 12;
// The gateway's default RequestLimits.maxDecompressedBytes (Sources/AccelRequests/RequestLimits.swift).
uint64_t g_max_decompressed_bytes = 4u << 20;

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// One engine context per gRPC thread, created on the thread's first job and
// destroyed when the thread ends (the sync server grows and shrinks its pool).
struct ThreadEngine {
  accel_engine_ctx *ctx = nullptr;
  uint8_t *scratch = nullptr;  // decompression output before it is copied into the response
  size_t scratch_size = 0;
  ~ThreadEngine() {
    accel_engine_destroy(ctx);
    free(scratch);
  }
};
thread_local ThreadEngine t_engine;

accel_engine_ctx *engine() {
  if (!t_engine.ctx) t_engine.ctx = accel_engine_create();
  return t_engine.ctx;
}

uint8_t *scratch(size_t n) {
  if (t_engine.scratch_size < n) {
    void *p = realloc(t_engine.scratch, n);
    if (!p) return nullptr;
    t_engine.scratch = static_cast<uint8_t *>(p);
    t_engine.scratch_size = n;
  }
  return t_engine.scratch;
}

const uint8_t *bytes(const std::string &s) { return reinterpret_cast<const uint8_t *>(s.data()); }
uint8_t *bytes(std::string *s) { return reinterpret_cast<uint8_t *>(&(*s)[0]); }

Status invalid(const std::string &m) { return Status(StatusCode::INVALID_ARGUMENT, m); }
Status unimplemented(const std::string &m) { return Status(StatusCode::UNIMPLEMENTED, m); }

// The gateway's mapping of device statuses (Sources/AccelService/StatusMapping.swift).
Status device_error(uint16_t status, const char *op, uint64_t output_limit) {
  std::string o(op);
  switch (status) {
  case ACCEL_STATUS_CORRUPT_INPUT: return invalid(o + ": corrupt input");
  case ACCEL_STATUS_TRUNCATED_INPUT: return invalid(o + ": truncated input");
  case ACCEL_STATUS_CHECKSUM_MISMATCH: return Status(StatusCode::DATA_LOSS, o + ": checksum mismatch");
  case ACCEL_STATUS_OUTPUT_OVERFLOW:
    return Status(StatusCode::RESOURCE_EXHAUSTED,
                  o + ": output exceeds the limit of " + std::to_string(output_limit) + " bytes");
  case ACCEL_STATUS_UNSUPPORTED: return invalid(o + ": unsupported by the device");
  case ACCEL_STATUS_AUTH_FAILED: return invalid("authentication failed");
  case ACCEL_STATUS_BAD_KEY: return invalid(o + ": key is not valid for the algorithm");
  case ACCEL_STATUS_BAD_PARAMS: return invalid(o + ": invalid parameters");
  default: return Status(StatusCode::INTERNAL, o + ": device error (status " + std::to_string(status) + ")");
  }
}

Status no_engine() { return Status(StatusCode::RESOURCE_EXHAUSTED, "out of memory for an engine context"); }

// CompressionFormat values equal the ABI's algorithm numbers; mapped one by one all the same.
bool format_algorithm(v1::CompressionFormat f, uint8_t *alg, Status *err) {
  switch (f) {
  case v1::COMPRESSION_FORMAT_DEFLATE: *alg = ACCEL_ALG_DEFLATE_RAW; return true;
  case v1::COMPRESSION_FORMAT_ZLIB: *alg = ACCEL_ALG_ZLIB; return true;
  case v1::COMPRESSION_FORMAT_GZIP: *alg = ACCEL_ALG_GZIP; return true;
  case v1::COMPRESSION_FORMAT_ZSTD: *alg = ACCEL_ALG_ZSTD; return true;
  case v1::COMPRESSION_FORMAT_LZ4: *alg = ACCEL_ALG_LZ4; return true;
  case v1::COMPRESSION_FORMAT_UNSPECIFIED:
    *err = invalid("format must be set (DEFLATE, ZLIB, GZIP, ZSTD or LZ4)");
    return false;
  default: *err = invalid("unknown compression format " + std::to_string((int)f)); return false;
  }
}

// JobTranslator.levels: zstd 1...19 (default 3), lz4 0...12 (default 0), deflate family 0...9 (default 6).
bool compression_level(uint8_t alg, bool has_level, int32_t requested, uint8_t *level, Status *err) {
  int32_t lo = 0, hi = 9, dflt = 6;
  if (alg == ACCEL_ALG_ZSTD) lo = 1, hi = 19, dflt = 3;
  if (alg == ACCEL_ALG_LZ4) lo = 0, hi = 12, dflt = 0;
  int32_t l = has_level ? requested : -1;
  if (l != -1 && (l < lo || l > hi)) {
    *err = invalid("level " + std::to_string(l) + " is outside " + std::to_string(lo) + "..." + std::to_string(hi) +
                   " (or -1 for the default)");
    return false;
  }
  *level = (uint8_t)(l == -1 ? dflt : l);
  return true;
}

bool cipher_algorithm(v1::CipherAlgorithm a, uint8_t *alg, Status *err) {
  switch (a) {
  case v1::CIPHER_ALGORITHM_AES_128_GCM: *alg = ACCEL_ALG_AES128_GCM; return true;
  case v1::CIPHER_ALGORITHM_AES_256_GCM: *alg = ACCEL_ALG_AES256_GCM; return true;
  case v1::CIPHER_ALGORITHM_CHACHA20_POLY1305: *alg = ACCEL_ALG_CHACHA20_POLY1305; return true;
  case v1::CIPHER_ALGORITHM_UNSPECIFIED: *err = invalid("algorithm must be set for a raw key"); return false;
  default: *err = invalid("unknown cipher algorithm " + std::to_string((int)a)); return false;
  }
}

// JobTranslator.digestAlgorithm: the proto's number is the device algorithm,
// accepted when the device knows it as a digest.
bool digest_algorithm(v1::DigestAlgorithm a, uint8_t *alg, Status *err) {
  int v = (int)a;
  if (v <= 0 || v > 255 || accel_digest_length((uint8_t)v) < 0) {
    *err = invalid("unknown or unset digest algorithm " + std::to_string(v));
    return false;
  }
  *alg = (uint8_t)v;
  return true;
}

// A raw key of the AEAD algorithm; named keys need the gateway's keyring.
bool aead_key(const v1::KeySpec &k, bool has_key, uint8_t alg, Status *err) {
  if (!has_key || k.source_case() == v1::KeySpec::SOURCE_NOT_SET) {
    *err = invalid("key is required (raw bytes or a key name)");
    return false;
  }
  if (k.source_case() == v1::KeySpec::kName) {
    *err = unimplemented("named keys are not served by the inline peer (raw keys only)");
    return false;
  }
  int need = accel_aead_key_length(alg);
  if ((int)k.raw().size() != need) {
    *err = invalid("key must be " + std::to_string(need) + " bytes, got " + std::to_string(k.raw().size()));
    return false;
  }
  return true;
}

void fill_stats(v1::JobStats *s, uint64_t started, uint64_t engine_ns, uint64_t in, uint64_t out, const char *name) {
  s->set_device_ns(engine_ns);
  s->set_total_ns(now_ns() - started);
  s->set_input_bytes(in);
  s->set_output_bytes(out);
  s->set_batch_size(1);
  s->set_engine(name);
}

void fill_aead_params(accel_aead_params *p, const std::string &nonce, const std::string &aad) {
  memset(p, 0, sizeof *p);
  memcpy(p->nonce, nonce.data(), kNonceLength);
  p->aad_length = (uint32_t)aad.size();
  p->tag_length = kTagLength;
}

/* The algorithm and raw key of an Encrypt or Decrypt request (named keys are the gateway's, not served here). */
template <typename Request> static bool raw_aead(const Request *req, uint8_t *alg, Status *err) {
    if (req->has_key() && req->key().source_case() == v1::KeySpec::kName) {
        *err = unimplemented("named keys are not served by the inline peer (raw keys only)");
        return false;
    }
    return cipher_algorithm(req->algorithm(), alg, err) && aead_key(req->key(), req->has_key(), *alg, err);
}

class Peer final : public v1::Accelerator::Service {
 public:
  explicit Peer(bool no_work) : no_work_(no_work) {}

  Status Compress(ServerContext *, const v1::CompressRequest *req, v1::CompressResponse *resp) override {
    if (no_work_) return Status::OK;
    uint64_t started = now_ns();
    if (req->has_input_region() || req->has_output_region()) return unimplemented("local-lane regions are not served by the inline peer");
    Status err;
    uint8_t alg, level;
    if (!format_algorithm(req->format(), &alg, &err)) return err;
    if (!compression_level(alg, req->has_level(), req->level(), &level, &err)) return err;
    accel_engine_ctx *ctx = engine();
    if (!ctx) return no_engine();
    const std::string &in = req->data();
    uint64_t cap = accel_compress_bound(in.size());
    if (cap > UINT32_MAX) return Status(StatusCode::RESOURCE_EXHAUSTED, "payload too large");
    std::string *out = resp->mutable_data();
    out->resize(cap);
    uint32_t produced = 0, consumed = 0;
    uint64_t t0 = now_ns();
    uint16_t st = accel_engine_compress(ctx, alg, level, bytes(in), (uint32_t)in.size(), bytes(out), (uint32_t)cap,
                                        &produced, &consumed);
    uint64_t t1 = now_ns();
    if (st != ACCEL_STATUS_OK) return device_error(st, "compress", cap);
    out->resize(produced);
    fill_stats(resp->mutable_stats(), started, t1 - t0, in.size(), produced,
               accel_engine_name(ACCEL_OP_COMPRESS, alg, level));
    return Status::OK;
  }

  Status Decompress(ServerContext *, const v1::DecompressRequest *req, v1::DecompressResponse *resp) override {
    if (no_work_) return Status::OK;
    uint64_t started = now_ns();
    if (req->has_input_region() || req->has_output_region()) return unimplemented("local-lane regions are not served by the inline peer");
    Status err;
    uint8_t alg;
    if (!format_algorithm(req->format(), &alg, &err)) return err;
    uint64_t limit = req->max_output_bytes() == 0 ? g_max_decompressed_bytes
                                                  : std::min<uint64_t>(req->max_output_bytes(), g_max_decompressed_bytes);
    accel_engine_ctx *ctx = engine();
    uint8_t *dst = scratch(limit ? limit : 1);
    if (!ctx || !dst) return no_engine();
    const std::string &in = req->data();
    uint32_t produced = 0, consumed = 0;
    uint64_t t0 = now_ns();
    uint16_t st = accel_engine_decompress(ctx, alg, bytes(in), (uint32_t)in.size(), dst, (uint32_t)limit, &produced,
                                          &consumed);
    uint64_t t1 = now_ns();
    if (st != ACCEL_STATUS_OK) return device_error(st, "decompress", limit);
    resp->set_data(dst, produced);
    fill_stats(resp->mutable_stats(), started, t1 - t0, in.size(), produced,
               accel_engine_name(ACCEL_OP_DECOMPRESS, alg, 0));
    return Status::OK;
  }

  Status Encrypt(ServerContext *, const v1::EncryptRequest *req, v1::EncryptResponse *resp) override {
    if (no_work_) return Status::OK;
    uint64_t started = now_ns();
    if (req->has_input_region() || req->has_output_region()) return unimplemented("local-lane regions are not served by the inline peer");
    if (req->has_compress()) return unimplemented("chained compress-and-encrypt is not served by the inline peer");
    Status err;
    uint8_t alg;
    if (!raw_aead(req, &alg, &err)) return err;
    std::string nonce = req->nonce();
    if (nonce.empty()) {
      nonce.resize(kNonceLength);
      if (RAND_bytes(bytes(&nonce), (int)kNonceLength) != 1) return Status(StatusCode::INTERNAL, "no randomness");
    } else if (nonce.size() != kNonceLength) {
      return invalid("nonce must be 12 bytes, got " + std::to_string(nonce.size()));
    }
    accel_engine_ctx *ctx = engine();
    if (!ctx) return no_engine();
    accel_aead_params params;
    fill_aead_params(&params, nonce, req->aad());
    const std::string &in = req->plaintext();
    const std::string &key = req->key().raw();
    uint64_t cap = (uint64_t)in.size() + kTagLength;
    std::string *out = resp->mutable_ciphertext();
    out->resize(cap);
    uint32_t produced = 0;
    uint64_t t0 = now_ns();
    uint16_t st = accel_engine_aead(ctx, 1, alg, bytes(key), (uint32_t)key.size(), &params, bytes(req->aad()),
                                    bytes(in), (uint32_t)in.size(), bytes(out), (uint32_t)cap, &produced);
    uint64_t t1 = now_ns();
    if (st != ACCEL_STATUS_OK) return device_error(st, "encrypt", cap);
    out->resize(produced);
    resp->set_nonce(nonce);
    fill_stats(resp->mutable_stats(), started, t1 - t0, in.size(), produced,
               accel_engine_name(ACCEL_OP_ENCRYPT, alg, 0));
    return Status::OK;
  }

  Status Decrypt(ServerContext *, const v1::DecryptRequest *req, v1::DecryptResponse *resp) override {
    if (no_work_) return Status::OK;
    uint64_t started = now_ns();
    if (req->has_input_region() || req->has_output_region()) return unimplemented("local-lane regions are not served by the inline peer");
    if (req->has_decompress()) return unimplemented("chained decrypt-and-decompress is not served by the inline peer");
    Status err;
    uint8_t alg;
    if (!raw_aead(req, &alg, &err)) return err;
    if (req->nonce().size() != kNonceLength)
      return invalid("nonce must be 12 bytes, got " + std::to_string(req->nonce().size()));
    const std::string &in = req->ciphertext();
    if (in.size() < kTagLength) return invalid("ciphertext is shorter than the 16-byte tag");
    uint64_t plain = in.size() - kTagLength;
    uint64_t limit = req->max_output_bytes() == 0 ? g_max_decompressed_bytes
                                                  : std::min<uint64_t>(req->max_output_bytes(), g_max_decompressed_bytes);
    if (plain > limit)
      return Status(StatusCode::RESOURCE_EXHAUSTED,
                    "payload of " + std::to_string(plain) + " bytes exceeds the limit of " + std::to_string(limit));
    accel_engine_ctx *ctx = engine();
    if (!ctx) return no_engine();
    accel_aead_params params;
    fill_aead_params(&params, req->nonce(), req->aad());
    const std::string &key = req->key().raw();
    std::string *out = resp->mutable_plaintext();
    out->resize(plain);
    uint32_t produced = 0;
    uint64_t t0 = now_ns();
    uint16_t st = accel_engine_aead(ctx, 0, alg, bytes(key), (uint32_t)key.size(), &params, bytes(req->aad()),
                                    bytes(in), (uint32_t)in.size(), bytes(out), (uint32_t)plain, &produced);
    uint64_t t1 = now_ns();
    if (st != ACCEL_STATUS_OK) {
      out->clear();
      return device_error(st, "decrypt", plain);
    }
    out->resize(produced);
    fill_stats(resp->mutable_stats(), started, t1 - t0, in.size(), produced,
               accel_engine_name(ACCEL_OP_DECRYPT, alg, 0));
    return Status::OK;
  }

  Status Digest(ServerContext *, const v1::DigestRequest *req, v1::DigestResponse *resp) override {
    if (no_work_) return Status::OK;
    uint64_t started = now_ns();
    if (req->has_input_region()) return unimplemented("local-lane regions are not served by the inline peer");
    Status err;
    uint8_t alg;
    if (!digest_algorithm(req->algorithm(), &alg, &err)) return err;
    bool keyed = alg == ACCEL_ALG_HMAC_SHA256 || alg == ACCEL_ALG_HMAC_SHA512;
    bool has_key = req->has_key() && req->key().source_case() != v1::KeySpec::SOURCE_NOT_SET;
    const uint8_t *key = nullptr;
    uint32_t key_len = 0;
    if (keyed) {
      if (!has_key) return invalid("HMAC needs a key");
      if (req->key().source_case() == v1::KeySpec::kName)
        return unimplemented("named keys are not served by the inline peer (raw keys only)");
      if (req->key().raw().empty()) return invalid("key is empty");
      // Longer keys than the hash's block are hashed first (RFC 2104); EVP_MAC does that itself.
      key = bytes(req->key().raw());
      key_len = (uint32_t)req->key().raw().size();
    } else if (has_key) {
      return invalid("the algorithm takes no key");
    }
    accel_engine_ctx *ctx = engine();
    if (!ctx) return no_engine();
    const std::string &in = req->data();
    uint32_t cap = (uint32_t)accel_digest_length(alg);
    std::string *out = resp->mutable_digest();
    out->resize(cap);
    uint32_t produced = 0;
    uint64_t t0 = now_ns();
    uint16_t st = accel_engine_digest(ctx, alg, key, key_len, bytes(in), (uint32_t)in.size(), bytes(out), cap, &produced);
    uint64_t t1 = now_ns();
    if (st != ACCEL_STATUS_OK) return device_error(st, "digest", cap);
    out->resize(produced);
    if (produced == 4) {
      const uint8_t *d = bytes(*out);
      resp->set_checksum((uint32_t)d[0] << 24 | (uint32_t)d[1] << 16 | (uint32_t)d[2] << 8 | d[3]);
    }
    fill_stats(resp->mutable_stats(), started, t1 - t0, in.size(), produced, accel_engine_name(ACCEL_OP_DIGEST, alg, 0));
    return Status::OK;
  }

  // Not served with work (the base class answers UNIMPLEMENTED); --no-work answers them empty.
  Status DescribeDevice(ServerContext *c, const v1::DescribeDeviceRequest *req, v1::DescribeDeviceResponse *resp) override {
    if (no_work_) return Status::OK;
    return v1::Accelerator::Service::DescribeDevice(c, req, resp);
  }

  Status Submit(ServerContext *c, grpc::ServerReaderWriter<v1::SubmitResponse, v1::SubmitRequest> *s) override {
    if (!no_work_) return v1::Accelerator::Service::Submit(c, s);
    v1::SubmitRequest in;
    while (s->Read(&in)) {
      v1::SubmitResponse out;
      out.set_id(in.id());  // a Submit client matches results by id
      if (!s->Write(out)) break;
    }
    return Status::OK;
  }

  Status CompressStream(ServerContext *c,
                        grpc::ServerReaderWriter<v1::CompressStreamResponse, v1::CompressStreamRequest> *s) override {
    if (!no_work_) return v1::Accelerator::Service::CompressStream(c, s);
    return empty_replies(s);
  }

  Status DecompressStream(ServerContext *c,
                          grpc::ServerReaderWriter<v1::DecompressStreamResponse, v1::DecompressStreamRequest> *s) override {
    if (!no_work_) return v1::Accelerator::Service::DecompressStream(c, s);
    return empty_replies(s);
  }

 private:
  template <class Resp, class Req>
  static Status empty_replies(grpc::ServerReaderWriter<Resp, Req> *s) {
    Req in;
    Resp out;
    while (s->Read(&in))
      if (!s->Write(out)) break;
    return Status::OK;
  }

  bool no_work_;
};

void usage(FILE *f) {
  fprintf(f,
          "usage: accelgate-peer [--port N] [--no-work] [--max-decompressed-bytes N]\n"
          "  --port N                    listen on 127.0.0.1:N (0, the default: a free port)\n"
          "  --no-work                   answer every call at once with an empty response\n"
          "  --max-decompressed-bytes N  Decompress/Decrypt output cap (default 4194304, as the gateway)\n");
}

bool parse_u64(const char *s, uint64_t *v) {
  if (!s || !*s) return false;
  char *end = nullptr;
  errno = 0;
  unsigned long long x = strtoull(s, &end, 10);
  if (errno || *end || s[0] == '-') return false;
  *v = x;
  return true;
}

}  // namespace

int main(int argc, char **argv) {
  uint64_t port = 0;
  bool no_work = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--port" && i + 1 < argc) {
      if (!parse_u64(argv[++i], &port) || port > 65535) { fprintf(stderr, "accelgate-peer: bad --port\n"); return 2; }
    } else if (a == "--no-work") {
      no_work = true;
    } else if (a == "--max-decompressed-bytes" && i + 1 < argc) {
      if (!parse_u64(argv[++i], &g_max_decompressed_bytes) || g_max_decompressed_bytes > UINT32_MAX) {
        fprintf(stderr, "accelgate-peer: bad --max-decompressed-bytes\n");
        return 2;
      }
    } else if (a == "-h" || a == "--help") {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "accelgate-peer: unknown argument '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }

  // SIGINT and SIGTERM are blocked in every thread (gRPC's threads inherit the
  // mask) and taken by sigwait below, so Shutdown runs on an ordinary thread.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  Peer service(no_work);
  grpc::ServerBuilder builder;
  int selected = 0;
  builder.AddListeningPort("127.0.0.1:" + std::to_string(port), grpc::InsecureServerCredentials(), &selected);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || selected == 0) {
    fprintf(stderr, "accelgate-peer: cannot listen on 127.0.0.1:%llu\n", (unsigned long long)port);
    return 1;
  }
  printf("peer listening on 127.0.0.1:%d\n", selected);
  fflush(stdout);

  int sig = 0;
  while (sigwait(&stop, &sig) != 0) {
  }
  // Calls still running get a moment to finish, then are cancelled.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  return 0;
}
