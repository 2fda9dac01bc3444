"""A person at a serial terminal, for the console tests: the test holds a pty's master end and
types bytes into it; the console (the daemon's serial console on the slave end, or ``vmc
console`` with the slave as its stdin and stdout) reads them and answers.

``port`` is a symlink to the slave, the path the daemon's ``console.port`` names: a new line
(``replug``) is a new pty behind the same path, as a USB gadget port comes back."""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path

#: Failure deadline for an answer on the console: generous for a loaded 2-core CI machine; a
#: passing test waits only as long as the answer takes.
EXPECT_TIMEOUT_S = 15.0


class PtyLine:
    def __init__(self, link: Path | None = None) -> None:
        self.link = link
        self.master = -1
        self.slave_name = ""
        self.output = b""
        self._seen = 0
        self.plug()

    def plug(self) -> None:
        """A fresh pty; the link (if any) names its slave."""
        master, slave = os.openpty()
        self.master, self.slave_name = master, os.ttyname(slave)
        os.close(slave)  # the master keeps the pty alive until the console opens the slave
        self.output, self._seen = b"", 0
        if self.link is not None:
            tmp = self.link.with_suffix(".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.slave_name)
            tmp.replace(self.link)

    def drop(self) -> None:
        """The technician's end goes away (cable pulled, terminal closed)."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def type(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        os.write(self.master, data)

    def _read_some(self, timeout_s: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if ready:
            try:
                self.output += os.read(self.master, 4096)
            except OSError:  # the other end closed
                time.sleep(timeout_s)

    def expect(self, text: str, timeout_s: float = EXPECT_TIMEOUT_S) -> str:
        """Wait until ``text`` appears after what was already matched; return the output up to
        and including it (and move past it)."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout_s
        while True:
            at = self.output.find(wanted, self._seen)
            if at >= 0:
                end = at + len(wanted)
                got, self._seen = self.output[self._seen : end], end
                return got.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self.output[self._seen :].decode(errors="replace")
                raise AssertionError(f"no {text!r} on the console within {timeout_s} s: {tail!r}")
            self._read_some(min(left, 0.05))

    def close(self) -> None:
        self.drop()
