#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/e2e) need on the host, only when missing:
# libvirtd with its QEMU driver, QEMU for x86, virsh, a static busybox and cpio for the
# guest's initramfs, socat for the PTY bridge, and DPDK's guest power library. Then the
# two steps the Debian packages leave to the administrator when libvirt-daemon-system
# (and systemd) are not installed:
#   * the system user libvirt-qemu, which the QEMU driver looks up when it starts;
#   * /etc/libvirt/qemu.conf: QEMU runs as root without a security driver or mount
#     namespaces, so it can open the kernel, initramfs and sockets under the test's
#     directories (this machine has no AppArmor/SELinux labels to give them).
# A second run does nothing and takes well under a second. Needs root to install.
set -euo pipefail

packages=(
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    busybox-static cpio socat librte-power23 gcc libexpat1 zlib1g
)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "vmpower e2e: $1 needs root; run this script as root" >&2
        exit 1
    fi
}

if [ ${#missing[@]} -gt 0 ]; then
    need_root "installing ${missing[*]}"
    echo "vmpower e2e: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! getent passwd libvirt-qemu >/dev/null; then
    need_root "creating the system user libvirt-qemu"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        libvirt-qemu
fi

conf=/etc/libvirt/qemu.conf
marker="# written by vmpower scripts/ensure-e2e-deps.sh"
# stdio_handler "file": QEMU's log and file chardevs are opened directly instead of
# through virtlogd, one daemon less to start by hand.
wanted="$marker
user = \"root\"
group = \"root\"
security_driver = \"none\"
namespaces = [ ]
stdio_handler = \"file\""
if [ ! -e "$conf" ] || { grep -qF "$marker" "$conf" && [ "$(cat "$conf")" != "$wanted" ]; }; then
    need_root "writing $conf"
    mkdir -p /etc/libvirt
    printf '%s\n' "$wanted" >"$conf"
elif ! grep -qF "$marker" "$conf"; then
    # Somebody else's configuration (libvirt-daemon-system installs one): leave it, but
    # say what the e2e tests expect, since QEMU as libvirt-qemu cannot read our cache.
    for setting in 'user = "root"' 'security_driver = "none"' 'stdio_handler = "file"'; do
        if ! grep -qxF "$setting" "$conf"; then
            echo "vmpower e2e: note: $conf lacks '$setting'; the e2e guests may fail to start" >&2
        fi
    done
fi
