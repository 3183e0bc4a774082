"""End-to-end tests on real parts: libvirtd, a QEMU TCG guest, DPDK's guest library."""
