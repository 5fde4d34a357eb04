#!/bin/busybox sh
# /init of ferry's Linux bench guest: mounts what the workload needs, reads its settings
# from the kernel command line (ferry.ws_mib=N ferry.dirty_mib_s=R [ferry.selftest=MODE]
# [ferry.disk_mib_s=R: also the first virtio disk, its drivers loaded from /lib/modules])
# and runs it on the console. PID 1 never exits (the kernel would panic).
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev 2>/dev/null
# Keep the working set on 4 KiB pages that stay put: a host test corrupts one by address.
echo never > /sys/kernel/mm/transparent_hugepage/enabled
echo 0 > /proc/sys/vm/compact_unevictable_allowed
ws=64 dirty=0 test=none disk=
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
        ferry.ws_mib=*) ws=${arg#*=} ;;
        ferry.dirty_mib_s=*) dirty=${arg#*=} ;;
        ferry.selftest=*) test=${arg#*=} ;;
        ferry.disk_mib_s=*) disk=${arg#*=} ;;
    esac
done
echo "FERRY-WL boot ws_mib=$ws dirty_mib_s=$dirty selftest=$test disk_mib_s=${disk:-none}"
if [ -n "$disk" ]; then
    # In dependency order: each uses symbols of those before it.
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
             virtio_blk; do
        $bb insmod /lib/modules/$m.ko || echo "FERRY-WL insmod $m failed"
    done
    n=0
    while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do $bb usleep 100000; n=$((n + 1)); done
    /workload "$ws" "$dirty" "$test" /dev/vda "$disk"
else
    /workload "$ws" "$dirty" "$test"
fi
echo "FERRY-WL exited with status $?"
while :; do $bb sleep 3600; done
