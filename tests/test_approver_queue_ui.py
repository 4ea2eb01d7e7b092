"""The approver page as a queue, in a real headless Chromium (Debian's, driven by Playwright), against the
shipped policy library: a pending count, cards ordered by expiry with a countdown, a comment being typed
that survives new held calls and a reload, a comment and a confirmation step for critical risk, and a
layout that holds at 1280 and 390 px; the body of a held call (payee and amount set apart, the text of a publish call),
masked fields masked. Screenshots are kept under tests/artifacts/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from approvals_support import ApproverIdP, open_task
from harness import ROOT, SHIPPED_POLICY, EchoTool, sidecar_config, start_sidecar

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"

playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (the test extra)")

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium missing: run scripts/install-system-deps.sh")


async def _approval(admin: str, approval_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        document: dict[str, Any] = (await client.get(f"{admin}/v1/approvals/{approval_id}")).json()
    return document


async def test_the_queue_orders_by_expiry_keeps_comments_and_confirms_critical_calls(tmp_path: Path,
                                                                                     echo_tool: EchoTool) -> None:
    idp = ApproverIdP(tmp_path)
    sc = await start_sidecar(tmp_path, sidecar_config(tmp_path, echo_tool.base, policy_dir=SHIPPED_POLICY,
                                                      approvals=idp.config()))
    try:
        task = await open_task(sc.admin, "tidy customer 42 and pay the ACME invoice")
        async with httpx.AsyncClient() as agent:
            headers = {"X-Agent-Task": task}
            assert (await agent.get(f"{sc.proxy}/crm/customers/42", headers=headers)).status_code == 200
            delete = (await agent.delete(f"{sc.proxy}/crm/customers/42", headers=headers)).json()
            transfer = (await agent.post(f"{sc.proxy}/payments/transfers", headers=headers,
                                         json={"amount": 5000, "payee": "ACME"})).json()
        high, critical = delete["approval_id"], transfer["approval_id"]
        assert (await _approval(sc.admin, high))["risk"] == "high"
        assert (await _approval(sc.admin, critical))["risk"] == "critical"  # held later, expires sooner

        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                dialogs: list[str] = []
                page.on("dialog", lambda dialog: dialogs.append(dialog.message))
                await page.goto(f"{sc.admin}/ui/")
                await page.fill("#token", idp.token("alice@example.com", ["approvers"]))
                await page.click("#signin-button")
                await page.locator("#pending", has_text="2 pending").wait_for(timeout=20_000)

                # Ordered by expiry, soonest first, each with a countdown; the absolute time without milliseconds.
                cards = page.locator("article.approval")
                assert [await cards.nth(i).get_attribute("id") for i in range(2)] == [critical, high]
                assert re.fullmatch(r"expires in 1[45] min \d+ s", await cards.nth(0).locator(".countdown").inner_text())
                assert re.fullmatch(r"expires in (29|30) min \d+ s", await cards.nth(1).locator(".countdown").inner_text())
                title = await cards.nth(0).locator(".countdown").get_attribute("title") or ""
                assert re.fullmatch(r"expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", title)
                assert "critical" in (await cards.nth(0).get_attribute("class") or "")
                # Compact: both held calls are on the first screen.
                second = await cards.nth(1).bounding_box()
                assert second is not None and second["y"] + 60 < 900
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "approver-queue-1280.png"), full_page=True)

                # A comment being typed survives a new held call arriving, and a reload of the tab.
                note = page.locator(f"#{high} .comment")
                await note.fill("half-typed: checking with the")
                async with httpx.AsyncClient() as agent:
                    another = (await agent.delete(f"{sc.proxy}/crm/customers/7", headers={"X-Agent-Task": task})).json()
                await page.locator("#pending", has_text="3 pending").wait_for(timeout=20_000)
                assert await page.locator(f"#{another['approval_id']}").count() == 1
                assert await note.input_value() == "half-typed: checking with the"
                assert await page.evaluate("document.activeElement.closest('article').id") == high
                await page.reload()
                await page.locator("#pending", has_text="3 pending").wait_for(timeout=20_000)
                assert await page.locator(f"#{high} .comment").input_value() == "half-typed: checking with the"

                # Critical risk: no verdict without a comment, and none before an explicit confirmation.
                card = page.locator(f"#{critical}")
                assert await card.locator(".required").is_visible()
                await card.locator(".approve").click()
                await page.locator("#message", has_text="a comment is required to approve a critical-risk call").wait_for()
                assert (await _approval(sc.admin, critical))["approvals"] == []
                await card.locator(".comment").fill("invoice 2291 checked with finance")
                await card.locator(".approve").click()
                confirm = card.locator(".confirm")
                await confirm.wait_for(state="visible")
                text = await confirm.locator(".confirm-text").inner_text()
                assert text.startswith("Approve POST http://") and "/payments/transfers" in text
                assert text.endswith("(critical risk, 2 approvers needed)?")
                assert not await card.locator(".verdicts").is_visible()
                assert (await _approval(sc.admin, critical))["approvals"] == []  # nothing sent yet
                await confirm.locator(".confirm-no").click()
                assert not await confirm.is_visible() and await card.locator(".approve").is_visible()
                await card.locator(".approve").click()
                await card.locator(".confirm-yes").click()
                await page.locator("#message.ok", has_text=f"{critical} is now pending").wait_for(timeout=20_000)
                given = (await _approval(sc.admin, critical))["approvals"]
                assert [(a["approver"], a["comment"]) for a in given] == [("alice@example.com",
                                                                          "invoice 2291 checked with finance")]
                assert dialogs == []

                # A phone, 390 px wide: nothing wider than the screen, the recent calls inside their card.
                phone = await browser.new_page(viewport={"width": 390, "height": 844})
                await phone.goto(f"{sc.admin}/ui/")
                await phone.fill("#token", idp.token("bob@example.com", ["approvers"]))
                await phone.click("#signin-button")
                await phone.locator("#pending", has_text="3 pending").wait_for(timeout=20_000)
                for summary in await phone.locator(".history summary").all():
                    await summary.click()
                assert await phone.evaluate("document.documentElement.scrollWidth") <= 390
                overflow = await phone.evaluate("""() => [...document.querySelectorAll('article.approval')].map(card => {
                    const box = card.getBoundingClientRect();
                    const wrap = card.querySelector('.table-wrap').getBoundingClientRect();
                    return {card: box.right <= 390, table: wrap.right <= box.right + 0.5};
                })""")
                assert overflow == [{"card": True, "table": True}] * 3
                intent = phone.locator(f"#{high} .intent")
                assert await intent.evaluate("node => getComputedStyle(node).wordBreak") != "break-all"
                await phone.screenshot(path=str(ARTIFACTS / "approver-queue-390.png"), full_page=True)
            finally:
                await browser.close()
    finally:
        await sc.sidecar.stop()
    for name in ("approver-queue-1280.png", "approver-queue-390.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


PUBLISH_TEXT = "We are thrilled to announce ACME's Q3 results: revenue up 12% <script>alert(1)</script>"
MASKED_SECRET = "hunter2-never-on-the-page"


async def test_the_approver_sees_the_body_with_the_payee_and_amount_set_apart(tmp_path: Path, echo_tool: EchoTool) -> None:
    """The body of a held transfer and of a held publish call, on the page at 1280 and 390 px, masked fields masked."""
    idp = ApproverIdP(tmp_path)
    config = sidecar_config(tmp_path, echo_tool.base, policy_dir=SHIPPED_POLICY, approvals=idp.config())
    config["routes"].append({"name": "social", "match": {"path_prefix": "/social"}, "upstream": f"{echo_tool.base}/social",
                             "labels": {"external": "true"}})
    sc = await start_sidecar(tmp_path, config)
    try:
        task = await open_task(sc.admin, "pay the ACME invoice and announce the results")
        async with httpx.AsyncClient() as agent:
            headers = {"X-Agent-Task": task}
            transfer = (await agent.post(f"{sc.proxy}/payments/transfers", headers=headers, json={
                "amount": 5000, "currency": "EUR", "payee": "ACME Corp", "password": MASKED_SECRET,
                "reference": "invoice 2291"})).json()
            publish = (await agent.post(f"{sc.proxy}/social/posts", headers=headers,
                                        json={"text": PUBLISH_TEXT, "visibility": "public"})).json()
        assert transfer["code"] == publish["code"] == "approval_required", (transfer, publish)
        paid, posted = transfer["approval_id"], publish["approval_id"]

        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for width, height, who in ((1280, 900, "alice@example.com"), (390, 844, "bob@example.com")):
                    page = await browser.new_page(viewport={"width": width, "height": height})
                    await page.goto(f"{sc.admin}/ui/")
                    await page.fill("#token", idp.token(who, ["approvers"]))
                    await page.click("#signin-button")
                    await page.locator("#pending", has_text="2 pending").wait_for(timeout=20_000)

                    # The transfer: amount and payee set apart above the body, the body pretty-printed, masked.
                    card = page.locator(f"#{paid}")
                    values = card.locator(".values")
                    assert await values.is_visible()
                    terms = await values.locator("dt").all_inner_texts()
                    shown = await values.locator("dd").all_inner_texts()
                    pairs = dict(zip(terms, shown, strict=True))
                    assert pairs["amount"] == "5000" and pairs["payee"] == "ACME Corp", pairs
                    body = card.locator(".body-text")
                    assert await body.is_visible()
                    text = await body.inner_text()
                    assert '\n  "payee": "ACME Corp",\n' in text and '\n  "amount": 5000,\n' in text
                    assert '"password": "[masked]"' in text and MASKED_SECRET not in text
                    assert await card.locator(".masked-note").inner_text() == "Masked: password"
                    size = len(json.dumps({"amount": 5000, "currency": "EUR", "payee": "ACME Corp",
                                           "password": MASKED_SECRET, "reference": "invoice 2291"},
                                          separators=(",", ":")).encode())
                    meta = await card.locator(".body-hash").inner_text()
                    assert re.fullmatch(rf"{size} bytes, sha256 [0-9a-f]{{64}}, application/json", meta), meta

                    # Critical: the confirmation names the values being approved.
                    if width == 1280:
                        await card.locator(".comment").fill("checked the payee with finance")
                        await card.locator(".approve").click()
                        confirm = await card.locator(".confirm-text").inner_text()
                        assert "/payments/transfers [amount 5000, payee ACME Corp] (critical risk" in confirm, confirm
                        await card.locator(".confirm-no").click()

                    # The publish call: the text to be published, as text (never as markup).
                    post = page.locator(f"#{posted} .body-text")
                    assert PUBLISH_TEXT.replace('"', '\\"') in await post.inner_text()
                    assert await page.locator(f"#{posted} script").count() == 0

                    # A masked value is nowhere in the page, and at 390 px nothing is wider than the screen.
                    assert MASKED_SECRET not in await page.content()
                    if width == 390:
                        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
                        right = await page.evaluate(f"""() => {{
                            const card = document.getElementById('{paid}').getBoundingClientRect().right;
                            const pre = document.querySelector('#{paid} .body-text').getBoundingClientRect().right;
                            return pre <= card + 0.5; }}""")
                        assert right
                    await card.scroll_into_view_if_needed()
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    await page.screenshot(path=str(ARTIFACTS / f"approver-body-{width}.png"), full_page=True)
                    await page.close()
            finally:
                await browser.close()
    finally:
        await sc.sidecar.stop()
    for name in ("approver-body-1280.png", "approver-body-390.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
