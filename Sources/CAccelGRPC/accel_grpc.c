/* See include/accel_grpc.h. */
#include "accel_grpc.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdlib.h>
#include <string.h>

#define ACCEL_GRPC_MAX_METHODS 64
#define ACCEL_GRPC_MAX_SENT_MD 8

/* A completion-queue tag: which call, and what finished. */
typedef struct {
    accel_grpc_call *call;
    accel_grpc_event_kind kind;
} accel_grpc_tag;

struct accel_grpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    void *methods[ACCEL_GRPC_MAX_METHODS];
    int streaming[ACCEL_GRPC_MAX_METHODS];
    int method_count;
    accel_grpc_tag shutdown_tag;
};

struct accel_grpc_call {
    accel_grpc_server *server;
    void *user;
    int method;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    grpc_byte_buffer *request;
    grpc_slice request_bytes;
    int request_read;
    int cancelled;
    accel_grpc_tag new_tag, closed_tag, sent_tag, received_tag, wrote_tag;
    /* Kept until the call is freed: what the response batch points at. */
    grpc_metadata initial[ACCEL_GRPC_MAX_SENT_MD];
    size_t initial_count;
    int initial_sent;
    grpc_byte_buffer *written; /* the last streamed message, freed at the next write */
    grpc_metadata trailers[ACCEL_GRPC_MAX_SENT_MD];
    size_t trailer_count;
    grpc_byte_buffer *response;
    grpc_slice status_details;
    int has_status_details;
};

static void add_int_arg(grpc_arg *args, size_t *n, const char *key, int value) {
    args[*n].type = GRPC_ARG_INTEGER;
    args[*n].key = (char *)key;
    args[*n].value.integer = value;
    *n += 1;
}

