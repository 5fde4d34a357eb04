"""Asyncio glue that carries the sans-IO wire protocol over real sockets."""
