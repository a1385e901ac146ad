"""The web console in a real browser (Debian's chromium via Playwright) against a real server
process with API keys on: key management, live stats, the similarity playground, bad input."""

from __future__ import annotations

import os
import secrets
import shutil

import httpx
import pytest

from tests.e2e.server import running_server
from tests.helpers import png_bytes

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TKR_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no chromium (scripts/test.sh installs Debian's and sets TKR_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    # Playwright's node driver and the browser inherit the environment: the OpenBLAS preload the
    # test runner sets for MLX made node's thread creation fail. They start without it.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        pw = sync_playwright().start()
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    yield b
    b.close()
    pw.stop()


def test_console_manages_keys_shows_stats_and_compares(browser, tmp_path):
    admin = "tke_console_admin_" + secrets.token_hex(16)
    env = {"EMBEDDING__SECURITY__REQUIRE_API_KEY": "true", "EMBEDDING__SECURITY__API_KEY": admin,
           "EMBEDDING_DATA_DIR": str(tmp_path)}
    with running_server(env=env) as (base, _):
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        r = page.goto(base + "/console")
        assert r.status == 200 and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "admin API key" in page.text_content("#status")

        # A wrong key: the API's own message is shown.
        page.fill("#admin-key", "tke_wrong")
        page.click("#use-key")
        page.wait_for_selector("#status.error")  # (selectors: the page's CSP forbids eval)

        # Keys: create one (its secret shown once), see it listed, then revoke it.
        page.fill("#admin-key", admin)
        page.click("#use-key")
        page.fill("#new-name", "browser-app")
        page.check("#perm-similarity")
        page.click("#create")
        page.wait_for_selector("#created:not([hidden])")
        secret = page.text_content("#created").rsplit(": ", 1)[1].strip()
        row = page.wait_for_selector("tr:has-text('browser-app')")
        assert "embed:text, similarity" in row.text_content() and "active" in row.text_content()
        hdr = {"X-API-Key": secret}
        assert httpx.post(base + "/embed/text", json={"texts": ["hi"]}, headers=hdr).status_code == 200
        row.query_selector("button").click()
        page.wait_for_selector("tr:has-text('browser-app'):has-text('revoked')")
        assert httpx.post(base + "/embed/text", json={"texts": ["hi"]}, headers=hdr).status_code == 401

        # Playground: texts ranked by meaning, highest first.
        page.click("nav button[data-tab=playground]")
        page.fill("#query", "make my API respond faster")
        page.fill("#candidates", "a recipe for banana bread\nreduce endpoint latency\nthe weather in Paris")
        page.click("#compare")
        page.wait_for_selector("tr.result")
        rows = page.query_selector_all("tr.result")
        assert len(rows) == 3 and rows[0].text_content().startswith("reduce endpoint latency")
        scores = [float(r.query_selector(".score").text_content()) for r in rows]
        assert scores == sorted(scores, reverse=True)

        # A dropped image on a text-only model: the server's 4xx message, and the page still works.
        img = tmp_path / "photo.png"
        img.write_bytes(png_bytes(32, 32))
        page.set_input_files("#files", str(img))
        page.wait_for_selector("#images img")
        page.click("#compare")
        page.wait_for_selector("#status.error")  # (selectors: the page's CSP forbids eval)
        assert "image" in page.text_content("#status").lower()

        # Stats: live numbers from /admin/stats, with the traffic above in them.
        page.click("nav button[data-tab=stats]")
        tile = page.wait_for_selector("[data-stat=requests] b")
        assert int(tile.text_content()) >= 3
        assert page.wait_for_selector("#route-rows tr:has-text('/similarity')")
        assert errors == []
