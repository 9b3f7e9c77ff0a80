internal import AccelScheduler
internal import GRPCCore

/// Authenticates every call: `authorization: Bearer <key>` → tenant.
///
/// The interceptor runs before the handler reads the request message, so a
/// call without valid credentials is refused before its payload is decoded.
/// On success it replaces the `authorization` header with the tenant id under
/// `TenantHeader.name` (a client cannot set that header itself: any incoming
/// value is dropped), so the key never travels further into the server.
struct AuthInterceptor: ServerInterceptor {
  let directory: TenantDirectory
  var metrics: GatewayMetrics? = nil

  func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    // Health and reflection stay open (they carry no tenant data).
    if context.descriptor.service.fullyQualifiedService.hasPrefix("grpc.") { return try await next(request, context) }
    var request = request
    let header = request.metadata[stringValues: "authorization"].first(where: { _ in true })
    request.metadata.removeAllValues(forKey: "authorization")
    request.metadata.removeAllValues(forKey: TenantHeader.name)
    guard let tenant = directory.authenticate(authorization: header) else {
      metrics?.recordUnauthenticated()
      throw RPCError(
        code: .unauthenticated,
        message: header == nil ? "missing 'authorization: Bearer <api-key>' metadata" : "unknown API key")
    }
    request.metadata.addString(tenant.id, forKey: TenantHeader.name)
    // The handler, and so the message deserializer it drives, runs inside
    // `next` on this task: the network lane's deserializer reads the tenant
    // from this task-local to charge a staged payload to it.
    return try await CallTenant.$current.withValue(tenant.id) { try await next(request, context) }
  }
}

/// The server-internal header carrying the authenticated tenant id to handlers.
enum TenantHeader {
  static let name = "x-accelgate-tenant"

  static func tenant(of metadata: Metadata) -> String {
    metadata[stringValues: name].first(where: { _ in true }) ?? "default"
  }
}
