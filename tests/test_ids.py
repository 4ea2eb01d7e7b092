"""Random identifiers drawn from the OS's CSPRNG in blocks (sidecar/ids.py)."""

from __future__ import annotations

import os
import re
import uuid

from sidecar import ids


def test_random_uuid_is_a_canonical_version_4_uuid() -> None:
    for _ in range(300):  # across a block refill
        text = ids.random_uuid()
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_random_hex_has_the_asked_length_and_never_repeats() -> None:
    drawn = [ids.random_hex(16) for _ in range(5000)]  # several blocks
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in drawn)
    assert len(set(drawn)) == len(drawn)
    assert len(ids.random_hex(ids.BLOCK_BYTES + 1)) == 2 * (ids.BLOCK_BYTES + 1)


def test_a_forked_child_draws_new_bytes_not_its_parents_block() -> None:
    ids.random_hex(1)  # the parent holds a block with bytes left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave without running the parent's clean-up
        os.write(write, ids.random_hex(16).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert child != ids.random_hex(16)
