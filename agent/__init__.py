"""ferry: live migration of QEMU/KVM virtual machines between hosts."""

__version__ = "0.1.0"
