/*
 * A small C face over gRPC's C core server API (libgrpc, grpc/grpc.h) for the
 * AccelGate edge (docs/EDGE.md). It hides the op unions, slices and metadata
 * arrays behind plain functions Swift can call, and nothing more: no policy
 * lives here.
 *
 * Threads: accel_grpc_server_next blocks in grpc_completion_queue_next and is
 * called by the edge's completion-queue threads. Every other call on a call
 * object may be made from any thread (grpc_call_start_batch is thread-safe),
 * but each call object's send happens once.
 */
#ifndef ACCEL_GRPC_H
#define ACCEL_GRPC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct accel_grpc_server accel_grpc_server;
typedef struct accel_grpc_call accel_grpc_call;

/** Server settings; 0 (or -1 where noted) leaves the C core's default. */
typedef struct {
    /** Largest inbound message; larger ones end RESOURCE_EXHAUSTED. */
    int max_receive_message_length;
    int max_send_message_length;
    int max_concurrent_streams;
    int keepalive_time_ms;
    int keepalive_timeout_ms;
    int max_connection_idle_ms;
    int max_connection_age_ms;
    int max_connection_age_grace_ms;
    /** Largest HTTP/2 frame the server accepts (SETTINGS_MAX_FRAME_SIZE). */
    int http2_max_frame_size;
    /** Each stream's initial flow-control window (the core's lookahead; BDP probing may grow it). */
    int http2_stream_window_bytes;
} accel_grpc_server_options;

/** What a completion-queue event is about. */
typedef enum {
    ACCEL_GRPC_EVENT_NEW_CALL = 1, /* a requested call arrived (ok == 0: the server is shutting down) */
    ACCEL_GRPC_EVENT_CLOSED = 2,   /* the call ended on the wire; see accel_grpc_call_was_cancelled */
    ACCEL_GRPC_EVENT_SENT = 3,     /* the response batch finished */
    ACCEL_GRPC_EVENT_SHUTDOWN = 4, /* grpc_server_shutdown_and_notify completed */
    ACCEL_GRPC_EVENT_RECEIVED = 5, /* a stream's receive finished: accel_grpc_call_payload has the message, or NULL at its end */
    ACCEL_GRPC_EVENT_WROTE = 6,    /* a stream's write finished (ok == 0: the call has ended) */
} accel_grpc_event_kind;

/** Initialises the C core (once per process, balanced by the destroy). */
accel_grpc_server *accel_grpc_server_create(const accel_grpc_server_options *options);
/** Registers a method path ("/pkg.Service/Method"). A unary method's request
 *  is read with the call; a streaming method's (`streaming` non-zero) messages
 *  are read one by one with accel_grpc_call_receive. Before start only.
 *  Returns the method's index (>= 0), or -1. */
int accel_grpc_server_add_method(accel_grpc_server *server, const char *path, int streaming);
/** Listens on "host:port" or "unix:/path", without TLS; returns the bound port (0 for Unix sockets), or -1. */
int accel_grpc_server_add_insecure_port(accel_grpc_server *server, const char *address);
/** Listens with TLS: PEM key and certificate chain; with client_ca_pem, clients must present a certificate it signed. */
int accel_grpc_server_add_tls_port(accel_grpc_server *server, const char *address, const char *key_pem,
                                   const char *cert_chain_pem, const char *client_ca_pem);
void accel_grpc_server_start(accel_grpc_server *server);

/** Blocks for the next event. Returns 0 once the queue has been shut down
 *  (accel_grpc_server_destroy), else 1 with the event's kind, its call (NULL
 *  for SHUTDOWN) and whether it succeeded. */
int accel_grpc_server_next(accel_grpc_server *server, accel_grpc_event_kind *kind, accel_grpc_call **call, int *ok);

/** Asks for the next call of registered method `method`, or of any
 *  unregistered method when `method` is -1. `user` is kept on the call.
 *  Returns the call object (its NEW_CALL event comes later), or NULL. */
accel_grpc_call *accel_grpc_call_request(accel_grpc_server *server, int method, void *user);
/** Stops accepting calls; a SHUTDOWN event follows once every call has ended. */
void accel_grpc_server_shutdown(accel_grpc_server *server);
/** Ends every call still open with CANCELLED. */
void accel_grpc_server_cancel_all(accel_grpc_server *server);
/** Destroys the server and shuts its completion queue down (after SHUTDOWN):
 *  every accel_grpc_server_next then drains the queue and returns 0. */
