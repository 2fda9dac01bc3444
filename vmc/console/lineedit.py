"""A small line editor over a byte stream, for a serial terminal or a terminal in raw mode.

Keys: printable ASCII is echoed and added; Backspace (BS, 0x08) and DEL (0x7f) erase the last
character; Ctrl-U erases the line; Ctrl-C drops the line (``INTERRUPT``); Ctrl-D on an empty
line is ``END``; Tab completes (the completer's candidates: one is taken, several are listed
or their common prefix taken); CR, LF or CR LF end the line. Escape sequences (arrow keys) are
swallowed; other control bytes and non-ASCII bytes are ignored. In ``secret`` mode (the PIN)
every character is echoed as ``*``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

CRLF = b"\r\n"
BS, DEL, TAB, CR, LF, ESC = 0x08, 0x7F, 0x09, 0x0D, 0x0A, 0x1B
CTRL_C, CTRL_D, CTRL_U = 0x03, 0x04, 0x15
#: Erase one character on a terminal: back, blank, back.
RUB_OUT = b"\b \b"
#: The longest line kept; longer input is ignored (a burst of noise on the line).
MAX_LINE_CHARS = 200

Completer = Callable[[str], Sequence[str]]
"""The text so far → the candidates for the whole text (each a full replacement)."""


class Key(enum.Enum):
    INTERRUPT = "interrupt"  # Ctrl-C
    END = "end"  # Ctrl-D on an empty line


Entry = str | Key


class LineEditor:
    def __init__(self, completer: Completer | None = None) -> None:
        self.completer = completer
        self.prompt = ""
        self.secret = False
        self.text = ""
        self._after_cr = False
        self._escape = 0  # 0: none; 1: ESC seen; 2: inside "ESC [" until a final byte

    def start(self, prompt: str, *, secret: bool = False) -> bytes:
        """Begin a new line: returns the prompt to show."""
        self.prompt, self.secret, self.text = prompt, secret, ""
        return prompt.encode()

    def key(self, byte: int) -> tuple[bytes, Entry | None]:
        """One byte typed: what to echo, and the finished entry if this byte ended one."""
        after_cr, self._after_cr = self._after_cr, byte == CR
        if self._escape:
            if self._escape == 1 and byte == ord("["):
                self._escape = 2
            elif self._escape == 1 or 0x40 <= byte <= 0x7E:
                self._escape = 0
            return b"", None
        if byte == LF and after_cr:
            return b"", None  # the LF of a CR LF
        if byte in (CR, LF):
            text, self.text = self.text, ""
            return CRLF, text
        if byte in (BS, DEL):
            if not self.text:
                return b"", None
            self.text = self.text[:-1]
            return RUB_OUT, None
        if byte == CTRL_U:
            erased, self.text = len(self.text), ""
            return RUB_OUT * erased, None
        if byte == CTRL_C:
            self.text = ""
            return b"^C" + CRLF, Key.INTERRUPT
        if byte == CTRL_D:
            return (CRLF, Key.END) if not self.text else (b"", None)
        if byte == TAB:
            return self._complete(), None
        if byte == ESC:
            self._escape = 1
            return b"", None
        if 0x20 <= byte <= 0x7E and len(self.text) < MAX_LINE_CHARS:
            self.text += chr(byte)
            return (b"*" if self.secret else bytes([byte])), None
        return b"", None

    def _complete(self) -> bytes:
        if self.secret or self.completer is None:
            return b""
        candidates = sorted(set(self.completer(self.text)))
        if not candidates:
            return b""
        if len(candidates) == 1:
            return self._extend_to(candidates[0] + " ")
        common = _common_prefix(candidates)
        if len(common) > len(self.text):
            return self._extend_to(common)
        # Several, and nothing more in common: list their last words, then the line again.
        shown = "  ".join(c.rsplit(" ", 1)[-1] for c in candidates)
        return CRLF + shown.encode() + CRLF + self.prompt.encode() + self.text.encode()

    def _extend_to(self, text: str) -> bytes:
        """Replace the line by ``text``, rubbing out only what differs (``b`` → ``B1``)."""
        kept = len(_common_prefix([self.text, text]))
        out = RUB_OUT * (len(self.text) - kept) + text[kept:].encode()
        self.text = text
        return out


def _common_prefix(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]
