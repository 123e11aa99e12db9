"""The pytest plugin (registered by the package's `pytest11` entry point).

- Options: --jmp-selector, --jmp-exporter/--jmp-token-file/--jmp-fingerprint (direct mode),
  --jmp-lease, --jmp-lease-wait, --jmp-duration, --jmp-client, --jmp-scope, --jmp-dev-dir,
  --jmp-bin (each also an ini key: jmp_selector, ...).
- Marker: `@pytest.mark.jmp(selector=..., scope=..., exporter=..., lease=...)`.
- Fixture `jmp_board`: the Board for the test. `JmpTest` classes get it as `self.client`
  and as a `client` fixture.
- A failing test's report gets a section per console with what the board printed during it,
  and an asciicast v2 recording of each console during the test (what the board printed,
  timed; `asciinema play` replays it), its path in a report section. What the test typed is
  recorded only with --jmp-record-input yes (a password typed at a prompt that does not echo
  must not land in a CI artifact); the files are created 0600. Passed tests leave none
  (--jmp-record all keeps every test's, none makes none; the files go to --jmp-record-dir,
  default `jmp-recordings` in the directory pytest runs in).
- Under pytest-xdist (`pytest -n 4`) each worker leases a board of its own from the same
  selector (a pool of identical boards), queueing when the pool is smaller, its place in the
  queue shown as it changes; each test's report names the board that ran it.
- Every board acquired is given back at the end of its scope, and at the end of the run
  whatever happened (a failed test, a fixture error, Ctrl-C, SIGTERM from the CI runner).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from ._cli import Jmp, JmpError
from .board import Board, BoardSpec, acquire
from .console import save_recording

SCOPES = ("session", "class", "function")

_OPTIONS = [
    # (name, help, default)
    ("selector", "label selector of the board to lease (e.g. vendor=acme,model=widget-v2); a class's exporter_selector or a jmp marker wins", None),
    ("exporter", "direct mode: the exporter's address HOST:PORT (with --jmp-token-file or JMP_TOKEN)", None),
    ("token-file", "direct mode: file with the exporter's token", None),
    ("fingerprint", "direct mode: the exporter's certificate fingerprint (default: known_exporters)", None),
    ("lease", "use this existing lease (default: JMP_LEASE)", None),
    ("lease-wait", "seconds to wait in the lab's queue for a board", "300"),
    ("duration", "how long a lease created by the plugin lasts (e.g. 30m, 2h)", "30m"),
    ("client", "client config to lease with (default: jmp's current one)", None),
    ("scope", "one board per session (default), class or function", "session"),
    ("dev-dir", "where the board's serial devices appear (default: jmp's)", None),
    ("bin", "the jmp binary (default: JMP_BIN, else jmp on PATH)", None),
    ("record", "asciicast recordings of the board's consoles: failed (of a failed test, the default), all (every test) or none", "failed"),
    ("record-dir", "where the recordings go (default: jmp-recordings in the directory pytest runs in)", None),
    ("record-input", "yes: recordings also hold what the tests typed, passwords included (default: no)", "no"),
]

RECORD = ("failed", "all", "none")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("jmp", "boards through jmp (local, direct, or leased from a lab)")
    for name, help_, default in _OPTIONS:
        key = "jmp_" + name.replace("-", "_")
        g.addoption(f"--jmp-{name}", dest=key, default=None, help=help_)
        parser.addini(key, help_, default=default)


def _opt(config: pytest.Config, name: str) -> Optional[str]:
    key = "jmp_" + name.replace("-", "_")
    v = config.getoption(key)
    if v is None:
        v = config.getini(key)
    return v or None


class _Boards:
    """Boards shared by equal specs within a scope, and everything to give back at the end."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.boards: Dict[Tuple[BoardSpec, str], Board] = {}
        self.pending: Dict[str, Optional[str]] = {}  # leases created, not yet owned by a board
        self.lock = threading.Lock()
        self._jmp: Optional[Jmp] = None

    @property
    def jmp(self) -> Jmp:
        if self._jmp is None:
            self._jmp = Jmp(_opt(self.config, "bin"))
        return self._jmp

    def get(self, spec: BoardSpec, owner: str) -> Board:
        key = (spec, owner)
        b = self.boards.get(key)
        if b is None:
            b = acquire(
                spec, self.jmp, on_lease=self._pending, open_consoles=False, on_queue=self._queue
            )
            if b.mode in ("shell", "local"):
                # The one board of this machine, whatever the spec: share its consoles.
                for other in self.boards.values():
                    if other.mode == b.mode and other.exporter == b.exporter:
                        b = other
                        break
            try:
                b.open_consoles()
            except Exception:
                b.release()
                raise
            with self.lock:
                if b.lease:
                    self.pending.pop(b.lease, None)
                self.boards[key] = b
        return b

    def _pending(self, lease: str, client: Optional[str]) -> None:
        with self.lock:
            self.pending[lease] = client

    def _queue(self, line: str) -> None:
        """What `jmp create lease` says while it waits (its place in the queue), shown at once
        past pytest's capture: on the terminal, or under xdist on the worker's stderr, which
        is the terminal's, named by the worker."""
        who = _worker(self.config)
        text = f"jmp{f' [{who}]' if who else ''}: {line}\n"
        capman = self.config.pluginmanager.getplugin("capturemanager")
        try:
            if capman is not None:
                with capman.global_and_fixture_disabled():
                    sys.stderr.write(text)
                    sys.stderr.flush()
            else:
                sys.stderr.write(text)
        except Exception:
            pass

    def release(self, owner: Optional[str] = None) -> List[str]:
        with self.lock:
            keys = [k for k in self.boards if owner is None or k[1] == owner]
            popped = [self.boards.pop(k) for k in keys]
            # A board shared by several keys (the machine's one local or shell board) goes
            # when its last key does.
            boards = []
            for b in popped:
                if all(b is not o for o in self.boards.values()) and all(b is not o for o in boards):
                    boards.append(b)
            pending = {} if owner is not None else dict(self.pending)
            if owner is None:
                self.pending.clear()
        problems: List[str] = []
        for b in boards:
            problems += b.release(raise_interrupt=False)
        for lease, client in pending.items():
            try:
                self.jmp.run(
                    ["delete", "lease", lease] + (["--client", client] if client else []),
                    timeout=30,
                    shield=True,
                )
            except JmpError as e:
                problems.append(str(e))
        # Interrupted meanwhile: everything is given back now; the interruption goes on.
        self.jmp.raise_deferred_interrupt()
        return problems