void accel_grpc_server_close(accel_grpc_server *server);
/** Frees the queue and the server once no thread is in accel_grpc_server_next. */
void accel_grpc_server_free(accel_grpc_server *server);
/** Close, drain and free, for a server whose queue no thread polls (never started). */
void accel_grpc_server_destroy(accel_grpc_server *server);

void *accel_grpc_call_user(const accel_grpc_call *call);
void accel_grpc_call_set_user(accel_grpc_call *call, void *user);
int accel_grpc_call_method(const accel_grpc_call *call);
/** Starts watching for the call's end (a CLOSED event). Once per call, after NEW_CALL. */
int accel_grpc_call_begin(accel_grpc_call *call);
/** Starts reading the next message of a streaming call; a RECEIVED event
 *  follows. One receive at a time. Returns 0, or the grpc_call_error. */
int accel_grpc_call_receive(accel_grpc_call *call);
/** The current message as one contiguous buffer (valid until the call is
 *  freed; copied only if the core holds it in several slices); NULL when the
 *  call carried no message. */
const uint8_t *accel_grpc_call_payload(accel_grpc_call *call, size_t *length);
/** Bytes in place. */
typedef struct {
    const uint8_t *bytes;
    size_t length;
} accel_grpc_bytes;

/** The current message's slices, in order and in place (valid until the call
 *  is freed): writes up to `max` of them to `parts` and returns how many there
 *  are (call again with room for all when that is more than `max`); 0 when the
 *  call carried no message; -1 when the message can only be read whole
 *  (accel_grpc_call_payload: it is compressed). */
long accel_grpc_call_slices(const accel_grpc_call *call, accel_grpc_bytes *parts, size_t max);
/** Whether the call holds a message (after RECEIVED: 0 at the end of the client's stream). */
int accel_grpc_call_has_message(const accel_grpc_call *call);
/** The first value of request metadata `key` (lower case), or NULL. */
const char *accel_grpc_call_metadata(const accel_grpc_call *call, const char *key, size_t *length);
/** The method path of an unregistered call. */
const char *accel_grpc_call_path(const accel_grpc_call *call, size_t *length);
/** Nanoseconds left until the client's deadline; INT64_MAX when it set none. */
int64_t accel_grpc_call_deadline_remaining_ns(const accel_grpc_call *call);
/** After CLOSED: whether the client cancelled (or the deadline passed) before the status was sent. */
int accel_grpc_call_was_cancelled(const accel_grpc_call *call);

/** One metadata entry to send. */
typedef struct {
    const char *key;
    const char *value;
} accel_grpc_kv;

/** One piece of the response message. With `release` set the bytes are not
 *  copied: the core holds them until it is done and then calls
 *  release(context); without it they are copied now. */
typedef struct {
    const uint8_t *bytes;
    size_t length;
    void (*release)(void *context);
    void *context;
} accel_grpc_part;

/** Writes one message of a streaming response (with initial metadata
 *  `initial` before the first); a WROTE event follows. One write at a time.
 *  Returns 0, or the grpc_call_error. */
int accel_grpc_call_write(accel_grpc_call *call, const accel_grpc_kv *initial, size_t initial_count,
                          const accel_grpc_part *parts, size_t part_count);
/** Sends the whole answer in one batch: initial metadata (`initial`, unless a write sent it), the
 *  message made of `parts` when `message` is non-zero, and the status with
 *  `trailers`. A SENT event follows. Returns 0, or the grpc_call_error. */
int accel_grpc_call_respond(accel_grpc_call *call, const accel_grpc_kv *initial, size_t initial_count, int message,
                            const accel_grpc_part *parts, size_t part_count, int status, const char *status_message,
                            const accel_grpc_kv *trailers, size_t trailer_count);
/** Ends the call with CANCELLED at once (a client's cancellation seen elsewhere). */
void accel_grpc_call_cancel(accel_grpc_call *call);
/** Frees the call. Its owner counts the call's batches (the Swift `CoreCall`:
 *  CLOSED, SENT, and each RECEIVED and WROTE) and calls this after the last
 *  batch's event, or at once for a call that never reached it (NEW_CALL with
 *  ok == 0, or a CLOSED watch that could not start). A second count here once
 *  raced with the owner starting a batch (a double free the API fuzzer found). */
void accel_grpc_call_destroy(accel_grpc_call *call);

#ifdef __cplusplus
}
#endif
#endif
