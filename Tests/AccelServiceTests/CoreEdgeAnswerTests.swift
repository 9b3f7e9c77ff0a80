import AccelCoreEdge
import AccelMessages
@testable import AccelService
import Foundation
import SwiftProtobuf
import Testing

/// How the C-core edge encodes answers and bounds the pool its unsent replies hold.
@Suite struct CoreEdgeAnswerTests {
  @Test func pinsAreBoundedPerTenantAndGivenBack() {
    let pins = ReplyPins(limit: 100)
    #expect(pins.take(60, tenant: "a"))
    #expect(!pins.take(41, tenant: "a"))  // 101 > 100: copied out instead
    #expect(pins.take(40, tenant: "a"))  // exactly the limit
    #expect(pins.take(100, tenant: "b"))  // another tenant has its own share
    #expect(pins.holding("a") == 100 && pins.holding("b") == 100)
    pins.give(60, tenant: "a")
    #expect(pins.holding("a") == 40)
    #expect(pins.take(60, tenant: "a"))
    pins.give(100, tenant: "a")
    pins.give(100, tenant: "b")
    #expect(pins.holding("a") == 0 && pins.holding("b") == 0)
  }

  @Test func aResponseEncodesIntoACoreBufferAsSwiftProtobufWouldIntoBytes() throws {
    let message = Accelgate_V1_CompressResponse.with {
      $0.data = Data((0..<5000).map { UInt8($0 % 251) })
      $0.stats = .with { $0.inputBytes = 7; $0.outputBytes = 5000; $0.engine = "isal" }
    }
    let expected: [UInt8] = try message.serializedBytes()
    let buffer: CoreBuffer = try message.serializedBytes()
    #expect(buffer.withUnsafeBytes { Array($0) } == expected)
    // With no result in the pool, the answer is that one buffer.
    let parts = try CoreEdgeService.parts(LaneResponse(message: message), sent: nil)
    #expect(parts.count == 1)
    #expect(try Accelgate_V1_CompressResponse(serializedBytes: buffer) == message)
  }

  @Test func anEmptyMessageIsAnEmptyBuffer() throws {
    let buffer: CoreBuffer = try Accelgate_V1_DescribeDeviceRequest().serializedBytes()
    #expect(buffer.count == 0)
    #expect(buffer.withUnsafeBytes { $0.count } == 0)
  }
}
