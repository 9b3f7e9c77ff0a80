/// A configuration, tenants or keyring file that cannot be used, with text
/// that names the place but never quotes secrets (`ConfigErrorText`).
public struct ConfigurationError: Error, CustomStringConvertible {
  public var description: String
  public init(_ description: String) { self.description = description }
}
