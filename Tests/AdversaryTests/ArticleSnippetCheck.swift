import Adversary

/// The code of the Adversary article "Audit a driver", compiled here so the article cannot
/// rot (not run: it needs a driver command; `AttackCatalogueTests` run the auditor).
func articleAuditADriver() throws {
    let auditor = Auditor(executable: "/usr/local/bin/ringfence")
    let attacks = try Catalogue.select(["used-id-out-of-range", "status-garbage"]).get()
    let report = auditor.runCommand(attacks, command: ["my-driver", "--socket", "{socket}"], deadline: 10)
    print(report.markdown)
    for record in report.records where record.asExpected == false {
        print("not contained: \(record.attack) (\(record.rule)): \(record.outcome)")
    }
}
