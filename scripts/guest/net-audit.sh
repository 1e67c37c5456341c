# Guest side of `ringfence audit --device net --target command` against Linux virtio_net:
# bring eth0 up, give the device's attack (it fires 2 s after the receive queue starts)
# time to land, then print what the driver counted and logged.
ip link set eth0 up || exit 10
sleep 8
line="rx_stat"
for f in rx_packets rx_bytes rx_errors rx_length_errors rx_dropped rx_over_errors rx_frame_errors; do
    line="$line $f=$(cat /sys/class/net/eth0/statistics/$f)"
done
echo "$line"
dmesg | grep -E 'virtio_net|eth0: |BUG:|WARNING:|Call Trace|Oops|general protection' | grep -v 'link becomes ready' \
    | grep -v 'ommand line' | tail -n 6 | sed 's/^/guest-log: /'
echo "link: $(cat /sys/class/net/eth0/operstate)"
exit 0
