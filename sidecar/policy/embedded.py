"""The real OPA Go engine in process, through opa_bindings.

Evaluation runs on one dedicated thread: the native call releases the GIL, the
event loop never blocks on it, and a timeout can be enforced around it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .engine import PolicyError
from .loader import PolicyBundle, PolicyLoadError, read_policy_dir


def opa_available() -> bool:
    try:
        import opa_bindings  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def new_engine(bundle: PolicyBundle) -> Any:
    """A fresh opa_bindings engine with the bundle's modules and data loaded."""
    import opa_bindings

    engine = opa_bindings.OpaEngine()
    engine.print_handler = lambda message, location: None
    for name, source in bundle.modules.items():
        try:
            engine.add_policy(name, source)
        except opa_bindings.OpaError as exc:
            raise PolicyLoadError(bundle.root / name, exc.message.strip()) from None
    for path, value in bundle.data:
        try:
            engine.add_data(value, path)
        except opa_bindings.OpaError as exc:
            raise PolicyLoadError(bundle.root / (path.replace(".", "/") or ".") / "data.json", exc.message) from None
    return engine


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, rego_dir: Path) -> None:
        self._bundle = read_policy_dir(rego_dir)
        self._engine = new_engine(self._bundle)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opa-eval")

    @property
    def module_count(self) -> int:
        return len(self._bundle.modules)

    def evaluate_sync(self, path: str, input_document: dict[str, Any]) -> Any:
        import opa_bindings

        try:
            return self._engine.eval_document(path.replace("/", "."), input_document)
        except opa_bindings.OpaUndefinedError:
            raise PolicyError("undefined", f"data.{path.replace('/', '.')} is undefined") from None
        except opa_bindings.OpaError as exc:
            raise PolicyError("error", f"{exc.code}: {exc.message}") from None

    async def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.evaluate_sync, path, input_document)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._engine.close()
