"""A board for a test: where it comes from, its devices, and giving it back.

Where the board comes from, first match wins:

1. an exporter address given explicitly (direct mode, with its token): attached here;
2. the board of the `jmp shell` this runs in (`JMP_EXPORTER` names an attachment);
3. the board of a running `jmp local start`;
4. a lease named explicitly (or `JMP_LEASE`): attached here;
5. a lease by label selector: a matching lease this CI job (outside CI: this client) already
   holds is used as it is, else one is created (queueing up to `wait` seconds);
6. no selector at all: the lease this CI job (outside CI: this client's only lease) holds.

Only what was made here is undone by `release()`: an attachment started here is detached, a
lease created here is deleted. A lease the pipeline created stays for its own `jmp delete
lease`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from ._cli import Jmp, JmpError
from .console import Console
from .devices import KINDS, Can, Device, Forward, Power, Storage

log = logging.getLogger("jmp_testing")


class NoBoard(LookupError):
    """Nothing says which board to use."""


@dataclasses.dataclass(frozen=True)
class BoardSpec:
    """What a test asks for. Frozen: boards are shared by equal specs within a scope."""

    selector: Optional[str] = None
    exporter: Optional[str] = None
    token_file: Optional[str] = None
    fingerprint: Optional[str] = None
    lease: Optional[str] = None
    wait: float = 300.0
    duration: str = "30m"
    client: Optional[str] = None
    dev_dir: Optional[str] = None
    name: Optional[str] = None
    # Use a matching lease this job (or client) already holds (`create lease --reuse`). Off for
    # a pool's workers: each leases a board of its own from the same selector.
    reuse: bool = True


class Board:
    """A board attached to this machine. Devices by kind (`serial`, `power`, `can`, `storage`)
    or by name (`board.device("ssh")`, `board["ssh"]`, `board.console` for a device named
    console)."""

    def __init__(self, jmp: Jmp, ready: Dict[str, Any], mode: str, spec: BoardSpec):
        self.jmp = jmp
        self.mode = mode  # direct, shell, local, lease
        self.spec = spec
        self.exporter: str = ready.get("exporter", "")
        self.fingerprint: str = ready.get("fingerprint", "")
        self.lease: Optional[str] = ready.get("lease")
        self.devices: Dict[str, Device] = {}
        self.consoles: Dict[str, Console] = {}
        self._owns_attachment = False
        self._owns_lease = False
        self._released = False
        self._lock = threading.Lock()
        for row in ready.get("devices") or []:
            cls = KINDS.get(row.get("kind", ""), Device)
            d = cls(self, row)
            self.devices[d.name] = d

    # ---------- opening ----------

    def open_consoles(self) -> None:
        """Starts reading every serial console (so the transcript has the boot log)."""
        for d in self.devices.values():
            if d.kind == "serial" and d.name not in self.consoles:
                e = d.endpoint("path")
                if e is not None and d.state == "available":
                    self.consoles[d.name] = Console(d.name, str(e["at"]))

    # ---------- devices ----------

    def _first(self, kind: str, cls: type = Device) -> Any:
        for d in self.devices.values():
            if d.kind == kind:
                return d
        raise LookupError(
            f"{self.exporter} has no {kind} device (it has: {', '.join(self.devices) or 'none'})"
        )

    def device(self, name: str) -> Device:
        try:
            return self.devices[name]
        except KeyError:
            raise LookupError(
                f"{self.exporter} has no device {name!r} (it has: {', '.join(self.devices) or 'none'})"
            ) from None

    __getitem__ = device

    def __getattr__(self, attr: str) -> Any:
        # Device names as attributes (`board.console`, `board.ssh_debug` for ssh-debug).
        if attr.startswith("_"):
            raise AttributeError(attr)
        devices = self.__dict__.get("devices") or {}
        for name in (attr, attr.replace("_", "-")):
            if name in devices:
                d = devices[name]
                return self.console_named(name) if d.kind == "serial" else d
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('exporter')!r} has no device or attribute {attr!r}")

    def console_named(self, name: str) -> Console:
        if name not in self.consoles:
            d = self.device(name)
            if d.kind != "serial":
                raise LookupError(f"{name} is a {d.kind} device, not a serial console")
            e = d.endpoint("path")
            if e is None:
                raise LookupError(f"{name}: no local pty (state {d.state})")
            self.consoles[name] = Console(name, str(e["at"]))
        return self.consoles[name]

    @property
    def serial(self) -> Console:
        """The first serial console."""
        return self.console_named(self._first("serial").name)

    @property
    def power(self) -> Power:
        return self._first("power")

    @property
    def storage(self) -> Storage:
        return self._first("storage")

    @property
    def can(self) -> Any:
        """A python-can Bus on the first CAN device (opened once; closed at release)."""
        c: Can = self._first("can")
        bus = self.__dict__.get("_can_bus")
        if bus is None:
            bus = c.bus()
            self.__dict__["_can_bus"] = bus
        return bus

    def forward(self, name: str) -> tuple:
        """(host, port) of the TCP/UDP forward `name`."""
        d = self.device(name)
        if not isinstance(d, Forward):
            raise LookupError(f"{name} is a {d.kind} device, not a forward")
        return d.address

    # ---------- verbs on this attachment ----------

    def _scoped_env(self) -> Dict[str, Optional[str]]:
        # The attachment is named by --exporter; a direct-mode token in the environment would
        # turn that name into an address, and a lease variable is not needed.
        return {"JMP_TOKEN": None, "JMP_TOKEN_FILE": None, "JMP_LEASE": None}

    def _run(self, args: List[str], timeout: float = 60.0) -> str:
        return self.jmp.run([*args, "--exporter", self.exporter], timeout=timeout, env=self._scoped_env())

    def _verb(self, args: List[str], timeout: float = 60.0) -> Dict[str, Any]:
        r = self.jmp.json([*args, "--exporter", self.exporter, "-o", "json"], timeout=timeout, env=self._scoped_env())
        return r if isinstance(r, dict) else {}

    def _discard_consoles(self) -> None:
        for c in self.consoles.values():
            c.discard()

    # ---------- giving it back ----------

    def release(self, raise_interrupt: bool = True) -> List[str]:
        """Closes the consoles, detaches what was attached here, deletes a lease created here.
        Returns the problems met (each step is tried regardless). An interruption (Ctrl-C,
        SIGTERM) meanwhile does not stop giving the board back: it is raised once the board is
        given back (with `raise_interrupt`; else the caller raises it, `Jmp.raise_deferred_interrupt`,
        after giving back everything else)."""
        with self._lock:
            if self._released:
                return []
            self._released = True
        problems: List[str] = []
        bus = self.__dict__.pop("_can_bus", None)
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as e:
                problems.append(f"closing the CAN bus: {e}")
        for c in self.consoles.values():
            c.close()
        if self._owns_attachment:
            try:
                self.jmp.run(["detach", self.exporter], timeout=30, shield=True)
            except JmpError as e:
                problems.append(str(e))
        if self._owns_lease and self.lease:
            try:
                self.jmp.run(
                    ["delete", "lease", self.lease, *self._client_args()], timeout=30, shield=True
                )
            except JmpError as e:
                problems.append(str(e))
        for p in problems:
            log.warning("releasing %s: %s", self.exporter, p)
        if raise_interrupt:
            self.jmp.raise_deferred_interrupt()
        return problems

    def _client_args(self) -> List[str]:
        return ["--client", self.spec.client] if self.spec.client else []

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        lease = f" lease {self.lease}" if self.lease else ""
        return f"<Board {self.exporter} ({self.mode}{lease}): {', '.join(self.devices)}>"


def _attach_args(spec: BoardSpec) -> List[str]:
    a: List[str] = []
    if spec.dev_dir:
        a += ["--dev-dir", spec.dev_dir]
    if spec.name:
        a += ["--name", spec.name]
    return a


def _attached(jmp: Jmp, spec: BoardSpec, args: List[str], mode: str) -> Board:
    # The attachment belongs to this process (`--owner-pid`): it ends when this test run ends,
    # however it ends. A run killed before it can release anything (SIGKILL of a cancelled CI
    # job) then leaves no attachment holding the board, and its lease ends as idle.
    owner = ["--owner-pid", str(os.getpid())]
    ready = jmp.json(["attach", *args, *_attach_args(spec), "-d", *owner, "-o", "json"], timeout=120)
    b = Board(jmp, ready, mode, spec)
    b._owns_attachment = True
    return b


def acquire(
    spec: BoardSpec,
    jmp: Optional[Jmp] = None,
    on_lease=None,
    open_consoles: bool = True,
    on_queue: Optional[Callable[[str], None]] = None,
) -> Board:
    """The board `spec` means (see the module's docstring for the order). `on_lease` is called
    with a lease's name as soon as one is created, before it is attached, so that an
    interruption in between still releases it. With `open_consoles`, the consoles are read
    from now on (one reader per pty: a second Board on the same attachment would split its
    output, so a caller that may already hold one opens them itself). `on_queue` is told what
    `jmp create lease` says while it waits (its place in the lab's queue)."""
    jmp = jmp or Jmp()
    if spec.exporter:
        args = ["--exporter", spec.exporter]
        if spec.token_file:
            args += ["--token-file", spec.token_file]
        if spec.fingerprint:
            args += ["--fingerprint", spec.fingerprint]
        board = _attached(jmp, spec, args, "direct")
    else:
        board = _existing(jmp) or _leased(jmp, spec, on_lease, on_queue)
    if open_consoles:
        try:
            board.open_consoles()
        except Exception:
            board.release()
            raise
    log.info("using %r", board)
    return board


def _existing(jmp: Jmp) -> Optional[Board]:
    """The board of the `jmp shell` we run in, else of a running `jmp local start`."""
    inside = jmp.env.get("JMP_EXPORTER")
    attachments = jmp.status()
    if inside:
        for a in attachments:
            if a.get("exporter") == inside:
                return Board(jmp, a, "shell", BoardSpec())
    for a in attachments:
        if a.get("local"):
            return Board(jmp, a, "local", BoardSpec())
    return None


def _jobs_lease(jmp: Jmp, spec: BoardSpec) -> Board:
    """No selector and no lease named: the lease this CI job (outside CI: this client) holds,
    as every `jmp` command finds it (the recipe's `jmp create lease`, then the tests). It is
    the pipeline's: only the attachment made here is undone."""
    held = [a for a in jmp.status() if a.get("lease")]
    if len(held) == 1:
        return Board(jmp, held[0], "lease", spec)
    args = ["--client", spec.client] if spec.client else []
    try:
        return _attached(jmp, spec, args, "lease")
    except JmpError as e:
        raise NoBoard(
            "no board to test: this job holds no lease to use "
            f"({e}); give a selector (exporter_selector on the class, "
            "@pytest.mark.jmp(selector=...), --jmp-selector), an exporter address "
            "(--jmp-exporter with --jmp-token-file), or run the tests under `jmp shell` "
            "or after `jmp local start`"
        ) from e


def _leased(jmp: Jmp, spec: BoardSpec, on_lease, on_queue=None) -> Board:
    name = spec.lease or jmp.env.get("JMP_LEASE") or None
    created = False
    if name is None:
        if not spec.selector:
            return _jobs_lease(jmp, spec)
        args = ["create", "lease", "--selector", spec.selector, "--duration", spec.duration]
        args += ["--wait", str(int(spec.wait)), "-o", "json"]
        if spec.reuse:
            args.append("--reuse")
        if spec.client:
            args += ["--client", spec.client]
        lease = jmp.json(args, timeout=spec.wait + 60, on_stderr=on_queue)
        name = lease["name"]
        created = not lease.get("reused", False)
        if created and on_lease is not None:
            on_lease(name, spec.client)
    try:
        # A lease already attached on this machine (the pipeline's own `jmp attach -d`); one
        # created just now cannot be.
        existing = [] if created else [a for a in jmp.status() if a.get("lease") == name]
        if existing:
            b = Board(jmp, existing[0], "lease", spec)
        else:
            args = ["--lease", name] + (["--client", spec.client] if spec.client else [])
            b = _attached(jmp, spec, args, "lease")
    except BaseException:
        if created:
            try:
                jmp.run(
                    ["delete", "lease", name] + (["--client", spec.client] if spec.client else []),
                    timeout=30,
                    shield=True,
                )
            except JmpError as e:
                log.warning("releasing lease %s: %s", name, e)
        raise
    b.lease = name
    b._owns_lease = created
    return b
