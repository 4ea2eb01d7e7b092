"""Random identifiers for every call (decision ids, credential jtis), from the OS's CSPRNG in blocks.

Each allowed call needs two: ``uuid.uuid4()`` and ``secrets.token_hex()`` each read ``os.urandom``,
which releases the GIL around the system call; on a loaded sidecar the event loop then waits for
the GIL behind the policy, audit and task-store threads (about 20 µs a call, measured under load).
Reading 4 KiB at a time keeps the bytes the OS's and takes the GIL hand-off once per 128 ids.
The block is refilled after a fork, so a child never repeats its parent's ids.
"""

from __future__ import annotations

import os
import threading

BLOCK_BYTES = 4096


class _RandomBlock:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # ids are also drawn off the event loop (admin threads, tests)
        self._block = b""
        self._offset = 0

    def take(self, size: int) -> bytes:
        with self._lock:
            if self._offset + size > len(self._block):
                self._block = os.urandom(max(BLOCK_BYTES, size))
                self._offset = 0
            start, self._offset = self._offset, self._offset + size
            return self._block[start:self._offset]

    def forget(self) -> None:
        """In a forked child: a new lock (another thread may have held the parent's) and no inherited bytes."""
        self._lock = threading.Lock()
        self._block, self._offset = b"", 0


_random = _RandomBlock()
os.register_at_fork(after_in_child=_random.forget)


def random_hex(size: int) -> str:
    """``size`` random bytes as hexadecimal (``secrets.token_hex(size)``)."""
    return _random.take(size).hex()


def random_uuid() -> str:
    """A version 4 UUID in its canonical text form (``str(uuid.uuid4())``)."""
    value = bytearray(_random.take(16))
    value[6] = (value[6] & 0x0F) | 0x40  # version 4
    value[8] = (value[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = value.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
