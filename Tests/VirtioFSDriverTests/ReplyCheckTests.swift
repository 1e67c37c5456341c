import SharedMemory
import Testing
import VirtioFS

/// The reply checks of `FSReply` / `FSInfo` on hand-made replies: each names the rule or
/// attack it provokes and asserts the exact violation.
struct ReplyCheckTests {
    func header(len: UInt32, error: Int32, unique: UInt64, body: [UInt8] = []) -> [UInt8] {
        var w = FuseWriter()
        FuseOutHeader(length: len, error: error, unique: unique).encode(into: &w)
        w.append(body)
        return w.bytes
    }

    @Test func wellFormedReplyPasses() throws {
        let r = try FSReply.checkHeader(
            header(len: 24, error: 0, unique: 7, body: [1, 2, 3, 4, 5, 6, 7, 8]), usedLength: 24, unique: 7)
        #expect(r.error == 0)
        #expect(Array(r.body) == [1, 2, 3, 4, 5, 6, 7, 8])
    }

    @Test func usedLengthDifferingFromOutLenIsAViolation() {
        #expect(throws: FSViolation.replyLengthMismatch(usedLength: 24, headerLength: 16)) {
            try FSReply.checkHeader(
                header(len: 16, error: 0, unique: 7, body: Array(repeating: 0, count: 8)), usedLength: 24, unique: 7)
        }
        #expect(throws: FSViolation.replyLengthMismatch(usedLength: 16, headerLength: 4096)) {
            try FSReply.checkHeader(header(len: 4096, error: 0, unique: 7), usedLength: 16, unique: 7)
        }
    }

    @Test func replyShorterThanHeaderIsAViolation() {
        #expect(throws: FSViolation.replyTooShort(usedLength: 0)) {
            try FSReply.checkHeader([], usedLength: 0, unique: 7)
        }
    }

    /// Found by FuzzFuseReplies: a copy shorter than the used length trapped.
    @Test func copyShorterThanTheUsedLengthIsRefusedWithoutTrapping() {
        #expect(throws: FSViolation.replyTooShort(usedLength: 16)) {
            try FSReply.checkHeader(header(len: 120, error: 0, unique: 7), usedLength: 120, unique: 7)
        }
    }

    @Test func uniqueOfAnotherRequestIsAViolation() {
        #expect(throws: FSViolation.uniqueMismatch(expected: 7, got: 9)) {
            try FSReply.checkHeader(header(len: 16, error: 0, unique: 9), usedLength: 16, unique: 7)
        }
    }

    @Test func positiveOrHugeErrorIsAViolation() {
        #expect(throws: FSViolation.errorOutOfRange(5)) {
            try FSReply.checkHeader(header(len: 16, error: 5, unique: 7), usedLength: 16, unique: 7)
        }
        #expect(throws: FSViolation.errorOutOfRange(-4096)) {
            try FSReply.checkHeader(header(len: 16, error: -4096, unique: 7), usedLength: 16, unique: 7)
        }
        #expect(throws: FSViolation.errorOutOfRange(Int32.min)) {
            try FSReply.checkHeader(header(len: 16, error: Int32.min, unique: 7), usedLength: 16, unique: 7)
        }
    }

    @Test func errorReplyWithABodyIsAViolation() {
        #expect(throws: FSViolation.errorWithBody(length: 24)) {
            try FSReply.checkHeader(
                header(len: 24, error: -2, unique: 7, body: Array(repeating: 0, count: 8)), usedLength: 24, unique: 7)
        }
    }

    @Test func errnoReplyIsReturned() throws {
        #expect(try FSReply.checkHeader(header(len: 16, error: -2, unique: 7), usedLength: 16, unique: 7).error == -2)
    }

    @Test func initMajor8IsAViolation() {
        var out = FuseInitOut()
        out.major = 8
        #expect(throws: FSViolation.initVersion(major: 8, minor: FuseProtocol.minorVersion)) {
            try FSInfo.validateInit(out)
        }
    }

    @Test func initMaxWriteIsClamped() throws {
        var out = FuseInitOut()
        out.maxWrite = UInt32.max
        out.flags = FuseProtocol.InitFlag.maxPages
        out.maxPages = UInt16.max
        let v = try FSInfo.validateInit(out)
        #expect(v.maxWrite == FSInfo.transferCap)
        #expect(v.maxPages == 256)
        out.maxWrite = 0
        #expect(try FSInfo.validateInit(out).maxWrite == 4096)
    }

    func attr(mode: UInt32, size: UInt64 = 0) -> FuseAttr {
        var a = FuseAttr()
        a.mode = mode
        a.size = size
        return a
    }

    @Test func attributeWithoutAFileTypeIsAViolation() {
        #expect(throws: FSViolation.attributeType(nodeID: 5, mode: 0o644)) {
            try FileAttributes.validate(attr(mode: 0o644), nodeID: 5)
        }
        #expect(throws: FSViolation.attributeType(nodeID: 5, mode: 0o170644)) {
            try FileAttributes.validate(attr(mode: 0o170644), nodeID: 5)
        }
    }

    @Test func sizeAboveInt64MaxIsAViolation() {
        #expect(throws: FSViolation.attributeSize(nodeID: 5, size: UInt64(Int64.max) + 1)) {
            try FileAttributes.validate(attr(mode: 0o100644, size: UInt64(Int64.max) + 1), nodeID: 5)
        }
    }

    // MARK: config

    @Test func tagFillingAll36BytesWithoutNULIsAccepted() throws {
        let tag = String(repeating: "t", count: 36)
        let v = try FSInfo.validateConfig(FSConfig(tag: tag, numRequestQueues: 1), backendQueues: 2, requestedQueues: 1)
        #expect(v.tag == tag)
    }

    @Test func tagWithANewlineIsAViolation() {
        #expect(throws: FSViolation.configInvalid(field: "tag", detail: "contains a newline or control character")) {
            try FSInfo.validateConfig(
                FSConfig(tag: "evil\nroot", numRequestQueues: 1), backendQueues: 2, requestedQueues: 1)
        }
    }

    @Test func tagWithBytesAfterTheNULIsAViolation() {
        var raw = Array("ok".utf8) + [0, 0x41]
        raw += [UInt8](repeating: 0, count: 36 - raw.count)
        #expect(
            throws: FSViolation.configInvalid(
                field: "tag", detail: "bytes after the NUL terminator are not NUL padding")
        ) {
            try FSInfo.validateConfig(FSConfig(tag: raw, numRequestQueues: 1), backendQueues: 2, requestedQueues: 1)
        }
    }

    @Test func tagThatIsNotUTF8IsAViolation() {
        #expect(throws: FSViolation.configInvalid(field: "tag", detail: "not UTF-8")) {
            try FSInfo.validateConfig(
                FSConfig(tag: [0xff, 0xfe], numRequestQueues: 1), backendQueues: 2, requestedQueues: 1)
        }
    }

    @Test func zeroRequestQueuesIsAViolation() {
        #expect(throws: FSViolation.configInvalid(field: "num_request_queues", detail: "0 (at least 1 is required)")) {
            try FSInfo.validateConfig(FSConfig(tag: "t", numRequestQueues: 0), backendQueues: 2, requestedQueues: 1)
        }
    }

    @Test func requestQueuesAreClampedToTheBackend() throws {
        let v = try FSInfo.validateConfig(
            FSConfig(tag: "t", numRequestQueues: 1000), backendQueues: 3, requestedQueues: 8)
        #expect(v.requestQueues == 2)
    }
}
