"""The web page of ``peg-rag serve`` in a real headless Chromium (Debian's ``chromium``,
driven by Playwright over its own executable: no browser is downloaded).

It asks for the API key, searches as you type and shows the ranked chunks with their
per-stage scores and the query's words highlighted, never searches while an input method
is composing, and chats with citations against a stand-in LLM. Screenshots go to the
test's temporary folder.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from serve_utils import REPLY, build_index, fake_llm, prompted_model, running, wait_ready

from peg_rag.apps.rag_chat import NO_LLM_NOTICE
from peg_rag.serve import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
expect.set_options(timeout=30_000)  # a loaded CI machine may take seconds to answer
KEY = "page-key"
QUERY = "异地就医备案"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(
            "the browser test needs Debian's chromium: apt-get install chromium fonts-noto-cjk"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("page")
    model = prompted_model(root / "tiny-zh", tiny_model_dir)
    return model, build_index(root / "kb", model)


@pytest.fixture(scope="module")
def server(index) -> Iterator[str]:
    model, kb = index
    with fake_llm() as llm:
        settings = ServeSettings(
            model=str(model),
            indexes={"kb": kb},
            api_key=KEY,
            llm_model="fake-qwen",
            llm_base_url=llm,
        )
        with running(create_app(settings)) as url:
            wait_ready(url)
            yield url


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """The page, past its API key prompt, with the index list loaded."""
    context = browser.new_context(viewport={"width": 1100, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.goto(server)
    expect(page.locator("#key-form")).to_be_visible()  # the API answered 401
    page.fill("#key", KEY)
    page.click("#key-form button")
    expect(page.locator("#index option")).to_have_text(["kb (30 chunks)"])
    expect(page.locator("#key-form")).to_be_hidden()
    yield page
    context.close()


def retrieve_requests(page: Page) -> list[dict]:
    """Bodies of the page's /v1/retrieve calls, as they happen."""
    seen: list[dict] = []
    page.on(
        "request",
        lambda request: (
            seen.append(request.post_data_json) if request.url.endswith("/v1/retrieve") else None
        ),
    )
    return seen


def test_search_shows_the_ranked_chunks_with_stage_scores_and_highlights(page, server, tmp_path):
    page.fill("#query", QUERY)  # typing; the search fires once typing pauses
    results = page.locator("#results > li")
    expect(results).to_have_count(5)
    expected = httpx.post(
        f"{server}/v1/retrieve",
        json={"index": "kb", "query": QUERY, "k": 5},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["results"]
    assert [results.nth(i).get_attribute("data-id") for i in range(5)] == [
        r["id"] for r in expected
    ]
    first = results.first
    assert first.locator(".score").inner_text() == f"{expected[0]['score']:.4f}"
    assert expected[0]["metadata"]["title"] in first.inner_text()
    assert f"domain: {expected[0]['metadata']['domain']}" in first.inner_text()
    stages = first.locator(".stages").inner_text()
    assert "dense #" in stages or "bm25 #" in stages
    marks = page.locator("#results mark").all_inner_texts()
    assert marks and all(len(m) >= 2 and m in QUERY for m in marks)  # query words, marked
    page.screenshot(path=tmp_path / "search.png", full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 10_000


def test_no_search_fires_while_an_input_method_composes(page):
    seen = retrieve_requests(page)
    page.focus("#query")
    cdp = page.context.new_cdp_session(page)
    for typed in ("y", "yi", "yid", "yidi"):  # pinyin being composed, as an IME shows it
        cdp.send(
            "Input.imeSetComposition",
            {"text": typed, "selectionStart": len(typed), "selectionEnd": len(typed)},
        )
        time.sleep(0.15)
    assert page.input_value("#query") == "yidi"
    time.sleep(1.0)  # well past the 300 ms pause after which typing searches
    assert seen == []
    cdp.send("Input.insertText", {"text": "异地"})  # the candidate is chosen
    expect(page.locator("#results > li").first).to_be_visible()
    assert [body["query"] for body in seen] == ["异地"]


def test_chat_streams_an_answer_with_citations(page, tmp_path):
    page.click("#tab-chat")
    expect(page.locator("#llm-note")).to_have_text("LLM: fake-qwen")
    page.fill("#question", "异地就医需要备案吗？")
    page.press("#question", "Enter")
    answer = page.locator(".answer").first
    expect(answer).to_have_text("".join(REPLY))
    citations = answer.locator("a.cite")
    expect(citations).to_have_text(["[1]", "[2]"])
    assert citations.first.get_attribute("href") == "#turn0-source-1"
    sources = page.locator(".sources li")
    expect(sources).to_have_count(4)
    assert sources.first.get_attribute("id") == "turn0-source-1"
    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_without_an_llm_the_page_says_so_and_answers_extractively(browser, index):
    model, kb = index
    settings = ServeSettings(model=str(model), indexes={"kb": kb})
    with running(create_app(settings)) as url:
        wait_ready(url)
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#index option")).to_have_count(1)
        expect(page.locator("#key-form")).to_be_hidden()  # this server needs no key
        page.click("#tab-chat")
        expect(page.locator("#llm-note")).to_contain_text("No LLM configured")
        page.fill("#question", "异地就医需要备案吗？")
        page.press("#question", "Enter")
        answer = page.locator(".answer").first
        expect(answer).to_contain_text(NO_LLM_NOTICE)
        expect(answer.locator("a.cite").first).to_have_text("[1]")
        page.close()
