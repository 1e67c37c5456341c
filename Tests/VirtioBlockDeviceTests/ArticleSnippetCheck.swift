import BlockImage
import VhostUser
import VirtioBlock

/// The code of the VhostUser article "Serve a disk to a Linux guest", compiled here so the
/// article cannot rot (not run: it serves until stopped; `ServeBlkShutdownTests` and the
/// Linux guest tests run `serve-blk`, which is this code).
func articleServeADiskToALinuxGuest() throws {
    let image = try DeviceImage(path: "/tmp/disk.img")
    var options = VirtioBlockDeviceOptions()
    options.queueCount = 2
    let device = VirtioBlockDevice(image: image, options: options)
    let backend = Backend(device: device, onEvent: { print($0) })
    try backend.run(socketPath: "/tmp/blk.sock")  // until backend.stop()
}