accel_grpc_server *accel_grpc_server_create(const accel_grpc_server_options *o) {
    grpc_init();
    accel_grpc_server *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    grpc_arg args[16];
    size_t n = 0;
    /* Two servers on one port would split its calls silently: refuse instead. */
    add_int_arg(args, &n, GRPC_ARG_ALLOW_REUSEPORT, 0);
    if (o->max_receive_message_length > 0)
        add_int_arg(args, &n, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, o->max_receive_message_length);
    if (o->max_send_message_length > 0)
        add_int_arg(args, &n, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, o->max_send_message_length);
    if (o->max_concurrent_streams > 0)
        add_int_arg(args, &n, GRPC_ARG_MAX_CONCURRENT_STREAMS, o->max_concurrent_streams);
    if (o->keepalive_time_ms > 0) add_int_arg(args, &n, GRPC_ARG_KEEPALIVE_TIME_MS, o->keepalive_time_ms);
    if (o->keepalive_timeout_ms > 0) add_int_arg(args, &n, GRPC_ARG_KEEPALIVE_TIMEOUT_MS, o->keepalive_timeout_ms);
    if (o->max_connection_idle_ms > 0)
        add_int_arg(args, &n, GRPC_ARG_MAX_CONNECTION_IDLE_MS, o->max_connection_idle_ms);
    if (o->max_connection_age_ms > 0) add_int_arg(args, &n, GRPC_ARG_MAX_CONNECTION_AGE_MS, o->max_connection_age_ms);
    if (o->max_connection_age_grace_ms > 0)
        add_int_arg(args, &n, GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, o->max_connection_age_grace_ms);
    if (o->http2_max_frame_size > 0) add_int_arg(args, &n, GRPC_ARG_HTTP2_MAX_FRAME_SIZE, o->http2_max_frame_size);
    if (o->http2_stream_window_bytes > 0)
        add_int_arg(args, &n, GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, o->http2_stream_window_bytes);
    grpc_channel_args channel_args = {n, args};
    s->server = grpc_server_create(&channel_args, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    s->shutdown_tag.kind = ACCEL_GRPC_EVENT_SHUTDOWN;
    return s;
}

int accel_grpc_server_add_method(accel_grpc_server *s, const char *path, int streaming) {
    if (s->method_count >= ACCEL_GRPC_MAX_METHODS) return -1;
    void *m = grpc_server_register_method(s->server, path, NULL,
                                          streaming ? GRPC_SRM_PAYLOAD_NONE : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (m == NULL) return -1;
    s->methods[s->method_count] = m;
    s->streaming[s->method_count] = streaming != 0;
    return s->method_count++;
}

static int add_port(accel_grpc_server *s, const char *address, grpc_server_credentials *creds) {
    if (creds == NULL) return -1;
    int port = grpc_server_add_http2_port(s->server, address, creds);
    grpc_server_credentials_release(creds);
    int unix_socket = strncmp(address, "unix:", 5) == 0 || strncmp(address, "unix-abstract:", 14) == 0;
    if (port == 0) return -1;
    return unix_socket ? 0 : port; /* the core answers 1 for a Unix socket */
}

int accel_grpc_server_add_insecure_port(accel_grpc_server *s, const char *address) {
    return add_port(s, address, grpc_insecure_server_credentials_create());
}

int accel_grpc_server_add_tls_port(accel_grpc_server *s, const char *address, const char *key_pem,
                                   const char *cert_chain_pem, const char *client_ca_pem) {
    grpc_ssl_pem_key_cert_pair pair = {key_pem, cert_chain_pem};
    grpc_ssl_client_certificate_request_type request =
        client_ca_pem != NULL ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    return add_port(s, address, grpc_ssl_server_credentials_create_ex(client_ca_pem, &pair, 1, request, NULL));
}

void accel_grpc_server_start(accel_grpc_server *s) { grpc_server_start(s->server); }

int accel_grpc_server_next(accel_grpc_server *s, accel_grpc_event_kind *kind, accel_grpc_call **call, int *ok) {
    grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) return 0;
    accel_grpc_tag *tag = ev.tag;
    *kind = tag->kind;
    *call = tag->call;
    *ok = ev.success;
    /* An unregistered call's deadline arrives in its details. */
    if (tag->kind == ACCEL_GRPC_EVENT_NEW_CALL && ev.success && tag->call->method < 0)
        tag->call->deadline = tag->call->details.deadline;
    return 1;
}

accel_grpc_call *accel_grpc_call_request(accel_grpc_server *s, int method, void *user) {
    if (method >= s->method_count) return NULL;
    accel_grpc_call *c = calloc(1, sizeof(*c));
    if (c == NULL) return NULL;
    c->server = s;
    c->user = user;
    c->method = method;
    c->new_tag = (accel_grpc_tag){c, ACCEL_GRPC_EVENT_NEW_CALL};
    c->closed_tag = (accel_grpc_tag){c, ACCEL_GRPC_EVENT_CLOSED};
    c->sent_tag = (accel_grpc_tag){c, ACCEL_GRPC_EVENT_SENT};
    c->received_tag = (accel_grpc_tag){c, ACCEL_GRPC_EVENT_RECEIVED};
    c->wrote_tag = (accel_grpc_tag){c, ACCEL_GRPC_EVENT_WROTE};
    grpc_metadata_array_init(&c->request_metadata);
    grpc_call_details_init(&c->details);
    grpc_call_error e;
    if (method >= 0) {
        e = grpc_server_request_registered_call(s->server, s->methods[method], &c->call, &c->deadline,
                                                &c->request_metadata, s->streaming[method] ? NULL : &c->request,
                                                s->cq, s->cq, &c->new_tag);
    } else {
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->request_metadata, s->cq, s->cq,
                                     &c->new_tag);
    }
    if (e != GRPC_CALL_OK) {
        grpc_metadata_array_destroy(&c->request_metadata);
        grpc_call_details_destroy(&c->details);
        free(c);
        return NULL;
    }
    return c;
}

void accel_grpc_server_shutdown(accel_grpc_server *s) {
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
}

void accel_grpc_server_cancel_all(accel_grpc_server *s) { grpc_server_cancel_all_calls(s->server); }

void accel_grpc_server_close(accel_grpc_server *s) {
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
}

void accel_grpc_server_free(accel_grpc_server *s) {
    grpc_completion_queue_destroy(s->cq);
    free(s);
    grpc_shutdown();
}

void accel_grpc_server_destroy(accel_grpc_server *s) {
    accel_grpc_server_close(s);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    accel_grpc_server_free(s);
}

