internal import Yams

/// Error text for configuration files that names the place (line, column,
/// field path) but never quotes the file: tenants files and keyrings hold
/// secrets, and YAML parser errors otherwise echo the offending line.
package enum ConfigErrorText {
  package static func describe(_ error: any Error, revealValues: Bool) -> String {
    switch error {
    case let e as YamlError:
      switch e {
      case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _),
        .composer(_, let problem, let mark, _):
        return "YAML error at line \(mark.line), column \(mark.column): \(problem)"
      case .reader(let problem, let offset, _, _):
        return "YAML error at byte \(offset ?? 0): \(problem)"
      default:
        return "YAML error"
      }
    case DecodingError.keyNotFound(let key, let ctx):
      return "\(path(ctx.codingPath + [key])): missing"
    case DecodingError.typeMismatch(_, let ctx), DecodingError.valueNotFound(_, let ctx),
      DecodingError.dataCorrupted(let ctx):
      return "\(path(ctx.codingPath)): " + (revealValues ? ctx.debugDescription : "wrong type or value")
    default:
      return "invalid file"
    }
  }

  static func path(_ keys: [any CodingKey]) -> String {
    let p = keys.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
    return p.hasPrefix(".") ? String(p.dropFirst()) : p
  }
}
