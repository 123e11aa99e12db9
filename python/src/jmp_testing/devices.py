"""The board's devices as a test uses them. Each is the local OS device `jmp attach` created
(a pty, a port, an interface, a mount) or a `jmp` verb on the attachment (power, storage)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from .board import Board


class Device:
    """A device as `jmp attach -o json` lists it."""

    def __init__(self, board: "Board", row: Dict[str, Any]):
        self.board = board
        self.name: str = row.get("name", "")
        self.kind: str = row.get("kind", "")
        self.state: str = row.get("state", "")
        self.reason: Optional[str] = row.get("reason")
        self.summary: Optional[str] = row.get("summary")
        self.endpoints: List[Dict[str, Any]] = list(row.get("endpoints") or [])
        self.local: str = row.get("local", "")

    def endpoint(self, type_: Optional[str] = None, role: Optional[str] = None) -> Optional[Dict[str, Any]]:
        for e in self.endpoints:
            if (type_ is None or e.get("type") == type_) and (role is None or e.get("role") == role):
                return e
        return None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.local or ''}>".replace(" >", ">")


class Forward(Device):
    """A TCP (or UDP) forward: the board's port as a local address."""

    @property
    def address(self) -> Tuple[str, int]:
        e = self.endpoint("address")
        if e is None:
            raise LookupError(f"{self.name}: no local address (state {self.state})")
        host, _, port = str(e["at"]).rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]


class Power(Device):
    """`jmp power` on this board's attachment."""

    def _call(self, verb: str, *extra: str) -> Dict[str, Any]:
        return self.board._verb(["power", verb, self.name, *extra], timeout=180)

    def status(self) -> str:
        """"on", "off" or what the exporter's status command said."""
        r = self._call("status")
        resp = (r.get("response") or {}).get("response") or {}
        return str(resp.get("state", "unknown"))

    def on(self) -> None:
        """Switches the board on. Console output printed while it was off is consumed first, so
        a wait after this sees the new boot (not the old prompt). A board already on stays
        as it is, and so does its console."""
        if self.status() != "on":
            self.board._discard_consoles()
        self._call("on")

    def off(self) -> None:
        self._call("off")

    def cycle(self, wait: Optional[float] = None, delay: Optional[float] = None) -> None:
        """Off, wait (`wait`/`delay` seconds, default the exporter's), on; the console output
        before the cycle is consumed."""
        d = wait if wait is not None else delay
        self.board._discard_consoles()
        self._call("cycle", *(["--delay", f"{d:g}s"] if d is not None else []))

    # Jumpstarter's power client spells reading the state `read()`.
    read = status


class Storage(Device):
    """The board's storage: flash and dump through `jmp storage`, and the local mount."""

    @property
    def mount(self) -> Optional[str]:
        e = self.endpoint("mount")
        return str(e["at"]) if e else None

    def flash(self, path: str, *extra: str) -> str:
        """Writes an image (raw, .gz, .xz, .zst; with a .bmap beside it, only mapped blocks)."""
        return self.board._run(["storage", "flash", self.name, str(path), *extra], timeout=3600)

    def dump(self, path: str, *extra: str) -> str:
        return self.board._run(["storage", "dump", self.name, str(path), *extra], timeout=3600)

    def info(self) -> Dict[str, Any]:
        return self.board._verb(["storage", "info", self.name], timeout=60)

    # Jumpstarter's storage client spells flashing `write_local_file`.
    write_local_file = flash


class Can(Device):
    """A CAN bus: python-can on the local front jmp created (a vcan interface, an slcan pty or
    a socketcand port)."""

    def interface(self) -> Tuple[str, Dict[str, Any]]:
        """python-can's (interface, keyword arguments) for this bus's best local front."""
        iface = self.endpoint("interface")
        if iface is not None:
            return "socketcan", {"channel": str(iface["at"])}
        cand = self.endpoint("address")
        if cand is not None:
            host, _, port = str(cand["at"]).rpartition(":")
            return "socketcand", {"host": host.strip("[]"), "port": int(port), "channel": self.name}
        slcan = self.endpoint("path")
        if slcan is not None:
            return "slcan", {"channel": str(slcan["at"])}
        raise LookupError(f"{self.name}: no local CAN front (state {self.state})")

    def bus(self, **kw: Any) -> Any:
        """A new `can.Bus` on this device (close it, or use it as a context manager)."""
        import can  # optional dependency: pip install jmp-testing[can]

        interface, args = self.interface()
        args.update(kw)
        return can.Bus(interface=interface, **args)


class Network(Device):
    """The board's network: a TUN interface routing its subnets (attach as root), or a SOCKS5
    proxy that reaches them by name (without root, `jmp attach --socks`)."""

    @property
    def interface(self) -> Optional[str]:
        e = self.endpoint("interface")
        return str(e["at"]) if e else None

    @property
    def socks(self) -> Optional[Tuple[str, int]]:
        e = self.endpoint("address", role="socks")
        if e is None:
            return None
        host, _, port = str(e["at"]).rpartition(":")
        return host.strip("[]"), int(port)


KINDS = {
    "tcp": Forward,
    "udp": Forward,
    "power": Power,
    "storage": Storage,
    "can": Can,
    "network": Network,
}
