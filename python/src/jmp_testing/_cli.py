"""Running the `jmp` command line: every board operation of this package goes through it, so
there is one implementation of the protocol (in jmp) and what a test does is what a person at
a shell can do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any, Dict, List, Mapping, Optional, Sequence

# jmp's exit codes (README "Exit codes"); the errors below carry them.
USAGE = 2
UNAUTHORIZED = 3
BUSY = 4
UNAVAILABLE = 5
LEASE_ENDED = 6
DEVICE_FAILED = 8
FORBIDDEN = 10
INTERRUPTED = 130


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

    def run(
        self,
        args: Sequence[str],
        timeout: float = 60.0,
        env: Optional[Mapping[str, Optional[str]]] = None,
    ) -> str:
        """Runs `jmp ARGS`; its stdout, or `JmpError` naming what failed."""
        argv = [self.binary, *args]
        e = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        try:
            p = subprocess.run(
                argv,
                env=e,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as t:
            raise JmpError(argv, None, f"no answer within {timeout:g}s {t.stderr or ''}") from None
        if p.returncode != 0:
            raise JmpError(argv, p.returncode, p.stderr)
        return p.stdout

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
