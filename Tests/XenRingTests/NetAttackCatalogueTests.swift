import Adversary
import Testing
@testable import XenRing

/// Every netif attack of the Adversary (what `ringfence audit --target xen-net` runs),
/// played through the real netback's and netfront's hooks: each must be contained with
/// exactly the expected outcome.
@Suite(.serialized) struct NetAttackCatalogueTests {
    @Test(arguments: [
        (
            XenNetBackendAttack.rxIdOutOfRange,
            "disabled: R3 (validate before use): response id 1000 is outside the ring of 256"
        ),
        (.rxIdNotPosted, "disabled: R3 (validate before use): response id 200 is not in flight"),
        (.rxIdDuplicated, "disabled: R3 (validate before use): response id 0 is not in flight"),
        (
            .rxOffsetPastPage,
            "disabled: R3 (validate before use): rx response 0: offset 4090 + size 64 runs past the page"
        ),
        (.rxEndlessMoreData, "disabled: R5 (bounded work): frame chain of 1 slots runs past the published producer"),
        (.rxBogusExtraType, "disabled: R3 (validate before use): extra-info type 7 is not valid here"),
        (.rxStatusGarbage, "disabled: R3 (validate before use): rx response 0 has unknown status -77"),
        (.txStatusGarbage, "disabled: R3 (validate before use): tx response 0 has unknown status 77"),
        (.txIdNotInFlight, "disabled: R3 (validate before use): response id 1 is not in flight"),
        (
            .responseProducerRunAhead,
            "disabled: R3 (validate before use): rsp_prod jumped from 0 to 1001 with only 1 requests in flight"
        ),
        (
            .responseProducerBackwards,
            "disabled: R3 (validate before use): rsp_prod went backwards from 0 to 4294967293"
        ),
        (.grantKeptMapped, "disabled: R7 (share only what must be shared): grant "),
        (.eventStorm, "stayed up, 3 frames echoed, "),
    ])
    func backendAttackIsContainedByNetfront(attack: XenNetBackendAttack, outcome: String) {
        let r = Auditor.auditXenNet(backendAttacks: [attack], frontendAttacks: [])
        #expect(r.count == 1)
        #expect(r.first?.isSafe == true)
        #expect(r.first?.outcome.hasPrefix(outcome) == true, "\(r.first?.outcome ?? "")")
    }

    @Test(arguments: [
        (
            XenNetFrontendAttack.requestProducerJump,
            "connection dropped: dropped(R3 (validate before use): req_prod jumped from 0 to 1001, more than the ring of 256)"
        ),
        (
            .txEndlessMoreData,
            "connection dropped: dropped(R5 (bounded work): frame chain of 1 slots runs past the published producer)"
        ),
        (
            .txOffsetPastPage,
            "connection dropped: dropped(R3 (validate before use): tx request 0: offset 4000 size 1500 does not fit)"
        ),
        (
            .txBogusExtraType,
            "connection dropped: dropped(R3 (validate before use): extra-info type 9 is not valid here)"
        ),
        (.grantRefOutOfRange, "refused (ERROR), then echoed a good frame"),
        (.grantNotGranted, "refused (ERROR), then echoed a good frame"),
        (.sizeBelowFragments, "refused (ERROR), then echoed a good frame"),
        (.runtFrame, "refused (ERROR), then echoed a good frame"),
    ])
    func frontendAttackIsContainedByNetback(attack: XenNetFrontendAttack, outcome: String) {
        let r = Auditor.auditXenNet(backendAttacks: [], frontendAttacks: [attack])
        #expect(r.count == 1)
        #expect(r.first?.isSafe == true)
        #expect(r.first?.outcome == outcome)
    }

    @Test func markdownReportNamesEveryAttack() {
        let r = [
            XenNetAuditRecord(attack: "a", target: "netfront", expected: "x", outcome: "y", isSafe: true),
            XenNetAuditRecord(attack: "b", target: "netback", expected: "x", outcome: "z", isSafe: false),
        ]
        let md = Auditor.xenNetMarkdown(r)
        #expect(md.contains("| `a` | netfront | x | y | contained |"))
        #expect(md.contains("| `b` | netback | x | z | **FAIL** |"))
        #expect(md.contains("2 netif attacks, 1 contained, 1 failed."))
    }
}
