"""The ferry agent daemon: configuration, control socket, local VMs, migration jobs."""
