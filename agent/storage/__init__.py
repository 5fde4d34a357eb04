"""Disks: the NBD client (nbd_proto: the protocol without I/O; nbd: its asyncio glue) and
the code that moves disk blocks with it."""
