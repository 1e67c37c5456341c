import ArgumentParser
import BlockBench
import Foundation
import SharedMemory
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One line on stderr naming the command and the error, and exit 1: what every transport
/// command does with a device or violation error.
func orExit<T, E: Error>(_ command: String, _ body: () throws(E) -> T) throws -> T {
    do { return try body() } catch {
        FileHandle.standardError.write(Data("ringfence \(command): error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

/// `orExit` for a server: a failure to start or serve (the socket cannot be bound, the
/// image cannot be opened) is one line naming the command, exit 1; usage errors and
/// exit codes the server chose pass through.
func orExitServing(_ command: String, _ body: () throws -> Void) throws {
    do { try body() } catch let code as ExitCode { throw code } catch let usage as ValidationError {
        throw usage
    } catch {
        FileHandle.standardError.write(Data("ringfence \(command): error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

/// The encoder of every `--json`: one line, keys sorted (stable for tools and diffs).
func jsonLine<T: Encodable>(_ value: T) -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    e.nonConformingFloatEncodingStrategy = .convertToString(
        positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
    return (try? e.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
}

/// Prints `value` as one line of JSON (`--json`).
func printJSON<T: Encodable>(_ value: T) {
    print(jsonLine(value))
}

/// The progress line of runs over a second: rewritten each second on stderr, only when
/// stderr is a terminal and the output is not `--json` (nothing for a script to parse).
struct ProgressLine: Sendable {
    let enabled: Bool

    init(json: Bool) { enabled = !json && isatty(STDERR_FILENO) == 1 }

    func show(_ text: String) {
        if enabled { FileHandle.standardError.write(Data("\r\(text)   ".utf8)) }
    }

    func clear() {
        if enabled { FileHandle.standardError.write(Data("\r\u{1b}[K".utf8)) }
    }

    /// `[  3s/10s] 123456 IOPS, 482.3 MiB/s`.
    static func blockLine(elapsed: Double, runtime: Double, ios: Int, bs: Int) -> String {
        let iops = elapsed > 0 ? Double(ios) / elapsed : 0
        return "[\(format(elapsed, 0))s/\(format(runtime, 0))s] \(format(iops, 0)) IOPS, "
            + "\(format(iops * Double(bs) / 1_048_576, 1)) MiB/s"
    }

    /// Runs `body` on this thread while another shows the benchmark's progress each second.
    func during<T>(runtime: Double, bs: Int, progress: BlockBenchProgress, _ body: () throws -> T) rethrows -> T {
        guard enabled else { return try body() }
        let stopped = DispatchSemaphore(value: 0)
        let start = monotonicNanoseconds()
        let line = self
        let flag = DoneFlag()
        Thread.detachNewThread {
            while !flag.isSet {
                usleep(100_000)
                let elapsed = Double(monotonicNanoseconds() - start) / 1e9
                if elapsed >= 1 && !flag.isSet {
                    line.show(Self.blockLine(elapsed: elapsed, runtime: runtime, ios: progress.completed, bs: bs))
                    usleep(900_000)
                }
            }
            stopped.signal()
        }
        defer {
            flag.set()
            stopped.wait()
            clear()
        }
        return try body()
    }
}

/// A flag one thread sets and another reads.
final class DoneFlag: Sendable {
    let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}

/// The text form of a block benchmark (`blk bench`, `xen-blk bench`), fio's layout.
func printBench(_ r: BlockBenchResult) {
    print("\(r.rw): bs=\(r.bs) iodepth=\(r.iodepth) queues=\(r.queues) runtime=\(format(Double(r.runtime) / 1000, 1))s")
    print("  IOPS=\(format(r.iops, 0)), BW=\(format(Double(r.bw) / 1024, 1))MiB/s, ios=\(r.totalIos)")
    if let lat = r.latNs {
        func us(_ key: String) -> String { format(Double(lat.percentile[key] ?? 0) / 1000, 1) }
        print(
            "  lat (usec): mean=\(format(lat.mean / 1000, 1)), p50=\(us("50.000000")), p99=\(us("99.000000")), "
                + "p99.9=\(us("99.900000"))")
    }
}
