"""One raw upstream and one real sidecar for the adversarial modules that need no special configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adversarial_kit import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("adversarial")).start()
    yield running
    running.stop()
