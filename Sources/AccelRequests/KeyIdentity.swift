/// Which key a crypto job uses, as responses and the audit log name it.
package enum KeyIdentity: Sendable, Equatable {
  /// Key bytes sent in the request.
  case raw
  /// A keyring key, at one version.
  case named(String, version: UInt32)

  /// The version responses report (0 for a raw key).
  package var version: UInt32 {
    switch self {
    case .raw: 0
    case .named(_, let version): version
    }
  }
}
