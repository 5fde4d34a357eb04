"""systemd without libsystemd: sd_notify (READY=1 after binding, WATCHDOG=1 while the event
loop runs, STOPPING=1 on the way out) and whether stderr goes to the journal.

Does nothing when NOTIFY_SOCKET is unset (not run by systemd with Type=notify).
"""

from __future__ import annotations

import asyncio
import os
import socket


def notify(state: str) -> bool:
    """Send one state line to systemd; True if a notify socket was there to take it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled
    advises), or None when systemd expects none of this process (WatchdogSec unset, or
    WATCHDOG_PID names another process)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def keep_watchdog_fed(interval: float) -> None:
    """WATCHDOG=1 every interval, from the event loop itself: a loop that is wedged stops
    the pings, and systemd restarts the agent."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd set up (JOURNAL_STREAM names its
    device and inode; a redirected stderr is not the journal)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False
