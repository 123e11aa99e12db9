"""A serial console as a test sees it: the board's pty read by pyserial in a background thread,
so that everything the board printed is kept (the transcript a failing test's report shows)
while the test waits for what it expects.

Reading is by position: each wait starts where the previous one stopped, and what it returns
is consumed. Output is kept as bytes and searched as bytes, so a multi-byte character split
across reads never breaks a match.

Each chunk read is kept with the time it arrived, and each write with the time it was made,
so a stretch of the session can be written out as an asciicast v2 recording (`asciicast`):
the test integrations attach one to the report of a failed test. What was written is left
out of recordings unless asked for (`input=True`): the board's echo already shows visible
typing, and a password typed at a prompt that does not echo must not end up in a file that
CI uploads. Recording files are created new and readable by their owner alone (0600).
"""

from __future__ import annotations

import codecs
import collections
import json
import re
import threading
import time
from typing import Deque, List, Optional, Pattern, Tuple, Union

import serial

PatternLike = Union[str, bytes, Pattern]


class ConsoleTimeout(AssertionError):
    """What was waited for did not appear in time. Carries the console's last lines, so the
    failure says what the board printed instead."""

    def __init__(self, console: str, pattern: str, timeout: float, tail: str):
        self.console = console
        self.pattern = pattern
        self.timeout = timeout
        self.tail = tail
        shown = tail if tail.strip() else "(nothing)"
        super().__init__(
            f"{console}: {pattern} did not appear within {timeout:g}s; "
            f"the console's last lines:\n{shown}"
        )


class ConsoleClosed(ConnectionError):
    """The console's pty went away (the attachment ended)."""


def _regex(pattern: PatternLike, regex: bool) -> Pattern:
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, str):
            return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
        return pattern
    raw = pattern.encode() if isinstance(pattern, str) else bytes(pattern)
    return re.compile(raw if regex else re.escape(raw))


def _describe(pattern: PatternLike, regex: bool) -> str:
    if isinstance(pattern, re.Pattern):
        return f"/{pattern.pattern!s}/"
    if isinstance(pattern, bytes):
        pattern = pattern.decode(errors="replace")
    return f"/{pattern}/" if regex else repr(pattern)


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


