"""The app in a real headless Chromium: sample, click an image, the next pair appears.

Needs the Debian package `chromium` (/usr/bin/chromium) and Playwright for Python (no
`playwright install`: it drives the system Chromium). D3PO_SAVE_SCREENSHOT=1 also writes
docs/app_screenshot.png for the README.
"""
import json
import os
import time
from pathlib import Path

import pytest

from test_app import app_model, free_port

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app_screenshot.png"
SAVE = os.environ.get("D3PO_SAVE_SCREENSHOT") == "1"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium: install it with `apt-get install -y chromium`")


@pytest.fixture
def app(tmp_path):
    from d3po_studio.gradio_app import launch
    from d3po_studio.gradio_app.registry import REGISTRY
    demo = launch(model=app_model(tmp_path), port=free_port(), sessions_dir=tmp_path / "sessions",
                  block=False)
    yield demo, tmp_path / "sessions"
    demo.close()
    REGISTRY.close_all()


def session_folder(sessions: Path) -> Path:
    (folder,) = [p for p in sessions.iterdir() if (p / "session.json").exists()]
    return folder


def test_click_an_image_then_the_next_pair_appears(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from d3po_studio.gradio_app.registry import REGISTRY
    demo, sessions = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo.local_url)
            page.get_by_label("Prompt", exact=True).fill("a red circle")
            page.locator("#settings").get_by_text("Settings", exact=True).click()
            if not SAVE:                       # fewer steps for speed; the README shows the defaults
                steps = page.locator("#steps input[type=number]")
                steps.fill("4")
                steps.press("Enter")
            page.locator("#sample").click()
            thumbs = page.locator("#images .thumbnail-item")
            expect(thumbs).to_have_count(2, timeout=60_000)
            expect(page.locator("#status")).to_contain_text("Click the better image", timeout=60_000)
            first_pair = [thumbs.nth(i).locator("img").get_attribute("src") for i in range(2)]

            thumbs.nth(0).click()
            expect(page.locator("#sample")).to_be_disabled(timeout=5_000)       # no double click
            expect(page.locator("#status")).to_contain_text("Update 1", timeout=90_000)
            expect(page.locator("#sample")).to_be_enabled(timeout=10_000)
            expect(thumbs).to_have_count(2)
            second_pair = [thumbs.nth(i).locator("img").get_attribute("src") for i in range(2)]
            assert second_pair != first_pair

            page.locator("#settings").get_by_text("Settings", exact=True).click()   # fold it again
            shot = DOCS_SCREENSHOT if SAVE else tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert REGISTRY.is_open(session_folder(sessions))

            page.get_by_role("tab", name="History").click()
            expect(page.get_by_text("1 click", exact=False).first).to_be_visible(timeout=10_000)
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("button", name="Render base and tuned").click()
            expect(page.locator(".pixelated img")).to_have_count(2, timeout=60_000)
        finally:
            browser.close()
    session = session_folder(sessions)
    deadline = time.monotonic() + 20
    while REGISTRY.is_open(session) and time.monotonic() < deadline:     # closing the tab closes it
        time.sleep(0.2)
    assert not REGISTRY.is_open(session)
    statuses = [json.loads(r.read_text())["status"] for r in sorted(session.glob("rounds/*/round.json"))]
    assert statuses == ["applied", "shown"]


def test_resumed_session_opens_in_the_first_tab_only(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from d3po_studio import Session
    from d3po_studio.gradio_app import launch
    from d3po_studio.gradio_app.registry import REGISTRY
    model, folder = app_model(tmp_path), tmp_path / "elsewhere" / "kept"
    Session.open(folder, model=model, steps=2).close()
    demo = launch(model=model, session=folder, port=free_port(), sessions_dir=tmp_path / "sessions", block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            try:
                first, second = browser.new_page(), browser.new_page()
                first.goto(demo.local_url)
                expect(first.locator("#status")).to_contain_text("Resumed session kept", timeout=60_000)
                second.goto(demo.local_url)
                expect(second.locator("#status")).to_contain_text("open in another browser tab", timeout=30_000)
                second.locator("#sample").click()           # the second tab gets a new session of its own
                expect(second.locator("#status")).to_contain_text("Created session", timeout=60_000)
            finally:
                browser.close()
        assert [p.name for p in (tmp_path / "sessions").iterdir()][0].startswith("session-")
        assert not list(folder.glob("rounds/*"))
    finally:
        demo.close()
        REGISTRY.close_all()
