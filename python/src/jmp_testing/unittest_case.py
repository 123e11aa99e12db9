"""`JmpTestCase`: the pytest class's shape for `unittest` (and for pytest, which runs
unittest classes).

    import unittest
    from jmp_testing import JmpTestCase

    class TestMyDevice(JmpTestCase):
        exporter_selector = "vendor=acme,model=widget-v2"

        def test_power_cycle(self):
            self.client.power.on()
            self.client.serial.read_until("boot complete")

    if __name__ == "__main__":
        unittest.main()

unittest has no command-line plugin options, so the rest comes from the environment (each
also a class attribute, which wins):

- `JMP_SELECTOR`: the selector when the class gives none;
- `JMP_SCOPE`: `class` (default: a board per class, leased in setUpClass, given back in
  tearDownClass) or `module` (one board for the classes of a module, given back when a class
  of another module starts, or at exit);
- `JMP_LEASE_WAIT` (seconds in the lab's queue, default 300), `JMP_DURATION` (default 30m),
  `JMP_CLIENT` (client config), `JMP_LEASE`, `JMP_BIN`, `JMP_DEV_DIR`: as for the pytest plugin
  and jmp.

Where the board comes from is `jmp_testing.board`'s order (`jmp shell`, `jmp local start`, a
lease). Every board is given back on every way out: the end of its class or module, a failed
or erroring test, Ctrl-C, and SIGTERM (made an interruption like Ctrl-C when nothing else
handles it), with a last sweep at exit. A failed or erroring test's message carries what each
console printed during it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import unittest
from typing import Any, Dict, List, Optional, Tuple

from ._cli import Jmp
from .board import Board, BoardSpec, acquire

SCOPES = ("class", "module")
# Console lines a failure's message carries at most (the latest).
TRANSCRIPT_LINES = 400


def _env(name: str) -> Optional[str]:
    return os.environ.get(name) or None


class _Boards:
    """The boards this process holds, by owner (a class or a module), and the last sweep."""

    def __init__(self) -> None:
        self.boards: Dict[str, Board] = {}
        self.lock = threading.Lock()
        self.pending: Dict[str, Optional[str]] = {}  # leases created, not yet owned by a board
        self._jmp: Optional[Jmp] = None
        self._hooked = False

    def jmp(self, binary: Optional[str]) -> Jmp:
        if self._jmp is None:
            self._jmp = Jmp(binary)
        return self._jmp

    def hook(self) -> None:
        """At exit, give back whatever is left; SIGTERM becomes an interruption (in the main
        thread, when nobody else handles it), so the way out is the same as Ctrl-C's."""
        if self._hooked:
            return
        self._hooked = True
        atexit.register(self.release_all)
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                def _term(signum: int, frame: Any) -> None:
                    raise KeyboardInterrupt("SIGTERM")

                signal.signal(signal.SIGTERM, _term)

    def get(self, owner: str, spec: BoardSpec, binary: Optional[str]) -> Board:
        with self.lock:
            b = self.boards.get(owner)
        if b is not None:
            return b
        self.hook()
        b = acquire(spec, self.jmp(binary), on_lease=self._pending)
        with self.lock:
            if b.lease:
                self.pending.pop(b.lease, None)
            self.boards[owner] = b
        return b

    def _pending(self, lease: str, client: Optional[str]) -> None:
        with self.lock:
            self.pending[lease] = client

    def release(self, owner: str) -> List[str]:
        with self.lock:
            b = self.boards.pop(owner, None)
        return b.release() if b is not None else []

    def release_others(self, keep_prefix: str) -> None:
        """Module scope: the boards of modules other than the one starting now."""
        with self.lock:
            others = [o for o in self.boards if o.startswith("module:") and o != keep_prefix]
        for o in others:
            _warn(self.release(o))

    def release_all(self) -> None:
        with self.lock:
            boards = list(self.boards.values())
            self.boards.clear()
            pending = dict(self.pending)
            self.pending.clear()
        problems: List[str] = []
        for b in boards:
            problems += b.release(raise_interrupt=False)
        for lease, client in pending.items():
            try:
                self.jmp(None).run(
                    ["delete", "lease", lease] + (["--client", client] if client else []),
                    timeout=30,
                    shield=True,
                )
            except Exception as e:
                problems.append(str(e))
        _warn(problems)


def _warn(problems: List[str]) -> None:
    for p in problems:
        print(f"jmp: {p}", file=sys.stderr)


_BOARDS = _Boards()


