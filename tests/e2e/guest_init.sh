#!/bin/busybox sh
# /init of the e2e guest: PID 1 of a busybox initramfs, no udev, no systemd.
#
# It owns what a distribution's early userspace would do for the power channels:
# mount the pseudo file systems, load the virtio drivers (modules in Debian's kernel),
# wait for the virtio-serial ports and create the /dev/virtio-ports/<name> links that
# udev's 60-virtio-ports rule would create (DPDK and vmpower-guest open those names),
# then hand over to the test's guest agent on the control port.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mkdir -p /tmp /root /dev/virtio-ports

# Dependency order of Debian's 6.1 modules.dep: virtio_pci needs both transport helpers,
# virtio_console needs virtio and virtio_ring.
for module in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
        virtio_console; do
    insmod "/lib/modules/$module.ko" || echo "vmpower-e2e: insmod $module failed"
done

# Ports are announced by the host over virtio-serial's control queue after the driver
# binds, so they appear asynchronously; the host tells us how many to expect.
want=$(sed -n 's/.*vmpower_e2e_ports=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
want=${want:-1}
tries=0
while :; do
    count=0
    for port in /sys/class/virtio-ports/vport*; do
        [ -n "$(cat "$port/name" 2>/dev/null)" ] && [ -e "/dev/${port##*/}" ] \
            && count=$((count + 1))
    done
    [ "$count" -ge "$want" ] && break
    tries=$((tries + 1))
    if [ "$tries" -gt 600 ]; then
        echo "vmpower-e2e: only $count of $want virtio-serial ports appeared"
        break
    fi
    sleep 0.05
done
for port in /sys/class/virtio-ports/vport*; do
    name=$(cat "$port/name" 2>/dev/null)
    [ -n "$name" ] && ln -sf "../${port##*/}" "/dev/virtio-ports/$name"
done
echo "vmpower-e2e: ports $(ls /dev/virtio-ports | tr '\n' ' ')"
echo "vmpower-e2e: userspace up at $(cut -d' ' -f1 /proc/uptime) s"

python3 /opt/e2e/guest_agent.py
echo "vmpower-e2e: guest agent exited with status $?"
# PID 1 must not exit (the kernel would panic); power off cleanly instead.
poweroff -f
