"""Config validation: every error names the file and the key path; the process exits before listening."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
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


EXAMPLE = ROOT / "examples" / "sidecar.yaml"
SCHEMA_FILE = ROOT / "docs" / "config.schema.json"


def test_the_shipped_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert [r.name for r in config.routes] == ["crm", "payments", "publish", "tools"]
    assert config.approvals.approvers is not None and config.approvals.approvers.group_claim == "groups"
    assert config.store.backend == "sqlite" and config.delegation.max_depth == 8
    assert [m.name for m in config.routes[1].measures] == ["amount"]
    tools = config.routes[3]
    assert tools.is_mcp and tools.labels["protocol"] == "mcp" and tools.mcp.tools["delete_record"] == {"destructiveHint": True}
    assert config.proxy.port == 15001 and config.admin.port == 15000 and config.metrics.port == 15090
    assert config.max_body_bytes == 1048576 and config.policy.timeout_ms == 250
    assert config.policy.embedded_workers == 1
    assert (config.approvals.max_pending_per_task, config.approvals.max_pending_per_agent) == (8, 32)


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


def test_the_checked_in_schema_is_what_config_schema_prints() -> None:
    """docs/config.schema.json is generated from sidecar/config_schema.py, the definition the loader validates
    with; regenerate it with `.venv/bin/agent-sidecar config schema > docs/config.schema.json`."""
    printed = subprocess.run([sys.executable, "-m", "sidecar", "config", "schema"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT, check=True).stdout
    assert SCHEMA_FILE.read_text() == printed, "stale: agent-sidecar config schema > docs/config.schema.json"
    jsonschema.Draft202012Validator.check_schema(json.loads(printed))


def test_the_example_names_its_schema_and_validates_against_it() -> None:
    text = EXAMPLE.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../docs/config.schema.json"
    schema = json.loads(SCHEMA_FILE.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(text))]
    assert errors == []


def test_the_example_shows_every_section_and_key() -> None:
    """Every key of every section the schema defines appears in the example, live or as a commented alternative,
    and every top-level section is live."""
    text = EXAMPLE.read_text()
    schema = json.loads(SCHEMA_FILE.read_text())
    missing = [f"{section}.{key}" for section, definition in schema["$defs"].items()
               for key in definition.get("properties", {}) if not re.search(rf"\b{key}:", text)]
    assert missing == []
    assert sorted(yaml.safe_load(text)) == sorted(schema["properties"])


def test_the_test_configs_validate_against_the_schema(tmp_path: Path) -> None:
    """The schema accepts what the loader accepts: the harness's config and the demo's."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for document in (sidecar_config(tmp_path, "http://127.0.0.1:9"), yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())):
        assert [e.message for e in validator.iter_errors(document)] == []


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(apply(sidecar_config(tmp_path, "http://127.0.0.1:9"),
                                         {"limits.max_body_bytes": "1MB", "routes.2.upstream": "ftp://x",
                                          "policy.engine": "wasm"})))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).splitlines() == [
        "sidecar.yaml: limits.max_body_bytes: must be an integer",
        "sidecar.yaml: policy.engine: must be one of embedded, rest",
        "sidecar.yaml: routes[2].upstream: not an http(s) URL",
    ]


def test_an_empty_key_is_the_same_as_leaving_it_out(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    document = sidecar_config(tmp_path, "http://127.0.0.1:9")
    document.update(audit=None, approvals={"max_wait_seconds": None})
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    assert config.audit.fail_closed and config.approvals.max_wait_seconds == 60
