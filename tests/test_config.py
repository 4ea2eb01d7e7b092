"""Config validation: every error names the file and the key path; the process exits before listening."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import ROOT, free_port, sidecar_config
from sidecar.config import ConfigError, load_config

CASES = yaml.safe_load((ROOT / "tests" / "vectors" / "config_errors.yaml").read_text())


def apply(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return config


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_config_errors_name_file_and_key(tmp_path: Path, case: dict[str, Any]) -> None:
    path = tmp_path / "sidecar.yaml"
    if "yaml" in case:
        path.write_text(case["yaml"])
    else:
        path.write_text(yaml.safe_dump(apply(sidecar_config(tmp_path, "http://127.0.0.1:9"), case["set"])))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == case["error"]


def test_the_shipped_example_config_is_valid() -> None:
    config = load_config(ROOT / "examples" / "sidecar.yaml")
    assert [r.name for r in config.routes] == ["crm", "payments", "publish", "tools"]
    tools = config.routes[3]
    assert tools.is_mcp and tools.labels["protocol"] == "mcp" and tools.mcp.tools["delete_record"] == {"destructiveHint": True}
    assert config.proxy.port == 15001 and config.admin.port == 15000 and config.metrics.port == 15090
    assert config.max_body_bytes == 1048576 and config.policy.timeout_ms == 250
    assert config.policy.embedded_workers == 1


def test_bad_config_exits_non_zero_before_opening_a_listener(tmp_path: Path) -> None:
    port = free_port()
    config = apply(sidecar_config(tmp_path, "http://127.0.0.1:9"), {"routes.2.upstream": "not-a-url"})
    config["listeners"]["proxy"] = f"127.0.0.1:{port}"
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "sidecar.yaml: routes[2].upstream: not an http(s) URL" in result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
