"""vmpower: a host agent for VM power management on Linux/KVM.

The package root imports nothing heavy: the guest tool (``vmpower.guest``) and the
protocol codec must import in a minimal guest without libvirt.
"""

__version__ = "0.1.0"
