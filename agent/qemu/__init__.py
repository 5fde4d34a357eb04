"""Everything that speaks to QEMU: QMP, VM discovery and launch, the migration-stream codec."""