_KEY = pytest.StashKey[_Boards]()
# Per test: each board it used, the consoles' marks and when the test took the board.
_ITEM_BOARDS = pytest.StashKey[List[Tuple[Board, Dict[str, int], float]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "jmp(selector=None, scope=None, exporter=None, lease=None): the board this test needs",
    )
    record = _opt(config, "record") or "failed"
    if record not in RECORD:
        raise pytest.UsageError(f"--jmp-record {record!r}: expected one of {', '.join(RECORD)}")
    _record_input(config)
    config.stash[_KEY] = _Boards(config)
    # A CI runner cancels a job with SIGTERM: make it an interruption like Ctrl-C, so that the
    # session ends through pytest's own path and the boards are given back. Only when nobody
    # else handles SIGTERM, and only in the main thread (where signals are delivered).
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def _term(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt("SIGTERM")

            signal.signal(signal.SIGTERM, _term)


def pytest_unconfigure(config: pytest.Config) -> None:
    boards = config.stash.get(_KEY, None)
    if boards is not None:
        for p in boards.release():
            # pytest's terminal is gone by now: stderr, so a CI log shows it.
            import sys

            print(f"jmp: {p}", file=sys.stderr)


def _worker(config: pytest.Config) -> Optional[str]:
    """The pytest-xdist worker this process is (gw0, gw1, ...), or None."""
    wi = getattr(config, "workerinput", None)
    return wi.get("workerid") if isinstance(wi, dict) else None


def _spec(request: pytest.FixtureRequest) -> Tuple[BoardSpec, str]:
    config = request.config
    marker = request.node.get_closest_marker("jmp")
    mk: Dict[str, Any] = dict(marker.kwargs) if marker else {}
    if marker and marker.args and "selector" not in mk:
        mk["selector"] = marker.args[0]
    cls = request.cls
    cls_sel = None
    if cls is not None:
        cls_sel = getattr(cls, "exporter_selector", None) or getattr(cls, "selector", None)
    selector = mk.get("selector") or cls_sel or _opt(config, "selector")
    scope = mk.get("scope") or _opt(config, "scope") or "session"
    if scope not in SCOPES:
        raise pytest.UsageError(f"jmp scope {scope!r}: expected one of {', '.join(SCOPES)}")
    wait = mk.get("wait", _opt(config, "lease-wait") or "300")
    try:
        wait_s = float(wait)
    except ValueError:
        raise pytest.UsageError(f"--jmp-lease-wait {wait!r}: expected seconds") from None
    spec = BoardSpec(
        selector=selector,
        exporter=mk.get("exporter") or _opt(config, "exporter"),
        token_file=mk.get("token_file") or _opt(config, "token-file"),
        fingerprint=mk.get("fingerprint") or _opt(config, "fingerprint"),
        lease=mk.get("lease") or _opt(config, "lease"),
        wait=wait_s,
        duration=mk.get("duration") or _opt(config, "duration") or "30m",
        client=mk.get("client") or _opt(config, "client"),
        dev_dir=_opt(config, "dev-dir"),
        # A pool: under pytest-xdist every worker leases a board of its own from the selector
        # (queueing when the pool has fewer boards than workers), never another worker's.
        reuse=_worker(config) is None,
    )
    return spec, scope


def _owner(request: pytest.FixtureRequest, scope: str) -> Tuple[str, Any]:
    """Which node a board belongs to, and where to hang its release."""
    if scope == "function":
        return request.node.nodeid, request
    if scope == "class":
        node = request.node.getparent(pytest.Class)
        if node is not None:
            return node.nodeid, node
        # A module-level test function under scope=class: its module.
        node = request.node.getparent(pytest.Module) or request.session
        return node.nodeid, node
    return "", None


@pytest.fixture
def jmp_board(request: pytest.FixtureRequest) -> Board:
    """The board for this test (shared per --jmp-scope; released at the end of that scope)."""
    boards = request.config.stash[_KEY]
    spec, scope = _spec(request)
    owner, hang = _owner(request, scope)
    fresh = (spec, owner) not in boards.boards
    board = boards.get(spec, owner)
    if fresh and hang is not None:
        hang.addfinalizer(lambda: _report_problems(request.config, boards.release(owner)))
    marks = {name: c.mark() for name, c in board.consoles.items()}
    request.node.stash.setdefault(_ITEM_BOARDS, []).append((board, marks, time.time()))
    # The report names the board (JUnit XML: a property; the terminal: the -v outcome).
    request.node.user_properties.append(("jmp_board", board.exporter))
    return board


def _report_problems(config: pytest.Config, problems: List[str]) -> None:
    if problems:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            if tr is not None:
                tr.write_line(f"jmp: {p}", yellow=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    record = _opt(item.config, "record") or "failed"
    keep = record == "all" and rep.when == "call" and rep.passed
    if not rep.failed and not keep:
        return
    for board, marks, started in item.stash.get(_ITEM_BOARDS, []):
        for name, console in board.consoles.items():
            if rep.failed:
                text = console.transcript(since=marks.get(name))
                lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                if len(lines) > 400:
                    lines = [f"... ({len(lines) - 400} earlier lines)"] + lines[-400:]
                rep.sections.append(
                    (f"jmp console {board.exporter}/{name} ({rep.when})", "\n".join(lines))
                )
            if record == "none":
                continue
            rep.sections.append(
                (
                    f"jmp recording {board.exporter}/{name} ({rep.when})",
                    _record(item, board, name, console, marks.get(name), started, rep.when),
                )
            )


def _record_input(config: pytest.Config) -> bool:
    v = (_opt(config, "record-input") or "no").strip().lower()
    if v in ("yes", "true", "1", "on"):
        return True
    if v in ("no", "false", "0", "off"):
        return False
    raise pytest.UsageError(f"--jmp-record-input {v!r}: expected yes or no")


def _record(
    item: pytest.Item,
    board: Board,
    name: str,
    console: Any,
    since: Optional[int],
    started: float,
    when: str,
) -> str:
    """Writes the recording of `console` during the test; the report's line about it."""
    directory = _opt(item.config, "record-dir") or os.path.join(
        str(item.config.invocation_params.dir), "jmp-recordings"
    )
    who = _worker(item.config)
    stem = f"{item.nodeid}{'' if when == 'call' else '-' + when}-{board.exporter}-{name}"
    try:
        path = save_recording(
            directory,
            stem,
            console,
            since,
            started,
            title=f"{item.nodeid} on {board.exporter}/{name}" + (f" [{who}]" if who else ""),
            input=_record_input(item.config),
        )
    except Exception as e:  # a report hook never raises: say what went wrong instead
        return f"cannot write the recording to {directory}: {e}"
    return f"asciicast v2 recording (asciinema play FILE): {os.path.abspath(path)}"


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    """`PASSED on widget-01`: which board ran the test (a pool spreads a suite over several)."""
    if report.when != "call" or hasattr(report, "wasxfail"):
        return None
    boards = [v for k, v in getattr(report, "user_properties", ()) if k == "jmp_board"]
    if not boards:
        return None
    on = ", ".join(dict.fromkeys(boards))
    if report.passed:
        return "passed", ".", (f"PASSED on {on}", {"green": True})
    if report.failed:
        return "failed", "F", (f"FAILED on {on}", {"red": True})
    return None


class JmpTest:
    """A test class with a board: `self.client` in every test method, or a `client` argument
    (Jumpstarter's spelling). Say which board with `exporter_selector` (or `selector`), a
    `@pytest.mark.jmp(...)` marker or --jmp-selector; under `jmp shell`, after `jmp local
    start` or with --jmp-exporter, that board is used."""

    exporter_selector: Optional[str] = None
    client: Board

    @pytest.fixture(autouse=True)
    def _jmp_bind_client(self, jmp_board: Board) -> None:
        self.client = jmp_board

    @pytest.fixture(name="client")
    def _jmp_client_fixture(self, jmp_board: Board) -> Board:
        return jmp_board
