"""Capture announce frames (RARP, ARP) from one MAC on one interface, for the network tests.

Run inside the namespace of the interface (`ip netns exec NS python tests/netcap.py IFACE
MAC SECONDS`): prints `ready` once its socket is bound, then one JSON line per frame seen
(wall-clock time, ethertype, source MAC), and exits after SECONDS or at the fifth frame.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
ANNOUNCE_TYPES = {0x8035: "rarp", 0x0806: "arp"}
MAX_FRAMES = 5


def main(iface: str, mac: str, seconds: float) -> int:
    wanted = bytes.fromhex(mac.replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    seen = 0
    while seen < MAX_FRAMES and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        frame = sock.recv(2048)
        ethertype = int.from_bytes(frame[12:14], "big")
        if frame[6:12] == wanted and ethertype in ANNOUNCE_TYPES:
            seen += 1
            print(json.dumps({"time": time.time(), "type": ANNOUNCE_TYPES[ethertype],
                              "src": mac}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
