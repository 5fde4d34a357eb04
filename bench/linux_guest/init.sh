#!/bin/busybox sh
# /init of ferry's Linux bench guest: mounts what the workload needs, reads its settings
# from the kernel command line (ferry.ws_mib=N ferry.dirty_mib_s=R [ferry.selftest=MODE])
# and runs it on the console. PID 1 never exits (the kernel would panic).
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev 2>/dev/null
# Keep the working set on 4 KiB pages that stay put: a host test corrupts one by address.
echo never > /sys/kernel/mm/transparent_hugepage/enabled
echo 0 > /proc/sys/vm/compact_unevictable_allowed
ws=64 dirty=0 test=
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
        ferry.ws_mib=*) ws=${arg#*=} ;;
        ferry.dirty_mib_s=*) dirty=${arg#*=} ;;
        ferry.selftest=*) test=${arg#*=} ;;
    esac
done
echo "FERRY-WL boot ws_mib=$ws dirty_mib_s=$dirty selftest=${test:-none}"
/workload "$ws" "$dirty" $test
echo "FERRY-WL exited with status $?"
while :; do $bb sleep 3600; done
