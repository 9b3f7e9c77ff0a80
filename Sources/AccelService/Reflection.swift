internal import AccelMessages
internal import FoundationEssentials
internal import SwiftProtobuf

/// gRPC server reflection, so grpcurl, grpcui, Postman and grpcio-reflection can
/// discover the API without the .proto files. It answers from the descriptor set
/// committed in `proto/descriptors/` (embedded at generation time), under both
/// `grpc.reflection.v1` and the older `grpc.reflection.v1alpha` name, whose
/// messages are identical on the wire. Like health, it needs no API key: the
/// schema is public, the data is not.
struct ReflectionService: Sendable {
  let index: DescriptorIndex

  init() throws {
    index = try DescriptorIndex(base64: EmbeddedDescriptorSet.base64)
  }
}

/// The files of a descriptor set, indexed by file name and by every symbol they define.
struct DescriptorIndex: Sendable {
  /// Serialized FileDescriptorProto per file name.
  let files: [String: Data]
  /// Each file's direct imports.
  let imports: [String: [String]]
  /// Fully qualified symbol (package.Message, package.Service.Method, …) → file name.
  let symbols: [String: String]
  let services: [String]

  init(base64: String) throws {
    guard let data = Data(base64Encoded: base64) else { throw CallStatus(code: .internalError, message: "bad descriptor set") }
    let set = try Google_Protobuf_FileDescriptorSet(serializedBytes: data)
    var files: [String: Data] = [:]
    var imports: [String: [String]] = [:]
    var symbols: [String: String] = [:]
    var services: [String] = []
    for file in set.file {
      files[file.name] = try file.serializedData()
      imports[file.name] = file.dependency
      let prefix = file.package.isEmpty ? "" : file.package + "."
      func addMessage(_ m: Google_Protobuf_DescriptorProto, _ scope: String) {
        let name = scope + m.name
        symbols[name] = file.name
        for e in m.enumType { symbols[name + "." + e.name] = file.name }
        for n in m.nestedType { addMessage(n, name + ".") }
      }
      for m in file.messageType { addMessage(m, prefix) }
      for e in file.enumType { symbols[prefix + e.name] = file.name }
      for s in file.service {
        let name = prefix + s.name
        symbols[name] = file.name
        for m in s.method { symbols[name + "." + m.name] = file.name }
        services.append(name)
      }
    }
    self.files = files
    self.imports = imports
    self.symbols = symbols
    self.services = services.sorted()
  }

  /// The file, then every file it imports, transitively, each once.
  func withDependencies(_ name: String) -> [Data] {
    var seen: Set<String> = []
    var order: [String] = []
    func visit(_ n: String) {
      guard !seen.contains(n), files[n] != nil else { return }
      seen.insert(n)
      order.append(n)
      for d in imports[n] ?? [] { visit(d) }
    }
    visit(name)
    return order.compactMap { files[$0] }
  }

  func answer(_ request: Grpc_Reflection_V1_ServerReflectionRequest) -> Grpc_Reflection_V1_ServerReflectionResponse {
    var r = Grpc_Reflection_V1_ServerReflectionResponse()
    r.validHost = request.host
    r.originalRequest = request
    func notFound(_ what: String) {
      r.errorResponse = .with {
        $0.errorCode = Int32(CallStatus.Code.notFound.rawValue)
        $0.errorMessage = what
      }
    }
    switch request.messageRequest {
    case .listServices?:
      r.listServicesResponse = .with { $0.service = services.map { s in .with { $0.name = s } } }
    case .fileByFilename(let name)?:
      if files[name] != nil {
        r.fileDescriptorResponse = .with { $0.fileDescriptorProto = withDependencies(name) }
      } else {
        notFound("no file named '\(name)'")
      }
    case .fileContainingSymbol(let symbol)?:
      let trimmed = symbol.hasPrefix(".") ? String(symbol.dropFirst()) : symbol
      if let file = symbols[trimmed] {
        r.fileDescriptorResponse = .with { $0.fileDescriptorProto = withDependencies(file) }
      } else {
        notFound("no symbol named '\(symbol)'")
      }
    case .fileContainingExtension(let e)?:
      notFound("no extension \(e.extensionNumber) of '\(e.containingType)'")
    case .allExtensionNumbersOfType(let type)?:
      if symbols[type] != nil {
        r.allExtensionNumbersResponse = .with { $0.baseTypeName = type }
      } else {
        notFound("no type named '\(type)'")
      }
    case nil:
      r.errorResponse = .with {
        $0.errorCode = Int32(CallStatus.Code.invalidArgument.rawValue)
        $0.errorMessage = "empty reflection request"
      }
    }
    return r
  }
}
