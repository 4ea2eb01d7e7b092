"""One raw upstream and one real sidecar for the adversarial modules that need no special configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adversarial_kit import Stack
from approvals_support import eventually


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("adversarial")).start()
    yield running
    try:
        # Every hostile call has ended: each body it was charged (limits.max_body_bytes_in_flight) is given back.
        path = running.running.sidecar.path if running.running else None

        async def given_back() -> bool:
            return path is None or (path.in_flight == 0 and path.orphaned == 0 and path.interceptor.bodies.used == 0)

        running.run(eventually(given_back, deadline=30, what="every body charged to the in-flight budget given back"))
    finally:
        running.stop()
