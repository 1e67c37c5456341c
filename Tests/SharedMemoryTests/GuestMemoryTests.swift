import SharedMemory
import Testing

@Suite struct GuestMemoryTests {
    @Test func translateRejectsWrapAroundAndGaps() throws {
        let region = try SharedRegion(name: "t", size: 8192)
        let memory = try GuestMemory([GuestRegion(guestAddress: 0x1000, userAddress: 0x9000, mapping: region)])
        #expect(throws: TranslationError.overflow(address: .max - 1, length: 4)) {
            try memory.translate(.max - 1, length: 4)
        }
        #expect(throws: TranslationError.unmapped(address: 0x1000 + 8190, length: 4)) {
            try memory.translate(0x1000 + 8190, length: 4)
        }
        #expect(throws: TranslationError.unmapped(address: 0, length: 1)) { try memory.translate(0, length: 1) }
        let ok = try memory.translate(0x1000 + 8188, length: 4)
        #expect(ok.baseAddress == region.base + 8188)
    }
}
