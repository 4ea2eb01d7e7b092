"""The approver page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The test signs in with a token from its own identity provider, sees the held call with its
agent, intent, reasons and the task's recent calls, approves it, and the agent's waiting
call goes through. A screenshot is kept under tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from approvals_support import APPROVAL_POLICY, ApproverIdP, eventually, open_task
from harness import SidecarFactory
from harness import ROOT, EchoTool

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"

playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (the test extra)")

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium missing: run scripts/install-system-deps.sh")


async def test_an_approver_signs_in_sees_the_held_call_and_approves_it(make_sidecar: SidecarFactory, tmp_path: Path,
                                                                      echo_tool: EchoTool) -> None:
    idp = ApproverIdP(tmp_path)
    sc = await make_sidecar(policy_dir=APPROVAL_POLICY, approvals=idp.config())
    intent = "close the duplicate account of customer 42 <img src=x onerror=alert(1)>"  # agent text: shown, never run
    task = await open_task(sc.admin, intent)
    async with httpx.AsyncClient(timeout=90) as agent:
        assert (await agent.get(f"{sc.proxy}/crm/customers/42", headers={"X-Agent-Task": task})).status_code == 200
        held = asyncio.create_task(agent.delete(f"{sc.proxy}/crm/customers/42/close",
                                                headers={"X-Agent-Task": task, "Prefer": "wait=60"}))

        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 900})
                dialogs: list[str] = []
                page.on("dialog", lambda dialog: dialogs.append(dialog.message))
                await page.goto(f"{sc.admin}/ui/")
                await page.fill("#token", idp.token("alice@example.com", ["approvers"]))
                await page.click("#signin-button")
                card = page.locator("article.approval")
                await card.wait_for(timeout=20_000)
                assert await page.locator("#who").inner_text() == "signed in as alice@example.com (approvers)"
                assert await card.locator(".agent").inner_text() == "spiffe://test/ns/agents/sa/agent-under-test"
                assert await card.locator(".intent").inner_text() == intent
                assert await page.locator("img").count() == 0
                assert await card.locator(".method").inner_text() == "DELETE"
                assert (await card.locator(".target").inner_text()).endswith("/crm/customers/42/close")
                assert await card.locator(".reasons li").all_inner_texts() == ["approvals fixture: DELETE on crm needs a human"]
                await card.locator(".history summary").click()  # the task's recent calls fold away by default
                recent = await card.locator(".recent tbody tr").all_inner_texts()
                assert any("GET" in row and "/crm/customers/42" in row and "allow" in row for row in recent)
                await card.locator(".comment").fill("checked with the account owner")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "approver-ui.png"), full_page=True)
                await card.locator(".approve").click()
                await page.locator("#message.ok", has_text="is now approved").wait_for(timeout=20_000)
                await page.locator("#approvals .empty").wait_for(timeout=20_000)
                assert dialogs == []
            finally:
                await browser.close()
        response = await held
    assert response.status_code == 200, response.text
    assert len(echo_tool.seen) == 2
    assert (ARTIFACTS / "approver-ui.png").stat().st_size > 10_000

    async def audited() -> bool:
        text = sc.audit_path.read_text()
        return "checked with the account owner" in text and '"approval.used"' in text
    await eventually(audited, what="the approval in the audit log")
