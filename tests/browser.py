"""Headless Chromium under Selenium for the chat page's tests: Debian's `chromium` and `chromium-driver`
(installed by `make install-test`), never a browser downloaded by Selenium Manager."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# .ci/run sets this: there a missing browser fails the tests instead of skipping them.
REQUIRE = "LAPE_AWQ_REQUIRE_BROWSER"


def binaries() -> tuple[str, str]:
    """Chromium and its driver, or a skip (a failure where the browser is required)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = "no headless Chromium: `apt-get install chromium chromium-driver` (make install-test does it)"
    if os.environ.get(REQUIRE):
        pytest.fail(reason)
    pytest.skip(reason)


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A headless Chromium window that records the page's console."""
    from selenium import webdriver

    browser, driver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument("--lang=ko-KR")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (Chromium's SEVERE entries)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot_ab(url: str, out_dir: str, question: str, max_tokens: int = 64) -> None:
    """The README's screenshots: the page at `url` asks its default pair `question` (greedy), then is saved
    at desktop and phone widths as chat-desktop.png and chat-phone.png in `out_dir`."""
    from pathlib import Path

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(1280, 900) as driver:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "model-a").get_attribute("value"))
        for field, value in (("max-tokens", str(max_tokens)), ("temperature", "0"), ("prompt", question)):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 600).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-state='done']")) == 2
        )
        out = Path(out_dir)
        driver.save_screenshot(str(out / "chat-desktop.png"))
        driver.set_window_size(390, 1100)
        driver.save_screenshot(str(out / "chat-phone.png"))


if __name__ == "__main__":  # python tests/browser.py http://127.0.0.1:8000/ docs "서울을 소개해 주세요."
    import sys

    screenshot_ab(sys.argv[1], sys.argv[2], sys.argv[3])
