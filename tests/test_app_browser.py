"""`minledits app` in a real browser: headless Chromium (Debian's, at /usr/bin/chromium) driven by playwright. The
test does what a person does - uploads a photo, sets the steps, adds a concept, presses Edit, waits for the edit
and the mask viewer, moves the step slider - with no error in the browser's console, and keeps a screenshot of the
page next to this file (with MINLEDITS_SCREENSHOT=1 also to docs/app.png, the README's picture; not by default, so
that a test run leaves the tree as it was). Without /usr/bin/chromium it is skipped, unless MINLEDITS_REQUIRE_BROWSER
is set."""
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.app_server import running

playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")
CHROMIUM = Path("/usr/bin/chromium")
SHOT = Path(__file__).with_name("app_browser.png")
DOCS = Path(__file__).parents[1] / "docs" / "app.png"
WAIT_MS = 60_000


def test_a_person_edits_a_photo_in_the_browser(tmp_path):
    if not CHROMIUM.exists():  # CI sets MINLEDITS_REQUIRE_BROWSER=1 (.ci/run installs chromium): there it fails
        missing = pytest.fail if os.environ.get("MINLEDITS_REQUIRE_BROWSER") else pytest.skip
        missing(f"no {CHROMIUM}: apt-get install chromium")
    shutil.copyfile(Path(__file__).parents[1] / "examples" / "photo.jpg", tmp_path / "face.jpg")
    problems = []
    with running(tmp_path, "--model", "random-tiny") as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(WAIT_MS)
            page.goto(server.url)
            field = lambda at: page.locator(f"{at} textarea, {at} input").first
            page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "face.jpg"))
            field("#steps").fill("10")
            field("#skip").fill("3")
            field("#concept").fill("glasses")
            page.locator("#add").click()
            playwright.expect(page.locator("#concepts textarea")).to_have_value("glasses")
            field("#concept").fill("beard")
            page.get_by_label("remove it").check()
            page.locator("#add").click()
            playwright.expect(page.locator("#concepts textarea")).to_have_value("glasses\n-beard")
            page.locator("#edit").click()
            playwright.expect(page.locator("#status textarea")).to_have_value(
                re.compile(r"^inverted 'face.jpg' in .* edited 7 steps in"), timeout=WAIT_MS)
            playwright.expect(page.locator("#edited img")).to_be_visible()
            playwright.expect(page.locator("#tiles img")).to_have_count(3)  # x0, glasses' mask, beard's mask
            playwright.expect(page.locator("#tiles")).to_contain_text("step 7 of 7")
            page.locator("#step input[type=number]").fill("3")
            page.locator("#step input[type=number]").press("Enter")
            playwright.expect(page.locator("#tiles")).to_contain_text("step 3 of 7")
            playwright.expect(page.locator("#command textarea")).to_have_value(
                re.compile(r"^minledits edit face.jpg .* -o edit.png$"))
            page.locator("#files").click()
            playwright.expect(page.locator("#downloads")).to_contain_text(re.compile(r"trace\s*\.safetensors"))
            page.screenshot(path=str(SHOT), full_page=True)
            page.locator("#method").get_by_label("p2p").check()  # no concepts in Prompt-to-Prompt: the list hides
            playwright.expect(page.locator("#concepts textarea")).to_be_hidden()
            playwright.expect(page.locator("#cross_replace")).to_be_visible()
            page.locator("#method").get_by_label("ledits", exact=True).check()
            playwright.expect(page.locator("#concepts textarea")).to_be_visible()
        finally:
            browser.close()
    if os.environ.get("MINLEDITS_SCREENSHOT"):
        shutil.copyfile(SHOT, DOCS)
    assert not problems, problems