void *accel_grpc_call_user(const accel_grpc_call *c) { return c->user; }
void accel_grpc_call_set_user(accel_grpc_call *c, void *user) { c->user = user; }
int accel_grpc_call_method(const accel_grpc_call *c) { return c->method; }

/* Starts a batch; its owner (the Swift `CoreCall`) counts it and frees the call after the last event. */
static int start(accel_grpc_call *c, const grpc_op *ops, size_t n, accel_grpc_tag *tag) {
    return (int)grpc_call_start_batch(c->call, ops, n, tag, NULL);
}

int accel_grpc_call_begin(accel_grpc_call *c) {
    /* The CLOSED event tells the owner the call has ended on the wire (and whether it was cancelled). */
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    return start(c, &op, 1, &c->closed_tag);
}

/* Frees the current message and what was read of it. */
static void drop_message(accel_grpc_call *c) {
    if (c->request_read) grpc_slice_unref(c->request_bytes);
    if (c->request != NULL) grpc_byte_buffer_destroy(c->request);
    c->request_read = 0;
    c->request = NULL;
}

int accel_grpc_call_receive(accel_grpc_call *c) {
    drop_message(c);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->request;
    return start(c, &op, 1, &c->received_tag);
}

const uint8_t *accel_grpc_call_payload(accel_grpc_call *c, size_t *length) {
    *length = 0;
    if (c->request == NULL) return NULL;
    if (!c->request_read) {
        grpc_byte_buffer_reader reader;
        if (!grpc_byte_buffer_reader_init(&reader, c->request)) return NULL;
        c->request_bytes = grpc_byte_buffer_reader_readall(&reader);
        grpc_byte_buffer_reader_destroy(&reader);
        c->request_read = 1;
    }
    *length = GRPC_SLICE_LENGTH(c->request_bytes);
    return GRPC_SLICE_START_PTR(c->request_bytes);
}

long accel_grpc_call_slices(const accel_grpc_call *c, accel_grpc_bytes *parts, size_t max) {
    if (c->request == NULL) return 0;
    /* A compressed message (grpc-encoding) is only readable through the reader, which inflates it. */
    if (c->request->type != GRPC_BB_RAW || c->request->data.raw.compression != GRPC_COMPRESS_NONE) return -1;
    const grpc_slice_buffer *b = &c->request->data.raw.slice_buffer;
    for (size_t i = 0; i < b->count && i < max; i++) {
        parts[i].bytes = GRPC_SLICE_START_PTR(b->slices[i]);
        parts[i].length = GRPC_SLICE_LENGTH(b->slices[i]);
    }
    return (long)b->count;
}

int accel_grpc_call_has_message(const accel_grpc_call *c) { return c->request != NULL; }

const char *accel_grpc_call_metadata(const accel_grpc_call *c, const char *key, size_t *length) {
    for (size_t i = 0; i < c->request_metadata.count; i++) {
        const grpc_metadata *m = &c->request_metadata.metadata[i];
        if (grpc_slice_str_cmp(m->key, key) == 0) {
            *length = GRPC_SLICE_LENGTH(m->value);
            return (const char *)GRPC_SLICE_START_PTR(m->value);
        }
    }
    *length = 0;
    return NULL;
}

const char *accel_grpc_call_path(const accel_grpc_call *c, size_t *length) {
    *length = GRPC_SLICE_LENGTH(c->details.method);
    return (const char *)GRPC_SLICE_START_PTR(c->details.method);
}

int64_t accel_grpc_call_deadline_remaining_ns(const accel_grpc_call *c) {
    gpr_timespec deadline = c->deadline;
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) return INT64_MAX;
    gpr_timespec left = gpr_time_sub(gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC), gpr_now(GPR_CLOCK_MONOTONIC));
    if (left.tv_sec < 0) return 0;
    if (left.tv_sec > INT64_MAX / 1000000000 - 1) return INT64_MAX;
    return left.tv_sec * 1000000000 + left.tv_nsec;
}

int accel_grpc_call_was_cancelled(const accel_grpc_call *c) { return c->cancelled; }

