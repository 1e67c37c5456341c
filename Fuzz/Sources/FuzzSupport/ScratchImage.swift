#if canImport(Glibc)
import Glibc
#endif

/// A sparse scratch image file of `size` bytes in /dev/shm (or /tmp), made once per
/// process, for the block-device targets. Returns its path.
public func scratchImage(size: Int) -> String {
    let dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    let path = "\(dir)/ringfence-fuzz-\(getpid()).img"
    let fd = open(path, O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0o600)
    if fd >= 0 {
        _ = ftruncate(fd, off_t(size))
        close(fd)
    }
    return path
}

/// Current size of a file, or -1.
public func fileSize(_ path: String) -> Int {
    var st = stat()
    return stat(path, &st) == 0 ? Int(st.st_size) : -1
}
