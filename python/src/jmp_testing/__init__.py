"""Tests against boards reached with jmp: the same test code against a board on your desk
(`jmp local start`), one reached directly (an exporter address and token) or one leased from
a lab by label selector.

    from jmp_testing import JmpTest

    class TestMyDevice(JmpTest):
        exporter_selector = "vendor=acme,model=widget-v2"

        def test_power_cycle(self):
            self.client.power.on()
            assert self.client.serial.read_until("boot complete") is not None
            self.client.power.off()

With unittest (`python -m unittest`, or under pytest): `class TestMyDevice(JmpTestCase)`, the
same shape, configured by environment variables (see `jmp_testing.unittest_case`).

Outside pytest: `with jmp_testing.connect(selector="board=rpi4") as board: ...`.
Everything goes through the `jmp` command line and the local devices it creates.
"""

from ._cli import Jmp, JmpError, JmpNotFound
from .board import Board, BoardSpec, NoBoard, acquire
from .console import Console, ConsoleClosed, ConsoleTimeout
from .devices import Can, Device, Forward, Network, Power, Storage
from .unittest_case import JmpTestCase

__all__ = [
    "Board",
    "BoardSpec",
    "Can",
    "Console",
    "ConsoleClosed",
    "ConsoleTimeout",
    "Device",
    "Forward",
    "Jmp",
    "JmpError",
    "JmpNotFound",
    "JmpTest",
    "JmpTestCase",
    "Network",
    "NoBoard",
    "Power",
    "Storage",
    "acquire",
    "connect",
]


def connect(**kw) -> Board:
    """A board as `BoardSpec(**kw)` says (see `jmp_testing.board` for the order of sources);
    use it as a context manager, or call `release()`."""
    return acquire(BoardSpec(**kw))


def __getattr__(name):
    # JmpTest imports pytest: only when asked for, so the Robot library does not need pytest.
    if name == "JmpTest":
        from .pytest_plugin import JmpTest

        return JmpTest
    raise AttributeError(name)