static size_t fill_metadata(grpc_metadata *out, const accel_grpc_kv *kv, size_t count) {
    size_t n = count < ACCEL_GRPC_MAX_SENT_MD ? count : ACCEL_GRPC_MAX_SENT_MD;
    for (size_t i = 0; i < n; i++) {
        memset(&out[i], 0, sizeof(out[i]));
        out[i].key = grpc_slice_from_copied_string(kv[i].key);
        out[i].value = grpc_slice_from_copied_string(kv[i].value);
    }
    return n;
}

/* The message made of `parts`: in place with their release, or copied. */
static grpc_byte_buffer *make_message(const accel_grpc_part *parts, size_t part_count) {
    grpc_slice slices[8];
    size_t count = part_count < 8 ? part_count : 8;
    for (size_t i = 0; i < count; i++) {
        slices[i] = parts[i].release != NULL
                        ? grpc_slice_new_with_user_data((void *)parts[i].bytes, parts[i].length, parts[i].release,
                                                        parts[i].context)
                        : grpc_slice_from_copied_buffer((const char *)parts[i].bytes, parts[i].length);
    }
    /* Parts past the eighth are not sent (the edge sends at most three): give them back. */
    for (size_t i = count; i < part_count; i++)
        if (parts[i].release != NULL) parts[i].release(parts[i].context);
    grpc_byte_buffer *message = grpc_raw_byte_buffer_create(slices, count);
    for (size_t i = 0; i < count; i++) grpc_slice_unref(slices[i]);
    return message;
}

/* Adds SEND_INITIAL_METADATA to `ops` unless it went out already. */
static size_t add_initial(accel_grpc_call *c, grpc_op *ops, const accel_grpc_kv *initial, size_t initial_count) {
    if (c->initial_sent) return 0;
    c->initial_sent = 1;
    c->initial_count = fill_metadata(c->initial, initial, initial_count);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->initial_count;
    ops[0].data.send_initial_metadata.metadata = c->initial;
    return 1;
}

int accel_grpc_call_write(accel_grpc_call *c, const accel_grpc_kv *initial, size_t initial_count,
                          const accel_grpc_part *parts, size_t part_count) {
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    size_t n = add_initial(c, ops, initial, initial_count);
    if (c->written != NULL) grpc_byte_buffer_destroy(c->written);
    c->written = make_message(parts, part_count);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = c->written;
    n++;
    return start(c, ops, n, &c->wrote_tag);
}

int accel_grpc_call_respond(accel_grpc_call *c, const accel_grpc_kv *initial, size_t initial_count, int message,
                            const accel_grpc_part *parts, size_t part_count, int status, const char *status_message,
                            const accel_grpc_kv *trailers, size_t trailer_count) {
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    size_t n = add_initial(c, ops, initial, initial_count);
    if (message) {
        c->response = make_message(parts, part_count);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->response;
        n++;
    }
    c->trailer_count = fill_metadata(c->trailers, trailers, trailer_count);
    c->status_details = grpc_slice_from_copied_string(status_message != NULL ? status_message : "");
    c->has_status_details = 1;
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)status;
    ops[n].data.send_status_from_server.status_details = &c->status_details;
    ops[n].data.send_status_from_server.trailing_metadata_count = c->trailer_count;
    ops[n].data.send_status_from_server.trailing_metadata = c->trailers;
    n++;
    return (int)grpc_call_start_batch(c->call, ops, n, &c->sent_tag, NULL);
}

void accel_grpc_call_cancel(accel_grpc_call *c) {
    if (c->call != NULL) grpc_call_cancel(c->call, NULL);
}

void accel_grpc_call_destroy(accel_grpc_call *c) {
    if (c->call != NULL) grpc_call_unref(c->call);
    drop_message(c);
    if (c->response != NULL) grpc_byte_buffer_destroy(c->response);
    if (c->written != NULL) grpc_byte_buffer_destroy(c->written);
    for (size_t i = 0; i < c->initial_count; i++) {
        grpc_slice_unref(c->initial[i].key);
        grpc_slice_unref(c->initial[i].value);
    }
    for (size_t i = 0; i < c->trailer_count; i++) {
        grpc_slice_unref(c->trailers[i].key);
        grpc_slice_unref(c->trailers[i].value);
    }
    if (c->has_status_details) grpc_slice_unref(c->status_details);
    grpc_metadata_array_destroy(&c->request_metadata);
    grpc_call_details_destroy(&c->details);
    free(c);
}
