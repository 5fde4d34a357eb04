"""Bringing VMs from other hypervisors: their configurations read into a ferry VM
definition (`definition.py`), their disks copied through QEMU's block layer."""
