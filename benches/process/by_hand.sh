#!/bin/sh
# The P1 baseline: a process sandbox's isolation set up by hand with
# util-linux, run as `unshare --pid --mount --uts --ipc --net --fork
# --propagation private -- sh by_hand.sh STATE IMAGE HOSTNAME`. It builds
# the same root as `stacyvmd sandbox-init` (src/providers/process/init.rs),
# step for step, prints `ready` and exits (which ends the namespaces).
# STATE holds empty workspace/, tmp/ and rootfs/ directories.
set -eu
state=$1 image=$2 name=$3
root=$state/rootfs
echo $$ > "$state/pid"
echo "$name" > /proc/sys/kernel/hostname
ip link set dev lo up
mount -t tmpfs -o mode=0755,size=4m,nosuid,nodev tmpfs "$root"
cd "$image"
for entry in * .[!.]*; do
    case $entry in proc | sys | dev | tmp | workspace | run) continue ;; esac
    if [ -L "$entry" ]; then
        ln -s "$(readlink "$entry")" "$root/$entry"
        continue
    elif [ -d "$entry" ]; then
        mkdir "$root/$entry"
    elif [ -f "$entry" ]; then
        : > "$root/$entry"
    else
        continue
    fi
    # One mount(8) does the bind and the read-only remount.
    mount --bind -o ro,nosuid,nodev "$image/$entry" "$root/$entry"
done
for dir in workspace tmp; do
    mkdir "$root/$dir"
    mount --bind -o nosuid,nodev "$state/$dir" "$root/$dir"
done
mkdir "$root/dev"
mount -t tmpfs -o mode=0755,size=64k,nosuid,noexec tmpfs "$root/dev"
for device in null zero full random urandom tty; do
    [ -e "/dev/$device" ] || continue
    : > "$root/dev/$device"
    mount --bind "/dev/$device" "$root/dev/$device"
done
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mkdir "$root/dev/shm"
mount -t tmpfs -o mode=1777,size=16m,nosuid,nodev,noexec tmpfs "$root/dev/shm"
# /proc before the pivot, as init.rs does it (and umount(8) reads
# /proc/self/mountinfo).
mkdir "$root/proc"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
cd "$root"
pivot_root . .
umount -l .
cd /
mount -o remount,ro,nosuid /
echo ready
