"""The chat page in a real browser: headless Chromium types a message into the page served by
`mlxchat serve`'s app, sends it, and the streamed reply of the tiny model shows up in the
conversation. With MLXCHAT_UPDATE_SCREENSHOT=1 it refreshes the screenshot README shows
(docs/chat-web.png); otherwise the screenshot stays in the test's temporary directory, so a
test run never changes a tracked file (no two renderings are byte-identical).

Selenium is pointed at Debian's chromium and chromedriver explicitly, so selenium-manager
never downloads a browser or driver; CI installs both (./setup.sh --test). The driver (and through it
the browser) runs without the test run's LD_PRELOAD: Chromium crashes at start with OpenBLAS
preloaded into it."""

import os
import shutil
from pathlib import Path

import pytest
from chatrun import RUN, make_chat_run
from liveserver import LiveServer

from mlxchat.chat_session import load_chat_model, stream_reply
from mlxchat.web import GenerationWorker, Sampling, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "chat-web.png"

# Skipped, with the reason in the summary, only outside CI: CI installs both (./setup.sh --test),
# so there a missing browser fails the test instead of hiding it.
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"),
                                reason="needs chromium and chromium-driver: ./setup.sh --test installs them")

GREEDY = Sampling(temperature=0.0, top_k=50, max_tokens=24)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,700"):
        options.add_argument(arg)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), env=env), options=options)
    yield driver
    driver.quit()


def test_message_sent_from_the_page_gets_a_streamed_reply(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    make_chat_run(tmp_path)
    question = "What is 12 * 7?"
    expected = "".join(stream_reply(load_chat_model(RUN, "sft", tmp_path), [{"role": "user", "content": question}],
                                    GREEDY.temperature, GREEDY.top_k, GREEDY.max_tokens))
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", tmp_path))
    with LiveServer(create_app(worker, GREEDY)) as url:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda d: "step 1" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "input").send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled()
                   and d.find_elements(By.CSS_SELECTOR, ".message.assistant"))
        user = browser.find_element(By.CSS_SELECTOR, ".message.user").text
        reply = browser.execute_script("return document.querySelector('.message.assistant').textContent")
        assert user == question
        assert reply == expected and reply.strip()
        assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")
        shot = tmp_path / "chat-web.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("MLXCHAT_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
