"""What an approver sees of a held call's body (issue 20, item 7): masked, bounded and pretty-printed, its size and
hash always, the amount, records and payee-like fields set apart; the same on the API, `approvals show` and the
webhook; and no masked value anywhere the sidecar writes (webhook, CLI, API, audit file, logs)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import ApproverIdP, eventually, open_task
from harness import SidecarFactory
from harness import SHIPPED_POLICY, EchoTool
from sidecar.approvals.preview import MASKED, PreviewSettings, describe
from sidecar.approvals.store import Approval
from sidecar.config import ConfigError, Route, RouteMatch, parse_config
from sidecar.documents import InterceptedCall
from sidecar.proxy.body import read_body
from sidecar.tasks.measures import Measure, parse_path
from test_approvals_webhook import Receiver

SECRETS = ("hunter2-PASSWORD-VALUE", "tok-SECRET-VALUE-123", "deep-API-KEY-value", "sk_live_CLIENT_SECRET")
QUERY_SECRET = "presigned-QUERY-SIGNATURE-42"


def call_of(body: bytes, content_type: str = "application/json", measures: tuple[Measure, ...] = ()) -> InterceptedCall:
    view = read_body(body, content_type)
    route = Route(name="payments", match=RouteMatch(path_prefix="/payments"), upstream="http://pay.example/payments",
                  measures=measures)
    return InterceptedCall(route=route, mode="route_prefix", method="POST", scheme="http", host="pay.example", port=80,
                           path="/payments/transfers", query_string="", query={}, headers=(), body=body,
                           body_json=view.value, body_readable=view.readable,
                           body_sha256=hashlib.sha256(body).hexdigest(), content_type=content_type)


def transfer_body() -> dict[str, Any]:
    return {"amount": 5000, "payee": "ACME Corp", "Password": SECRETS[0],
            "transfer": {"to": {"iban": "DE89370400440532013000", "name": "ACME"}, "memo": "invoice 2291"},
            "meta": {"headers": [{"X-API-KEY": SECRETS[2]}], "Access-Token": SECRETS[1]},
            "client": {"clientSecret": SECRETS[3], "id": "c-1"}}


# ------------------------------------------------------------------ the preview itself

def test_masked_by_key_name_at_any_depth_ignoring_case_and_separators() -> None:
    body = json.dumps(transfer_body()).encode()
    preview = PreviewSettings().build(call_of(body), [])
    assert preview.size == len(body) and preview.sha256 == hashlib.sha256(body).hexdigest()
    assert preview.kind == "json" and not preview.truncated and preview.text is not None
    shown = json.loads(preview.text)  # pretty-printed and still JSON
    assert preview.text.startswith("{\n  \"amount\": 5000,")
    assert shown["Password"] == MASKED and shown["meta"]["Access-Token"] == MASKED
    assert shown["meta"]["headers"][0]["X-API-KEY"] == MASKED and shown["client"]["clientSecret"] == MASKED
    assert shown["client"]["id"] == "c-1" and shown["transfer"]["memo"] == "invoice 2291"
    assert sorted(preview.masked) == ["$.Password", "$.client.clientSecret", "$.meta.Access-Token",
                                      "$.meta.headers[0].X-API-KEY"]
    document = json.dumps(asdict(preview))
    assert not any(secret in document for secret in SECRETS)


def test_masking_the_audited_input_never_changes_the_document_the_policy_read() -> None:
    document = {"request": {"body": transfer_body()}, "rows": [{"id": 1}, {"id": 2}]}
    original = json.dumps(document)
    masked = PreviewSettings().mask(document)
    assert json.dumps(document) == original  # a copy where something is masked, never an edit in place
    assert masked["request"]["body"]["Password"] == MASKED and masked["rows"] is document["rows"]
    assert not any(secret in json.dumps(masked) for secret in SECRETS)
    assert PreviewSettings().mask(document["rows"]) is document["rows"]  # nothing masked: nothing copied


def test_a_masked_field_hides_its_whole_value_and_configured_names_add_to_the_defaults() -> None:
    body = json.dumps({"credentials": {"user": "u", "pin": "1234"}, "Card-PIN": "9876", "note": "ok"}).encode()
    default = json.loads(PreviewSettings().build(call_of(body), []).text or "")
    assert default["credentials"] == MASKED and default["Card-PIN"] == "9876"
    settings = PreviewSettings(mask_fields=(*PreviewSettings().mask_fields, "pin"))
    assert json.loads(settings.build(call_of(body), []).text or "")["Card-PIN"] == MASKED


def test_measures_and_highlighted_fields_are_set_apart() -> None:
    body = json.dumps(transfer_body()).encode()
    preview = PreviewSettings().build(call_of(body), [])
    assert preview.measures == {"amount": 5000.0}
    assert [(h["path"], h["value"], h["why"]) for h in preview.highlights] == [
        ("$.payee", "ACME Corp", "field"),
        ("$.transfer.to", '{"iban":"DE89370400440532013000","name":"ACME"}', "field"),
        ("$.transfer.to.iban", "DE89370400440532013000", "field")]
    # The route's configured measures (the decision input's request.measures) and fields the reasons name.
    configured = (Measure("amount", (parse_path("$.transfer.total"),)), Measure("records", (parse_path("$.ids#count"),)))
    body = json.dumps({"transfer": {"total": "12.50"}, "ids": [1, 2, 3], "memo": "x", "beneficiary_ref": "B-7"}).encode()
    preview = PreviewSettings(highlight_fields=("beneficiary_ref",)).build(
        call_of(body, measures=configured), ["memo_check: the memo of POST /payments/transfers says x"])
    assert preview.measures == {"amount": 12.5, "records": 3.0}
    assert [(h["path"], h["why"]) for h in preview.highlights] == [("$.memo", "reason"), ("$.beneficiary_ref", "field")]
    lines = describe(asdict(preview))
    assert "  amount             12.5" in lines and "  records            3" in lines


def test_the_preview_is_cut_at_the_configured_size_and_the_size_and_hash_are_the_whole_body() -> None:
    body = json.dumps({"text": "é" * 3000, "password": SECRETS[0]}).encode()
    preview = PreviewSettings(max_bytes=100).build(call_of(body), [])
    assert preview.truncated and preview.text is not None and len(preview.text.encode()) <= 100
    assert preview.text.startswith('{\n  "text": "éé')  # cut on a character, never inside one
    assert preview.size == len(body) and preview.sha256 == hashlib.sha256(body).hexdigest()
    off = PreviewSettings(max_bytes=0).build(call_of(body), [])
    assert off.text is None and off.size == len(body) and off.masked == ["$.password"]
    assert "(body previews are off: approvals.body_preview_bytes is 0)" in describe(asdict(off))


def test_a_body_that_is_neither_json_nor_a_form_is_shown_as_its_size_and_hash_only() -> None:
    body = f"password={SECRETS[0]} and some text".encode()
    preview = PreviewSettings().build(call_of(body, "text/plain"), [])
    assert (preview.kind, preview.text, preview.size) == ("opaque", None, len(body))
    assert SECRETS[0] not in json.dumps(asdict(preview))
    assert describe(asdict(preview))[-1] == "(neither JSON nor a form: only its size and hash are shown)"
    empty = PreviewSettings().build(call_of(b""), [])
    assert (empty.kind, empty.size, empty.text) == ("empty", 0, None)


def test_a_form_body_is_masked_like_json() -> None:
    body = f"amount=40&payee=ACME&api_key={SECRETS[2]}".encode()
    preview = PreviewSettings().build(call_of(body, "application/x-www-form-urlencoded"), [])
    assert preview.kind == "form" and preview.text is not None
    assert json.loads(preview.text) == {"amount": "40", "payee": "ACME", "api_key": MASKED}
    assert preview.measures == {"amount": 40.0}


def test_an_mcp_tool_call_is_measured_on_its_arguments_and_masked_in_them() -> None:
    from dataclasses import replace

    from sidecar.documents import McpCall

    arguments = {"amount": 70, "to": "ACME Corp", "api_key": SECRETS[2]}
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "send_payment", "arguments": arguments}}
    call = replace(call_of(json.dumps(message).encode()), mcp_calls=(McpCall("tools/call", 7, "send_payment", arguments),))
    preview = PreviewSettings().build(call, [])
    assert preview.measures == {"amount": 70.0}
    assert preview.masked == ["$.params.arguments.api_key"]
    assert [(h["path"], h["value"]) for h in preview.highlights] == [("$.params.arguments.to", "ACME Corp")]
    assert SECRETS[2] not in json.dumps(asdict(preview))


def test_control_and_bidi_characters_are_shown_as_escapes() -> None:
    body = json.dumps({"payee": "ACME\u202eproC", "memo": "\x1b[2J\u200b"}, ensure_ascii=False).encode()
    preview = PreviewSettings().build(call_of(body), [])
    assert preview.text is not None and "\u202e" not in preview.text and "\x1b" not in preview.text
    assert json.loads(preview.text)["payee"] == "ACME\u202eproC"  # still the same JSON value
    assert preview.highlights[0]["value"] == "ACME\\u202eproC"


# ------------------------------------------------------------------ records and config

def test_a_record_stored_without_a_preview_still_loads() -> None:
    old = {"id": "ap-old", "binding": {"method": "DELETE", "target": "http://x/crm/1", "body_sha256": "e3b0",
                                       "agent": "a", "task_id": None},
           "decision_id": "d", "route": "crm", "reasons": ["r"], "risk": "high", "approvers_required": 1, "group": None,
           "created_at": 1.0, "expires_at": 2.0, "status": "pending", "approvals": [], "denial": None, "intent": None,
           "used_at": None}
    approval = Approval.from_json(json.dumps(old))
    assert approval.body is None and approval.public()["body"] is None
    assert describe(None) == ["body: not recorded (held before this sidecar version kept body previews)"]
    newer = Approval.from_json(json.dumps({**old, "a_field_from_a_later_version": 1}))  # rolling upgrades
    assert newer.id == "ap-old"
    with_body = Approval.from_json(json.dumps({**old, "body": {"size": 2, "sha256": "ab", "kind": "json", "text": "{}"}}))
    assert with_body.body is not None and with_body.body.text == "{}" and Approval.from_json(with_body.to_json()) == with_body


def test_config_keys(tmp_path: Path) -> None:
    from harness import sidecar_config

    def load(**approvals: Any) -> Any:
        return parse_config(sidecar_config(tmp_path, "http://127.0.0.1:9", approvals=approvals), tmp_path / "s.yaml").approvals

    default = load()
    assert default.body_preview_bytes == 4096 and "password" in default.mask_fields and "payee" in default.highlight_fields
    custom = load(body_preview_bytes=0, mask_fields=["pin"], highlight_fields=["merchant"])
    assert custom.body_preview_bytes == 0 and custom.highlight_fields == ("merchant",)
    assert custom.mask_fields[-1] == "pin" and "password" in custom.mask_fields  # added to, never replacing, the defaults
    for bad, message in (({"body_preview_bytes": -1}, "approvals.body_preview_bytes: must be between 0"),
                         ({"body_preview_bytes": 10**6}, "approvals.body_preview_bytes: must be between 0"),
                         ({"mask_fields": "password"}, "approvals.mask_fields: must be a list of non-empty strings"),
                         ({"highlight_fields": [""]}, "approvals.highlight_fields: must be a list of non-empty strings")):
        with pytest.raises(ConfigError) as caught:
            load(**bad)
        assert message in str(caught.value)


# ------------------------------------------------------------------ end to end: nowhere a masked value

async def test_webhook_cli_api_audit_and_logs_show_the_body_and_never_a_masked_value(
        make_sidecar: SidecarFactory, tmp_path: Path, echo_tool: EchoTool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver(failures=0)
    await receiver.start()
    idp = ApproverIdP(tmp_path)
    sc = await make_sidecar(policy_dir=SHIPPED_POLICY, approvals=idp.config(
        webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks/approvals", "backoff_seconds": 0.05}))
    try:
        task = await open_task(sc.admin, "pay the ACME invoice")
        async with httpx.AsyncClient() as agent:
            held = await agent.post(f"{sc.proxy}/payments/transfers?Access%5FToken={QUERY_SECRET}&memo=rent",
                                    content=json.dumps(transfer_body()).encode(),
                                    headers={"X-Agent-Task": task, "Content-Type": "application/json"})
        assert held.status_code == 403 and held.json()["code"] == "approval_required", held.text
        approval_id = held.json()["approval_id"]

        async def delivered() -> bool:
            return len(receiver.received) >= 1
        await eventually(delivered, what="the webhook delivery")
        raw_event = receiver.received[0][1].decode()
        event = json.loads(raw_event)
        body = event["body"]
        assert body["size"] == len(json.dumps(transfer_body()).encode()) and len(body["sha256"]) == 64
        assert body["measures"] == {"amount": 5000.0}
        assert {"path": "$.payee", "value": "ACME Corp", "why": "field"} in body["highlights"]
        assert '"payee": "ACME Corp"' in body["text"] and '"Password": "[masked]"' in body["text"]
        assert "[amount 5000, $.payee ACME Corp" in event["summary"]

        async with httpx.AsyncClient() as client:
            shown = (await client.get(f"{sc.admin}/v1/approvals/{approval_id}")).text
            listed = (await client.get(f"{sc.admin}/v1/approvals",
                                       headers={"Authorization": f"Bearer {idp.token('alice@example.com', ['approvers'])}"})).text
        assert '\\"payee\\": \\"ACME Corp\\"' in shown
        # The query's masked value is not shown either; the binding behind it keeps the exact target.
        assert json.loads(shown)["binding"]["target"].endswith("/payments/transfers?Access_Token=[masked]&memo=rent")

        env = {**os.environ, "AGENT_SIDECAR_ADMIN": sc.admin,
               "AGENT_SIDECAR_APPROVER_TOKEN": idp.token("alice@example.com", ["approvers"])}

        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sidecar", "approvals", *args],
                                           capture_output=True, text=True, env=env, timeout=60)

        show = await cli("show", approval_id)
        assert show.returncode == 0, show.stderr
        lines = show.stdout.splitlines()
        assert f"    body: {body['size']} bytes, sha256 {body['sha256']}, application/json" in lines
        assert "    values:" in lines and "      amount              5000" in lines
        assert "      $.payee             ACME Corp" in lines
        assert '        "payee": "ACME Corp",' in lines and '        "Password": "[masked]",' in lines
        listing = await cli("list")
        assert listing.returncode == 0 and "    amount: 5000" in listing.stdout and "    $.payee: ACME Corp" in listing.stdout
        as_json = await cli("show", approval_id, "--json")
        assert json.loads(as_json.stdout)["body"] == body

        async def audited() -> bool:
            return approval_id in sc.audit_path.read_text()
        await eventually(audited, what="the approval in the audit log")
        audit_text = sc.audit_path.read_text()
        decision = next(json.loads(line) for line in audit_text.splitlines()
                        if '"type":"decision"' in line and approval_id in line)
        assert decision["input"]["request"]["body"]["Password"] == MASKED  # the audited input is masked too
        assert decision["input"]["request"]["body"]["payee"] == "ACME Corp"
        assert decision["input"]["request"]["body_sha256"] == body["sha256"]  # still bound to the exact body
        assert decision["input"]["request"]["query"] == {"Access_Token": [MASKED], "memo": ["rent"]}  # input.v2's shape
        assert decision["input"]["request"]["raw_query"] == "Access_Token=[masked]&memo=rent"
        everything = {"webhook": raw_event, "api show": shown, "api list": listed, "cli show": show.stdout + show.stderr,
                      "cli list": listing.stdout, "cli json": as_json.stdout, "audit": audit_text,
                      # the test's own clients (httpx) log the URLs they call; everything else is the sidecar's
                      "logs": "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))}
        for where, text in everything.items():
            for secret in (*SECRETS, QUERY_SECRET):
                assert secret not in text, f"{secret} in {where}"
    finally:
        assert receiver.runner is not None
        await receiver.runner.cleanup()


@pytest.mark.parametrize(("query", "shown"), [
    ("", ""),
    ("q=1", "q=1"),
    ("api_key=abc&q=1", "api_key=[masked]&q=1"),
    ("API-Key=abc", "API-Key=[masked]"),
    ("x_access_token=abc&token=def&token=ghi", "x_access_token=[masked]&token=[masked]&token=[masked]"),
    ("api%5Fkey=abc", "api%5Fkey=[masked]"),  # names are matched decoded, shown as sent
    ("pass+word=abc", "pass+word=[masked]"),  # '+' is a space: "pass word" normalises to "password"
    ("password", "password"),  # a name without a value has nothing to hide
    ("memo=my+password+is+x", "memo=my+password+is+x"),  # names only, as for bodies
    ("a=1&&password=x&", "a=1&&password=[masked]&"),
    ("api_key%5B0%5D=abc&token2=def", "api_key%5B0%5D=[masked]&token2=[masked]"),  # an index is no disguise
    ("X-Amz-Credential=AKIA&X-Amz-Signature=abc&sig=def", "X-Amz-Credential=[masked]&X-Amz-Signature=[masked]&sig=[masked]"),
])
def test_query_parameters_are_masked_by_name_like_body_fields(query: str, shown: str) -> None:
    settings = PreviewSettings()
    assert settings.mask_query(query) == shown
    assert settings.mask_target(f"https://tools.internal/pay?{query}") == f"https://tools.internal/pay?{shown}"
    assert settings.mask_target("https://tools.internal/pay") == "https://tools.internal/pay"
    if query == shown:
        assert settings.mask_query(query) is query  # nothing masked: the audited input keeps the judged bytes


def test_masked_query_parameters_keep_the_inputs_shape_and_an_old_approval_shows_no_query() -> None:
    from sidecar.approvals.store import Approval, RequestBinding

    settings = PreviewSettings()
    query = {"token": ["a", "b"], "q": ["1"]}
    assert settings.mask_query_mapping(query) == {"token": [MASKED, MASKED], "q": ["1"]}
    assert settings.mask_query_mapping({"q": ["1"]}) is not None and settings.mask_query_mapping(query)["q"] is query["q"]
    binding = RequestBinding("GET", "https://tools.internal/pay?api_key=abc", "0" * 64, "spiffe://a", None)
    stored_before = Approval(id="ap-1", binding=binding, decision_id="d-1", route="pay", reasons=[], risk="high",
                             approvers_required=1, group=None, created_at=0.0, expires_at=1.0)
    assert stored_before.public()["binding"]["target"] == "https://tools.internal/pay?[query not shown]"
    assert stored_before.binding.target.endswith("api_key=abc")  # what the approval is bound to is unchanged
