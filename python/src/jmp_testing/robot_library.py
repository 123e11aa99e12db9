"""The Robot Framework library (`Library    JmpLibrary`)."""

from __future__ import annotations

import html
import os
import signal
import threading
import time
from typing import Any, Optional

from robot.api import logger
from robot.api.deco import keyword, library

from ._cli import Jmp
from .board import Board, BoardSpec, acquire
from .console import save_recording


@library(scope="GLOBAL", version="0.1.0", doc_format="ROBOT")
class JmpLibrary:
    """Boards reached with jmp: on this machine (``jmp local start``), directly (an exporter
    address and token) or leased from a lab by label selector.

    ``Connect To Exporter`` picks the board: an ``exporter`` address (direct mode), else the
    board of the ``jmp shell`` the run is in, else a running ``jmp local start``, else a
    ``lease`` (or ``JMP_LEASE``), else a lease by ``selector`` (one the CI job already holds
    is used as it is). Serial keywords read the board's console through its local pty; power
    and storage keywords run ``jmp power`` and ``jmp storage`` on the attachment.

    When a test fails, the console output printed during it is written to the log, and an
    asciicast v2 recording of each console during the test (what the board printed, timed;
    ``asciinema play`` replays it; what the test typed only with ``record_input=yes``, since
    a password typed at a prompt that does not echo must not land in a CI artifact) is written
    0600 beside the log, in ``jmp-recordings`` of the output directory, and linked from the
    log. Passed tests leave
    no recording (``record=all`` keeps every test's, ``record=none`` makes none). The board
    is given back by ``Release Board``, at the end of the run, and when the run is stopped
    (Ctrl-C, SIGTERM): only what the library made is undone (an attachment it started, a
    lease it created).

    Example:

    | *** Settings ***
    | Library    JmpLibrary
    |
    | *** Test Cases ***
    | Device Boot Test
    |     Connect To Exporter    selector=vendor=acme,model=widget-v2
    |     Power On
    |     ${output}=    Read Serial Until    boot complete
    |     Should Not Be Empty    ${output}
    |     Power Off
    """

    ROBOT_LISTENER_API_VERSION = 3

    def __init__(
        self,
        jmp: Optional[str] = None,
        dev_dir: Optional[str] = None,
        record: str = "failed",
        record_dir: Optional[str] = None,
        record_input: Any = False,
    ):
        """``jmp``: the jmp binary (default: JMP_BIN, else jmp on PATH). ``dev_dir``: where
        serial devices appear (default: jmp's). ``record``: recordings of the consoles of
        ``failed`` tests (the default), ``all`` tests, or ``none``; ``record_dir``: where
        (default: ``jmp-recordings`` in the output directory); ``record_input``: also record
        what the tests typed (default: no)."""
        if record not in ("failed", "all", "none"):
            raise ValueError(f"record={record!r}: expected failed, all or none")
        self.ROBOT_LIBRARY_LISTENER = self
        self._jmp_bin = jmp
        self._dev_dir = dev_dir
        self._record = record
        self._record_dir = record_dir
        self._record_input = _bool(record_input)
        self._board: Optional[Board] = None
        self._marks: dict = {}
        self._started = time.time()
        self._pending: dict = {}
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                # Robot stops gracefully on SIGINT; make a CI runner's SIGTERM the same.
                signal.signal(signal.SIGTERM, lambda s, f: signal.raise_signal(signal.SIGINT))

    # ---------- the board ----------

    @property
    def board(self) -> Board:
        if self._board is None:
            raise RuntimeError("no board: use Connect To Exporter first")
        return self._board

    @keyword
    def connect_to_exporter(
        self,
        selector: Optional[str] = None,
        exporter: Optional[str] = None,
        token_file: Optional[str] = None,
        fingerprint: Optional[str] = None,
        lease: Optional[str] = None,
        wait: float = 300,
        duration: str = "30m",
        client: Optional[str] = None,
    ) -> str:
        """Attaches the board and returns the exporter's name.

        ``selector`` is a label selector (``vendor=acme,model=widget-v2``); ``exporter`` an
        address ``HOST:PORT`` for direct mode, with ``token_file`` (or JMP_TOKEN). ``wait`` is
        how long to queue for a lab board, in seconds; ``duration`` how long a lease made
        here lasts. A board already connected is released first.
        """
        if self._board is not None:
            self.release_board()
        spec = BoardSpec(
            selector=selector,
            exporter=exporter,
            token_file=token_file,
            fingerprint=fingerprint,
            lease=lease,
            wait=float(wait),
            duration=duration,
            client=client,
            dev_dir=self._dev_dir,
        )
        self._board = acquire(spec, Jmp(self._jmp_bin), on_lease=self._note_lease)
        if self._board.lease:
            self._pending.pop(self._board.lease, None)
        self._marks = {n: c.mark() for n, c in self._board.consoles.items()}
        self._started = time.time()
        logger.info(f"attached {self._board!r}")
        return self._board.exporter

    def _note_lease(self, lease: str, client: Optional[str]) -> None:
        self._pending[lease] = client

    @keyword
    def release_board(self) -> None:
        """Detaches the board and ends a lease this library created (a lease the pipeline
        created stays for its own ``jmp delete lease``)."""
        board, self._board = self._board, None
        if board is not None:
            for p in board.release():
                logger.warn(f"releasing {board.exporter}: {p}")
        jmp = Jmp(self._jmp_bin)
        for lease, client in list(self._pending.items()):
            self._pending.pop(lease, None)
            try:
                jmp.run(["delete", "lease", lease] + (["--client", client] if client else []), shield=True)
            except Exception as e:
                logger.warn(f"releasing lease {lease}: {e}")
        jmp.raise_deferred_interrupt()

    # ---------- power ----------

    @keyword
    def power_on(self, device: Optional[str] = None) -> None:
        """Switches the board on (``device``: the power device, default the only one)."""
        self._power(device).on()

    @keyword
    def power_off(self, device: Optional[str] = None) -> None:
        """Switches the board off."""
        self._power(device).off()

    @keyword
    def power_cycle(self, delay: Optional[float] = None, device: Optional[str] = None) -> None:
        """Off, ``delay`` seconds (default: the exporter's), on."""
        self._power(device).cycle(delay=None if delay is None else float(delay))

    @keyword
    def get_power_state(self, device: Optional[str] = None) -> str:
        """``on``, ``off``, or what the exporter's status command said."""
        return self._power(device).status()

    def _power(self, device: Optional[str]):
        d = self.board.device(device) if device else self.board.power
        if d.kind != "power":
            raise AssertionError(f"{device} is a {d.kind} device, not power")
        return d

    # ---------- serial ----------

    @keyword
    def read_serial_until(
        self,
        expected: str,
        timeout: float = 30,
        regex: bool = False,
        device: Optional[str] = None,
    ) -> str:
        """Waits until ``expected`` appears on the console and returns the output up to and
        including it (``regex=True``: a regular expression). Fails after ``timeout`` seconds,
        with the console's last lines."""
        return self._console(device).read_until(expected, timeout=float(timeout), regex=_bool(regex))

    @keyword
    def write_serial(self, text: str, device: Optional[str] = None, newline: bool = True) -> None:
        """Types ``text`` on the console, followed by Enter unless ``newline=False``."""
        c = self._console(device)
        if _bool(newline):
            c.sendline(text)
        else:
            c.write(text)

    @keyword
    def read_serial(self, timeout: float = 0, device: Optional[str] = None) -> str:
        """What the console printed that no keyword consumed yet (waiting up to ``timeout``
        seconds for something)."""
        return self._console(device).read(timeout=float(timeout))

    @keyword
    def serial_should_stay_quiet(self, seconds: float = 2, device: Optional[str] = None) -> None:
        """Fails if the console prints anything within ``seconds``."""
        c = self._console(device)
        got = c.read(timeout=float(seconds))
        if got:
            raise AssertionError(f"{c.name} printed {got[-200:]!r}")

    @keyword
    def get_serial_path(self, device: Optional[str] = None) -> str:
        """The console's local pty."""
        return self._console(device).path

    def _console(self, device: Optional[str]):
        return self.board.console_named(device) if device else self.board.serial

    # ---------- storage, forwards ----------

    @keyword
    def flash_storage(self, image: str, device: Optional[str] = None) -> None:
        """Writes ``image`` (raw, .gz, .xz, .zst; a .bmap beside it limits the write to
        mapped blocks) to the board's storage."""
        d = self.board.device(device) if device else self.board.storage
        out = d.flash(image)
        if out.strip():
            logger.info(out)

    @keyword
    def get_forward_address(self, device: str) -> str:
        """``host:port`` of the TCP forward ``device``."""
        host, port = self.board.forward(device)
        return f"{host}:{port}"

    # ---------- listener: transcripts, and the board given back ----------

    def start_test(self, data: Any, result: Any) -> None:
        if self._board is not None:
            self._marks = {n: c.mark() for n, c in self._board.consoles.items()}
            self._started = time.time()

    def end_test(self, data: Any, result: Any) -> None:
        if self._board is None:
            return
        record = self._record == "all" or (self._record == "failed" and not result.passed)
        for name, console in self._board.consoles.items():
            if not result.passed:
                text = console.transcript(since=self._marks.get(name))
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                logger.info(
                    f"console {self._board.exporter}/{name} during this test:\n{text[-20000:]}"
                )
            if record:
                self._log_recording(data, name, console)

    def _log_recording(self, test: Any, name: str, console: Any) -> None:
        """Writes the recording of `console` during `test` and links it from the log."""
        from robot.libraries.BuiltIn import BuiltIn

        out_dir = BuiltIn().get_variable_value("${OUTPUT DIR}") or os.getcwd()
        directory = self._record_dir or os.path.join(out_dir, "jmp-recordings")
        board = self.board.exporter
        # `full_name` since Robot Framework 7, `longname` before.
        test_name = getattr(test, "full_name", None) or getattr(test, "longname", None) or test.name
        try:
            path = save_recording(
                directory,
                f"{test_name}-{board}-{name}",
                console,
                self._marks.get(name),
                self._started,
                title=f"{test_name} on {board}/{name}",
                input=self._record_input,
            )
        except Exception as e:
            logger.warn(f"cannot write the recording of {board}/{name} to {directory}: {e}")
            return
        # Linked relative to the log, so the output directory can be moved or archived whole.
        rel = os.path.relpath(path, out_dir)
        logger.info(
            f'recording of console {html.escape(board)}/{html.escape(name)} during this test '
            f'(asciicast v2, <code>asciinema play</code>): <a href="{html.escape(rel)}">{html.escape(rel)}</a>',
            html=True,
        )

    def close(self) -> None:
        self.release_board()


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("false", "no", "off", "0", "")
    return bool(v)
