"""The search page in a real browser (Playwright for Python driving Debian's chromium): type a query and
see the grid the library's own search gives; upload an image and see its label bars (the library's
Classifier order) and itself as the first similar image; click a result to search by it; the state is in
the URL. Screenshots go to tests/artifacts/. In CI (env CI set) a browser that cannot start fails the
test with the reason; elsewhere the test is skipped with it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from clipforge.serve.app import create_app
from clipforge.serve.server import running
from clipforge.use.classify import Classifier
from clipforge.use.search import Searcher
from serve_helpers import build_index_dir, make_service

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
LABELS = ["a red thing", "a green thing", "a blue thing"]


def _no_browser(reason: str) -> None:
    message = (
        f"the browser test cannot run: {reason}. Install Debian's chromium (`apt-get install -y chromium`, "
        "which `make setup` does) and playwright (`pip install -e '.[dev]'`)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _no_browser(f"playwright is not installed ({e})")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        _no_browser(f"no chromium at {CHROMIUM}")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # the launcher's own words say what is missing
            _no_browser(f"chromium did not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


def test_search_page_query_upload_labels(browser, tmp_path):
    ckpt, emb, images = build_index_dir(tmp_path)
    service = make_service(ckpt, emb)
    lib = Searcher(emb, encoder=service.encoder)
    query = "a purple picture"
    expected = lib.search(lib.query(text=query), k=24)[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with running(create_app(service)) as base:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('images')")
        assert not page.is_visible("#key-form")  # no key asked on loopback

        page.fill("#q", query)
        page.press("#q", "Enter")  # keyboard only
        page.wait_for_selector(".tile")
        tiles = page.locator(".tile")
        assert tiles.count() == len(expected)
        assert tiles.first.get_attribute("data-id") == str(expected[0]["id"])
        assert "q=a+purple+picture" in page.url
        page.wait_for_function("[...document.querySelectorAll('.tile img')].every(i => i.complete)")
        page.screenshot(path=str(ARTIFACTS / "serve-text-search.png"))

        target = images[4]
        want = Classifier(service.encoder, LABELS).classify([target], top_k=3)[0][0]
        page.fill("#labels", ", ".join(LABELS))
        page.set_input_files("#file", str(target))
        page.wait_for_selector(".label-row")
        rows = page.locator(".label-row .label-name")
        assert rows.all_inner_texts() == want["labels"]
        page.wait_for_function("document.getElementById('message').textContent.includes('img004.jpg')")
        first = page.locator(".tile").first
        assert first.get_attribute("data-key") == target.name  # itself, the most similar image
        page.screenshot(path=str(ARTIFACTS / "serve-upload-labels.png"), full_page=True)

        second = page.locator(".tile").nth(1)
        second_id = second.get_attribute("data-id")
        second.click()
        page.wait_for_function(f"new URLSearchParams(location.search).get('id') === '{second_id}'")
        page.wait_for_function(f"document.querySelector('.tile')?.dataset.id === '{second_id}'")
        page.go_back()  # the upload (its URL is the bare page)
        page.go_back()  # the text search, run again from its URL
        page.wait_for_function("new URLSearchParams(location.search).get('q') === 'a purple picture'")
        page.wait_for_function(f"document.querySelector('.tile')?.dataset.id === '{expected[0]['id']}'")
        assert not errors, errors
        page.close()


def test_page_under_a_low_max_k_and_a_hostile_caption(browser, tmp_path):
    """A server started with --max-k 5 (the page asked for 24 and every search failed with bad_k), and a
    caption holding HTML shown as text, never run."""
    ckpt, emb, images = build_index_dir(tmp_path)
    service = make_service(ckpt, emb, max_k=5)
    caption = '<img src=x onerror="window.hacked=1"><script>window.hacked=2</script>'
    with running(create_app(service)) as base:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        new_id = page.request.post(
            base + "/v1/index/add",
            multipart={
                "files": {"name": "x.png", "mimeType": "image/png", "buffer": images[1].read_bytes()},
                "captions": caption,
            },
        ).json()["ids"][0]
        page.goto(f"{base}/?id={new_id}")
        page.wait_for_function("document.querySelector('.tile') || document.querySelector('#message.error')")
        assert page.locator(".tile").count() == 5, page.inner_text("#message")
        assert page.locator(".tile .key").first.inner_text() == caption  # the markup as text
        assert page.evaluate("window.hacked") is None
        assert not errors, errors
        page.close()
