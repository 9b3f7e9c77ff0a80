// libFuzzer harness for `DescriptorRules.validate`, the device's only gate between a
// peer-written SQE and the engines. Built with `swiftc -sanitize=fuzzer,address` by
// fuzz/descriptor/run.sh, together with the AccelABI sources it checks.
//
// The input is a region geometry, an SQE (raw bytes, so every field takes any value)
// and the size of one attached external region. The oracle is independent arithmetic
// in UInt128 (no overflow possible): whenever validate says `.ok`, every buffer it lets
// through lies inside its region, input and output do not overlap, the AEAD block is in
// the data pool and clear of the output, and the key slot exists. A trap inside
// validate (an overflow on a hostile offset) is a crash libFuzzer reports.
import CAccelABI

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
  let bytes = UnsafeBufferPointer(start: data, count: size)
  let sqeSize = MemoryLayout<accel_sqe>.size
  guard bytes.count >= 8 + sqeSize else { return 0 }
  // Geometry: small rings, a pool of 1..64 pages, 0..15 key slots; one external region of any size.
  let sqEntries = UInt32(1) << UInt32(bytes[0] % 8)
  let pool = UInt64(bytes[1] % 64 + 1) * 4096 - UInt64(bytes[2] % 2) * 17
  let keySlots = UInt32(bytes[3] % 16)
  let externalID = UInt16(bytes[4] % 4)
  let externalSize: UInt64 = bytes[5] & 1 == 0 ? UInt64(bytes[6]) << UInt64(bytes[7] % 64) : .max - UInt64(bytes[6])
  guard let layout = try? RegionLayout(sqEntries: sqEntries, cqEntries: sqEntries, dataPoolBytes: pool, keySlots: keySlots)
  else { return 0 }
  var sqe = accel_sqe()
  withUnsafeMutableBytes(of: &sqe) { raw in
    for i in 0..<sqeSize { raw[i] = bytes[8 + i] }
  }
  let status = DescriptorRules.validate(sqe, layout: layout) { id in
    id == externalID && id != 0 ? externalSize : nil
  }
  guard status == .ok else { return 0 }
  check(sqe, layout: layout, externalID: externalID, externalSize: externalSize)
  return 0
}

private func inside(_ region: UInt16, _ offset: UInt64, _ length: UInt64, layout: RegionLayout, externalID: UInt16, externalSize: UInt64) -> Bool {
  let end = UInt128(offset) + UInt128(length)
  // Data-pool offsets are region offsets (the pool starts at dataOffset).
  if region == 0 { return offset >= layout.dataOffset && end <= UInt128(layout.dataOffset) + UInt128(layout.dataSize) }
  return region == externalID && end <= UInt128(externalSize)
}

private func overlap(_ a: UInt64, _ al: UInt64, _ b: UInt64, _ bl: UInt64) -> Bool {
  al > 0 && bl > 0 && UInt128(a) < UInt128(b) + UInt128(bl) && UInt128(b) < UInt128(a) + UInt128(al)
}

private func check(_ sqe: accel_sqe, layout: RegionLayout, externalID: UInt16, externalSize: UInt64) {
  func expect(_ ok: Bool, _ why: String) {
    if !ok { fatalError("DescriptorRules accepted a descriptor that \(why): \(sqe)") }
  }
  guard sqe.opcode != 0 else {
    expect(sqe.key_slot == 0 && sqe.aux_length == 0, "is a NOP with a key or an aux block")
    return
  }
  expect(inside(sqe.src_region, sqe.src_offset, UInt64(sqe.src_length), layout: layout, externalID: externalID, externalSize: externalSize), "reads outside its region")
  expect(inside(sqe.dst_region, sqe.dst_offset, UInt64(sqe.dst_capacity), layout: layout, externalID: externalID, externalSize: externalSize), "writes outside its region")
  if sqe.src_region == sqe.dst_region {
    expect(!overlap(sqe.src_offset, UInt64(sqe.src_length), sqe.dst_offset, UInt64(sqe.dst_capacity)), "overlaps input and output")
  }
  if sqe.opcode == 3 || sqe.opcode == 4 {
    expect(UInt64(sqe.aux_length) >= UInt64(MemoryLayout<accel_aead_params>.size), "has a short AEAD block")
    expect(inside(0, sqe.aux_offset, UInt64(sqe.aux_length), layout: layout, externalID: externalID, externalSize: externalSize), "has an AEAD block outside the pool")
    if sqe.dst_region == 0 {
      expect(!overlap(sqe.aux_offset, UInt64(sqe.aux_length), sqe.dst_offset, UInt64(sqe.dst_capacity)), "writes over its AEAD block")
    }
    expect(sqe.key_slot >= 1 && sqe.key_slot <= layout.keySlotCount, "names a missing key slot")
  }
  if sqe.flags & UInt8(ACCEL_SQE_F_STREAM) != 0 {
    expect(sqe.stream_ctx >= 1 && UInt32(sqe.stream_ctx) <= UInt32(ACCEL_STREAM_CTX_MAX), "names a missing stream context")
    expect(sqe.src_region == 0 && sqe.dst_region == 0, "streams through an external region")
  }
}
