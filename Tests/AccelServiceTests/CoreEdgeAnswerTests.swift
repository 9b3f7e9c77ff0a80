import AccelCoreEdge
import AccelMessages
@testable import AccelService
import Foundation
import SwiftProtobuf
import Synchronization
import Testing

/// How the C-core edge encodes answers and bounds the pool its unsent replies hold.
@Suite struct CoreEdgeAnswerTests {
  /// A fixed instant and offsets from it: the pins' clock is whatever the caller passes.
  static let t0 = ContinuousClock.now
  static func at(_ ms: Int) -> ContinuousClock.Instant { t0 + .milliseconds(ms) }

  @Test func pinsAreBoundedPerTenantAndGivenBack() throws {
    let pins = ReplyPins(limit: 100)
    let none: @Sendable () -> Void = {}
    let a60 = try #require(pins.take(60, tenant: "a", now: Self.at(0), end: none))
    #expect(pins.take(41, tenant: "a", now: Self.at(0), end: none) == nil)  // 101 > 100: copied out instead
    let a40 = try #require(pins.take(40, tenant: "a", now: Self.at(0), end: none))  // exactly the limit
    let b100 = try #require(pins.take(100, tenant: "b", now: Self.at(0), end: none))  // another tenant's own share
    #expect(pins.holding("a") == 100 && pins.holding("b") == 100 && pins.totalHeld == 200)
    pins.give(a60)
    #expect(pins.holding("a") == 40)
    pins.give(a60)  // a ticket gives back once
    #expect(pins.holding("a") == 40)
    let again = try #require(pins.take(60, tenant: "a", now: Self.at(0), end: none))
    for t in [a40, again, b100] { pins.give(t) }
    #expect(pins.holding("a") == 0 && pins.holding("b") == 0 && pins.totalHeld == 0)
  }

  @Test func repliesWaitingPastTheBoundAreEndedOnceAndKeepTheirBytesUntilGivenBack() throws {
    let pins = ReplyPins(limit: 1000)
    let ended = Mutex<[String]>([])
    func end(_ name: String) -> @Sendable () -> Void { { ended.withLock { $0.append(name) } } }
    let early = try #require(pins.take(10, tenant: "slow", now: Self.at(0), end: end("early")))
    let late = try #require(pins.take(20, tenant: "slow", now: Self.at(600), end: end("late")))
    let sent = try #require(pins.take(30, tenant: "fast", now: Self.at(0), end: end("sent")))
    pins.give(sent)  // sent in time: never ended
    let wait = Duration.milliseconds(1000)
    #expect(pins.overdue(now: Self.at(1000), after: wait).isEmpty, "exactly at the bound is not past it")
    let first = pins.overdue(now: Self.at(1001), after: wait)
    #expect(first.map(\.tenant) == ["slow"])
    first.forEach { $0.end() }
    #expect(ended.withLock { $0 } == ["early"])
    #expect(pins.overdue(now: Self.at(1500), after: wait).isEmpty, "ended once")
    #expect(pins.holding("slow") == 30, "an ended reply holds its bytes until the core lets go")
    pins.give(early)
    #expect(pins.holding("slow") == 20)
    let second = pins.overdue(now: Self.at(1601), after: wait)
    second.forEach { $0.end() }
    #expect(ended.withLock { $0 } == ["early", "late"])
    pins.give(late)
    #expect(pins.totalHeld == 0)
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
