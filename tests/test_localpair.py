"""free_port: ports the kernel will not hand to anyone else meanwhile, never twice."""

from __future__ import annotations

import socket

import pytest

from agent import localpair


def test_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    low = localpair._ephemeral_low()
    ports = [localpair.free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    assert all(localpair.PORT_FLOOR <= port < low for port in ports)


class Scripted:
    """Stands in for the port picker's random source: yields the given ports in order."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)

    def randrange(self, start: int, stop: int) -> int:
        port = self.ports.pop(0)
        assert start <= port < stop
        return port


def unhanded_ports() -> list[int]:
    """The first two ports in free_port's range that it has not handed out yet."""
    ports = (port for port in range(localpair.PORT_FLOOR, localpair._ephemeral_low())
             if port not in localpair._handed_out)
    return [next(ports), next(ports)]


def test_a_port_in_use_or_already_handed_out_is_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    given = localpair.free_port()
    busy, fresh = unhanded_ports()
    with socket.socket() as listener:
        listener.bind((localpair.LOOPBACK, busy))
        listener.listen()
        monkeypatch.setattr(localpair, "_random", Scripted(given, busy, fresh))
        assert localpair.free_port() == fresh