class _Transcripts:
    """A result that passes everything on to the runner's, adding to a failed or erroring
    test's exception what the board's consoles printed during the test."""

    def __init__(self, result: Any, case: "JmpTestCase"):
        self._result = result
        self._case = case
        # Only where the runner's result has it: unittest checks for it to run subtests.
        if hasattr(result, "addSubTest"):
            self.addSubTest = self._add_sub_test

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)

    def _with_console(self, err: Any) -> Any:
        if isinstance(err, tuple) and len(err) == 3 and err[1] is not None:
            text = self._case._jmp_transcript()
            if text:
                _add_note(err[1], text)
        return err

    def addFailure(self, test: Any, err: Any) -> None:
        self._result.addFailure(test, self._with_console(err))

    def addError(self, test: Any, err: Any) -> None:
        self._result.addError(test, self._with_console(err))

    def _add_sub_test(self, test: Any, subtest: Any, err: Any) -> None:
        if err is not None:
            err = self._with_console(err)
        self._result.addSubTest(test, subtest, err)


def _add_note(exc: BaseException, text: str) -> None:
    if getattr(exc, "_jmp_console_added", False):
        return
    exc._jmp_console_added = True  # type: ignore[attr-defined]
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:
        # Python before 3.11: the message carries it.
        exc.args = (f"{exc.args[0] if exc.args else ''}\n{text}", *exc.args[1:])


class JmpTestCase(unittest.TestCase):
    """A unittest.TestCase with a board as `self.client` (a `jmp_testing.Board`: `power`,
    `serial`, `can`, `storage`, `forward(name)`). Say which board with `exporter_selector`
    (or `JMP_SELECTOR`); see the module's docstring for the rest."""

    exporter_selector: Optional[str] = None
    # Class attributes win over the environment.
    jmp_scope: Optional[str] = None
    jmp_lease_wait: Optional[float] = None
    jmp_duration: Optional[str] = None
    jmp_client: Optional[str] = None
    client: Board

    @classmethod
    def _jmp_spec(cls) -> Tuple[BoardSpec, str]:
        scope = cls.jmp_scope or _env("JMP_SCOPE") or "class"
        if scope not in SCOPES:
            raise ValueError(f"JMP_SCOPE {scope!r}: expected one of {', '.join(SCOPES)}")
        wait = cls.jmp_lease_wait if cls.jmp_lease_wait is not None else _env("JMP_LEASE_WAIT") or "300"
        try:
            wait_s = float(wait)
        except ValueError:
            raise ValueError(f"JMP_LEASE_WAIT {wait!r}: expected seconds") from None
        spec = BoardSpec(
            selector=cls.exporter_selector or getattr(cls, "selector", None) or _env("JMP_SELECTOR"),
            lease=_env("JMP_LEASE"),
            wait=wait_s,
            duration=cls.jmp_duration or _env("JMP_DURATION") or "30m",
            client=cls.jmp_client or _env("JMP_CLIENT"),
        )
        owner = f"module:{cls.__module__}" if scope == "module" else f"class:{cls.__module__}.{cls.__qualname__}"
        return spec, owner

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        spec, owner = cls._jmp_spec()
        cls._jmp_owner = owner
        if owner.startswith("module:"):
            _BOARDS.release_others(owner)
        cls.client = _BOARDS.get(owner, spec, _env("JMP_BIN"))

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            owner = cls.__dict__.get("_jmp_owner")
            if owner is not None and owner.startswith("class:"):
                _warn(_BOARDS.release(owner))
        finally:
            super().tearDownClass()

    def run(self, result: Any = None) -> Any:
        if result is None:
            return super().run(result)
        return super().run(_Transcripts(result, self))

    def setUp(self) -> None:
        super().setUp()
        client = type(self).__dict__.get("client") or getattr(self, "client", None)
        if isinstance(client, Board):
            self._jmp_marks = {n: c.mark() for n, c in client.consoles.items()}

    def _jmp_transcript(self) -> str:
        client = getattr(self, "client", None)
        marks = getattr(self, "_jmp_marks", {})
        if not isinstance(client, Board):
            return ""
        parts = []
        for name, console in client.consoles.items():
            text = console.transcript(since=marks.get(name))
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            if len(lines) > TRANSCRIPT_LINES:
                lines = [f"... ({len(lines) - TRANSCRIPT_LINES} earlier lines)"] + lines[-TRANSCRIPT_LINES:]
            parts.append(f"---- jmp console {client.exporter}/{name} during this test ----\n" + "\n".join(lines))
        return "\n".join(parts)
