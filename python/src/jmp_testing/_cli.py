"""Running the `jmp` command line: every board operation of this package goes through it, so
there is one implementation of the protocol (in jmp) and what a test does is what a person at
a shell can do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# jmp's exit codes (README "Exit codes"); the errors below carry them.
USAGE = 2
UNAUTHORIZED = 3
BUSY = 4
UNAVAILABLE = 5
LEASE_ENDED = 6
DEVICE_FAILED = 8
FORBIDDEN = 10
INTERRUPTED = 130

# How long an interrupted jmp gets to finish what it does on SIGINT (withdraw a waiting lease
# request, end an attachment under way) before it is killed.
INTERRUPT_GRACE = 15.0


class JmpError(Exception):
    """A jmp command failed: its arguments, exit code and what it said on stderr."""

    def __init__(self, argv: Sequence[str], code: Optional[int], stderr: str):
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr.strip()
        what = " ".join(self.argv[1:3])
        super().__init__(
            f"jmp {what} failed (exit {code}): {self.stderr or 'no message'}"
        )


class JmpNotFound(JmpError):
    """The jmp binary is not installed where we looked."""

    def __init__(self, where: str):
        Exception.__init__(
            self,
            f"cannot find the jmp command ({where}); install it, put it on PATH, "
            "or set JMP_BIN / --jmp-bin",
        )
        self.argv, self.code, self.stderr = [], None, ""


def find_jmp(explicit: Optional[str] = None) -> str:
    """The jmp binary: `explicit`, else $JMP_BIN, else `jmp` on PATH."""
    cand = explicit or os.environ.get("JMP_BIN")
    if cand:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
        found = shutil.which(cand)
        if found:
            return found
        raise JmpNotFound(cand)
    found = shutil.which("jmp")
    if not found:
        raise JmpNotFound("not on PATH")
    return found


class Jmp:
    """Runs jmp subcommands with a given environment."""

    def __init__(self, binary: Optional[str] = None, env: Optional[Mapping[str, str]] = None):
        self.binary = find_jmp(binary)
        self.env = dict(os.environ if env is None else env)
        # An interruption that arrived during a call that gives something back (`shield`),
        # kept for `raise_deferred_interrupt` once everything is given back.
        self._interrupted = False

    def run(
        self,
        args: Sequence[str],
        timeout: float = 60.0,
        env: Optional[Mapping[str, Optional[str]]] = None,
        shield: bool = False,
    ) -> str:
        """Runs `jmp ARGS`; its stdout, or `JmpError` naming what failed.

        Interrupted (KeyboardInterrupt: Ctrl-C, or the SIGTERM the pytest plugin turns into
        one), jmp gets the SIGINT a terminal would have sent it and `INTERRUPT_GRACE` seconds to
        act on it (a waiting `create lease` withdraws its request) before it is killed; then the
        interruption goes on. With `shield` (a call that gives something back: detach, delete
        lease), jmp runs in its own session, out of reach of the terminal's Ctrl-C, and to its
        end whatever arrives meanwhile; the interruption is kept for
        `raise_deferred_interrupt`."""
        argv = [self.binary, *args]
        e = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        with subprocess.Popen(
            argv,
            env=e,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=shield,
        ) as p:
            out, err = self._communicate(p, argv, timeout, shield)
        if p.returncode != 0:
            raise JmpError(argv, p.returncode, err)
        return out

    def _communicate(
        self, p: subprocess.Popen, argv: List[str], timeout: float, shield: bool
    ) -> Tuple[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                raise JmpError(argv, None, f"no answer within {timeout:g}s {err or ''}") from None
            except KeyboardInterrupt:
                if shield:
                    self._interrupted = True
                    continue
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
                try:
                    p.communicate(timeout=INTERRUPT_GRACE)
                except BaseException:
                    p.kill()
                    p.wait()
                raise

    def raise_deferred_interrupt(self) -> None:
        """Raises the KeyboardInterrupt that arrived during a shielded call, if one did."""
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt("interrupted while giving the board back")

    def json(self, args: Sequence[str], **kw: Any) -> Any:
        """Runs a command with `-o json` output and parses its one JSON document."""
        out = self.run(args, **kw)
        try:
            return json.loads(out)
        except ValueError as e:
            raise JmpError([self.binary, *args], 0, f"unreadable JSON output: {e}: {out[:200]!r}")

    def status(self) -> List[Dict[str, Any]]:
        """`jmp status -o json`: the attachments on this machine."""
        s = self.json(["status", "-o", "json"], timeout=15)
        return s if isinstance(s, list) else []