class Console:
    """One serial console of a board.

    `read_until`, `expect` and `read` consume output; `transcript` and `tail` only look.
    """

    def __init__(
        self,
        name: str,
        path: str,
        baudrate: int = 115200,
        newline: str = "\r",
        keep: int = 4 << 20,
    ):
        self.name = name
        self.path = path
        self.newline = newline
        self._keep = keep
        self._port = serial.Serial(path, baudrate=baudrate, timeout=0.05)
        self._cond = threading.Condition()
        self._data = bytearray()
        self._base = 0  # absolute offset of _data[0] (older output was dropped)
        self._pos = 0  # absolute offset of the first unconsumed byte
        self._error: Optional[BaseException] = None
        self._stop = False
        # (absolute offset where a chunk starts, wall-clock time it arrived): the times of the
        # output for recordings. Bounded; output older than the oldest entry takes its time.
        self._chunks: Deque[Tuple[int, float]] = collections.deque(maxlen=1 << 16)
        # (wall-clock time, bytes) of what was written to the board, bounded alike.
        self._typed: Deque[Tuple[float, bytes]] = collections.deque(maxlen=1 << 12)
        # pexpect's names for the last match: text before it and the match itself.
        self.before = ""
        self.after = ""
        self.match: Optional[re.Match] = None
        self._thread = threading.Thread(target=self._reader, name=f"jmp console {name}", daemon=True)
        self._thread.start()

    # ---------- the reader ----------

    def _reader(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            try:
                chunk = self._port.read(65536)
            except Exception as e:  # the pty vanished: say so to whoever waits
                with self._cond:
                    if not self._stop:
                        self._error = e
                    self._cond.notify_all()
                return
            if not chunk:
                continue
            with self._cond:
                self._chunks.append((self._base + len(self._data), time.time()))
                self._data += chunk
                over = len(self._data) - self._keep
                if over > 0:
                    del self._data[:over]
                    self._base += over
                    self._pos = max(self._pos, self._base)
                self._cond.notify_all()

    # ---------- positions ----------

    def mark(self) -> int:
        """The current end of the output, for `transcript(since=...)`."""
        with self._cond:
            return self._base + len(self._data)

    def discard(self) -> str:
        """Consumes everything printed so far; returns it. A later wait only sees newer output."""
        with self._cond:
            end = self._base + len(self._data)
            got = bytes(self._data[self._pos - self._base :])
            self._pos = end
            return _text(got)

    # ---------- reading ----------

    def read_until(
        self,
        expected: PatternLike,
        timeout: float = 30.0,
        regex: bool = False,
    ) -> str:
        """Waits until `expected` (text, or a regex with `regex=True` or a compiled pattern)
        appears in output not yet consumed; returns that output up to the end of the match
        and consumes it. Raises `ConsoleTimeout` with the last lines printed."""
        m = self._wait(_regex(expected, regex), _describe(expected, regex), timeout)
        return self.before + self.after

    def expect(self, pattern: PatternLike, timeout: float = 30.0) -> re.Match:
        """pexpect style: waits for the regex `pattern`; returns the match (on the text, as
        bytes) and sets `before`/`after`."""
        return self._wait(_regex(pattern, True), _describe(pattern, True), timeout)

    def _wait(self, rx: Pattern, what: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = self._pos - self._base
                m = rx.search(self._data, start)
                if m:
                    self.before = _text(self._data[start : m.start()])
                    self.after = _text(m.group(0))
                    self.match = m
                    self._pos = self._base + m.end()
                    return m
                if self._error is not None:
                    raise ConsoleClosed(f"{self.name}: the console closed ({self._error}) before {what} appeared")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(self.name, what, timeout, self._tail_locked(20))
                self._cond.wait(left)

    def read(self, timeout: float = 0.0) -> str:
        """What is unconsumed now, waiting up to `timeout` for at least one byte."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pos - self._base >= len(self._data):
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    return ""
                self._cond.wait(left)
            got = bytes(self._data[self._pos - self._base :])
            self._pos = self._base + len(self._data)
            return _text(got)

    def quiet_for(self, seconds: float, timeout: float = 30.0) -> bool:
        """Waits until the console printed nothing for `seconds` (True), or `timeout` passed
        while it kept printing (False). Consumes nothing."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                end = self._base + len(self._data)
                quiet_until = time.monotonic() + seconds
                while time.monotonic() < quiet_until:
                    self._cond.wait(quiet_until - time.monotonic())
                    if self._base + len(self._data) != end or self._error is not None:
                        break
                else:
                    return True
                if time.monotonic() >= deadline:
                    return False

    # ---------- writing ----------

    def write(self, data: Union[str, bytes]) -> None:
        """Writes text (UTF-8) or bytes to the board, as typed; no newline added."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        with self._cond:
            self._typed.append((time.time(), raw))
        self._port.write(raw)
        self._port.flush()

    def sendline(self, line: Union[str, bytes] = "") -> None:
        """Writes `line` and the console's newline (a carriage return, as a terminal's Enter
        key sends, unless the board was configured otherwise)."""
        raw = line.encode() if isinstance(line, str) else bytes(line)
        self.write(raw + self.newline.encode())

    # ---------- looking back ----------

    def transcript(self, since: Optional[int] = None) -> str:
        """Everything kept (the last few MiB), or what came after `mark()` returned `since`."""
        with self._cond:
            start = 0 if since is None else max(0, since - self._base)
            return _text(bytes(self._data[start:]))

    def asciicast(
        self,
        since: Optional[int] = None,
        started: Optional[float] = None,
        title: str = "",
        input: bool = False,
    ) -> str:
        """An asciicast v2 recording (`asciinema play` replays it) of what the board printed
        after `mark()` returned `since` ("o" events) and, with `input=True` only, what was
        written to it from `started` (wall-clock seconds, default: when that output began) on
        ("i" events), each at the time this reader saw it, in seconds since `started`."""
        with self._cond:
            base = self._base
            end = base + len(self._data)
            start = base if since is None else min(max(base, since), end)
            data = bytes(self._data[start - base :])
            chunks = list(self._chunks)
            typed = list(self._typed)
        # Each stretch of output [from, to) with the time its first byte arrived.
        spans: List[Tuple[float, int, int]] = []
        for i, (off, t) in enumerate(chunks):
            nxt = chunks[i + 1][0] if i + 1 < len(chunks) else end
            lo, hi = max(off, start), min(nxt, end)
            if hi > lo:
                spans.append((t, lo, hi))
        if spans and spans[0][1] > start:
            # Older than the oldest time kept: it takes that time.
            spans.insert(0, (spans[0][0], start, spans[0][1]))
        elif not spans and data:
            spans.append((time.time(), start, end))
        t0 = started if started is not None else (spans[0][0] if spans else time.time())
        events: List[Tuple[float, str, bytes]] = [(t, "o", data[lo - start : hi - start]) for t, lo, hi in spans]
        if input:
            events += [(t, "i", raw) for t, raw in typed if t >= t0]
        events.sort(key=lambda e: e[0])  # stable: output and input each stay in order
        decoders = {k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in "oi"}
        header = {
            "version": 2,
            "width": 80,
            "height": 24,
            "timestamp": int(t0),
            "title": title or f"jmp console {self.name}",
        }
        lines = [json.dumps(header)]
        last = 0.0
        for t, kind, raw in events:
            text = decoders[kind].decode(raw)
            if not text:
                continue
            last = max(last, round(t - t0, 6))
            lines.append(json.dumps([last, kind, text]))
        for kind, d in decoders.items():
            rest = d.decode(b"", final=True)
            if rest:
                lines.append(json.dumps([last, kind, rest]))
        return "\n".join(lines) + "\n"

    def tail(self, lines: int = 20) -> str:
        with self._cond:
            return self._tail_locked(lines)

    def _tail_locked(self, lines: int) -> str:
        # Enough bytes for `lines` long lines; the pty's \r\n shown as plain newlines.
        chunk = _text(bytes(self._data[-lines * 256 :]))
        rows = chunk.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "\n".join(rows[-lines:])

    # ---------- lifetime ----------

    @property
    def port(self) -> serial.Serial:
        """The pyserial object (baud rate, modem lines). Reading from it directly competes
        with the transcript reader: use `release()` to read the pty yourself."""
        return self._port

    def release(self) -> str:
        """Stops reading and closes the pty; returns its path for a tool of your own."""
        self.close()
        return self.path

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=2)
        try:
            self._port.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Console({self.name!r}, {self.path!r})"


def save_recording(
    directory: str,
    stem: str,
    console: Console,
    since: Optional[int],
    started: Optional[float],
    title: str = "",
    input: bool = False,
) -> str:
    """Writes `console.asciicast(since, started, title, input)` to `directory` (made if
    missing, 0700 when made) as `STEM.cast`, the stem reduced to safe characters, never over
    an earlier file or a link planted at the name (`STEM-2.cast` then); the file is created
    0600, before anything is written to it. Returns the path."""
    import os

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "recording"
    safe = safe[:150]
    os.makedirs(directory, mode=0o700, exist_ok=True)
    text = console.asciicast(since=since, started=started, title=title, input=input)
    n = 1
    while True:
        path = os.path.join(directory, f"{safe}{'' if n == 1 else f'-{n}'}.cast")
        try:
            # O_EXCL: never an existing file, nor a symlink's target. The mode is given at
            # creation (the umask can only take bits away), so no moment is the file readable
            # by others.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            n += 1
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
