"""Test-only helpers around agent.localpair: a link the tests can cut."""

from __future__ import annotations

import contextlib
import socket

from agent.localpair import AgentPair, pid_alive, read_guest

__all__ = ["AgentPair", "CuttableProxy", "pid_alive", "read_guest"]


class CuttableProxy:
    """A TCP forwarder between the agents whose connections a test can cut at will."""

    def __init__(self, target_port: int) -> None:
        import threading
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stalled: set[int] = set()   # ids of sockets that forward nothing any more
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:   # the agent behind is gone: refuse this one as it would
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import time
        try:
            while data := src.recv(1 << 16):
                while id(src) in self._stalled:   # a stalled link: hold the bytes forever
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Reset every connection at once, as a failed link would."""
        with self._lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                with contextlib.suppress(OSError):   # not connected any more: fine
                    # shutdown wakes the pump blocked in recv; close alone would not.
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()

    def stall(self) -> None:
        """Stop forwarding on every open connection, leaving them open: a link that looks
        alive to TCP but carries nothing. New connections work."""
        with self._lock:
            self._stalled |= {id(sock) for sock in self.sockets}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()
        self._stalled.clear()
        self.cut()
