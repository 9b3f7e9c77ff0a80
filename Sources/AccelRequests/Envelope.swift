package import AccelABI
package import FoundationEssentials

/// The named-key envelope (docs/KEYS.md):
/// `A6 01 | key version (u32, big-endian) | nonce (12) | ciphertext || tag (16)`.
/// The first six bytes are also prepended to the caller's AAD, so a ciphertext
/// cannot be replayed under another key version.
package enum Envelope {
  package static let marker: UInt8 = 0xA6
  package static let formatVersion: UInt8 = 1
  package static let headerLength = 6
  package static let overhead = headerLength + CryptoSizing.nonceLength

  package static func header(keyVersion: UInt32) -> [UInt8] {
    [marker, formatVersion, UInt8(keyVersion >> 24), UInt8(keyVersion >> 16 & 0xff), UInt8(keyVersion >> 8 & 0xff),
      UInt8(keyVersion & 0xff)]
  }

  /// (key version, nonce, ciphertext || tag), or nil if `data` is not an envelope.
  package static func parse(_ data: Data) -> (UInt32, Data, Data)? {
    guard data.count >= overhead + CryptoSizing.tagLength else { return nil }
    let b = data.startIndex
    guard data[b] == marker, data[b + 1] == formatVersion else { return nil }
    let v = data[(b + 2)..<(b + 6)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    return (v, data[(b + 6)..<(b + overhead)], data[(b + overhead)...])
  }
}
