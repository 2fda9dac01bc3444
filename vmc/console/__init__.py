"""The technician console: PIN login with lockout, a line editor, the command table, and the
serial line and terminal that carry it (docs/console.md)."""
