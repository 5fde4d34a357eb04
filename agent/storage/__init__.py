"""Disks: the NBD client (sans-IO protocol in nbd_proto, asyncio glue in nbd)."""
