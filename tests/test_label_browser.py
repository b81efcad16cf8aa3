"""The labeling page in a real browser: Debian's chromium driven by the PyPI ``playwright`` package (never
``playwright install``: its browser download cannot work here). A group is labeled by mouse and one by keyboard,
a label is undone, the log on disk is checked, and a screenshot is saved to ``test-artifacts/`` (git-ignored).

Without /usr/bin/chromium the test FAILS: CI installs it (``.ci/run``), and a skipped browser test proves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from label_server_fixture import REPO, LabelServer, make_label_workspace

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
LOG = Path("data/labels/labels.jsonl")


def records(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / LOG).read_text().splitlines()[1:]]


@pytest.fixture
def chromium():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does "
                    "it). This test drives a real browser and is never skipped.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -r requirements.lock", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return page, errors


def test_pair_mode_by_mouse_and_keyboard_with_undo(tmp_path: Path, chromium) -> None:
    from playwright.sync_api import expect

    ws = make_label_workspace(tmp_path / "ws", num_groups=3)
    with LabelServer(ws) as server:
        page, errors = open_page(chromium, f"{server.url}/?annotator=alice")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 0")
        expect(page.locator("#keys")).to_contain_text("0 or space tie")
        shown = [int(x) for x in page.locator("#images figure").evaluate_all("fs => fs.map(f => f.dataset.imageId)")]
        assert sorted(shown) == [0, 1]
        # both PNGs arrive and decode (32 px squares from the trajectory store)
        page.wait_for_function("() => [...document.querySelectorAll('#images img')]"
                               ".every(i => i.complete && i.naturalWidth === 32)")

        page.click("#choose-first")  # mouse: the left image is better
        expect(page.locator("#message")).to_have_text("Saved label #1 (group 0).")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 1")
        expect(page.locator("#progress")).to_have_text("alice: 1 labeled, 2 to go · groups complete 1/3")

        page.keyboard.press("2")  # keyboard: the right image is better
        expect(page.locator("#message")).to_have_text("Saved label #2 (group 1).")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 2")
        page.keyboard.press("u")  # undo it: the page goes back to group 1
        expect(page.locator("#message")).to_have_text("Undid label #2 (group 1).")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 1")
        expect(page.locator("#progress")).to_contain_text("alice: 1 labeled, 2 to go")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "label-page-pair.png"), full_page=True)

        page.keyboard.press(" ")  # tie
        expect(page.locator("#message")).to_have_text("Saved label #4 (group 1).")
        page.locator("#image-second").click()  # clicking an image chooses it
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#done-text")).to_have_text(
            "Everything is labeled: no group is left for alice (3 of 3 groups complete).")
        page.goto(f"{server.url}/summary")
        expect(page.locator("#totals")).to_contain_text("3 of 3 groups complete")
        assert errors == []
    recs = records(ws)
    assert [(r["kind"], r["seq"], r.get("group_id"), r.get("choice"), r.get("undoes")) for r in recs] == [
        ("label", 1, 0, "first", None), ("label", 2, 1, "second", None), ("undo", 3, None, None, 2),
        ("label", 4, 1, "tie", None), ("label", 5, 2, "second", None)]
    assert recs[0]["image_ids"] == shown and recs[0]["annotator"] == "alice"  # first = the image shown on the left


def test_tag_mode_by_mouse_and_keyboard_with_undo(tmp_path: Path, chromium) -> None:
    from playwright.sync_api import expect

    ws = make_label_workspace(tmp_path / "ws", num_groups=2, group_size=3,
                              human={"mode": "tag", "tags": ["deformed", "wrong digit", "unsafe"]})
    with LabelServer(ws) as server:
        page, errors = open_page(chromium, server.url + "/")
        expect(page.locator("#message")).to_have_text("Enter your name to start.")
        page.fill("#annotator", "bob")
        page.keyboard.press("Enter")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 0")
        expect(page.locator("#images figure")).to_have_count(3)

        page.click("#image-1 button[data-tag='deformed']")  # mouse: tag the second image, then submit
        expect(page.locator("#image-1 button[data-tag='deformed']")).to_have_attribute("aria-pressed", "true")
        page.click("#submit-tags")
        expect(page.locator("#message")).to_have_text("Saved label #1 (group 0).")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 1")

        for key in ["ArrowRight", "3", "ArrowRight", "2", "1", "1"]:  # keyboard: unsafe on 2nd, wrong digit on 3rd
            page.keyboard.press(key)
        expect(page.locator("#image-2")).to_have_class("focused")
        expect(page.locator("#image-2 button[data-tag='deformed']")).to_have_attribute("aria-pressed", "false")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "label-page-tag.png"), full_page=True)
        page.keyboard.press("Enter")
        expect(page.locator("#done")).to_be_visible()
        page.keyboard.press("u")
        expect(page.locator("#message")).to_have_text("Undid label #2 (group 1).")
        expect(page.locator("#prompt-text")).to_have_text("a handwritten digit 1")
        expect(page.locator("#images button[aria-pressed='true']")).to_have_count(0)  # a fresh start on the group
        assert errors == []
    recs = records(ws)
    assert [(r["kind"], r["seq"], r.get("tags"), r.get("undoes")) for r in recs] == [
        ("label", 1, {"0": [], "1": ["deformed"], "2": []}, None),
        ("label", 2, {"3": [], "4": ["unsafe"], "5": ["wrong digit"]}, None),
        ("undo", 3, None, 2)]
    assert all(r["annotator"] == "bob" for r in recs)
