"""Drive the Prefect UI's deployment run form with the system's headless chromium (selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1400,2400",
)


def system_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) from the system (Debian packages chromium, chromium-driver), if installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser(browser: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.implicitly_wait(20)
    return session


def field(session, label: str):
    """The form property whose label reads `label` (innermost match)."""
    from selenium.webdriver.common.by import By

    return session.find_element(
        By.XPATH,
        (
            f"(//span[@class='schema-form-property__label' and normalize-space()='{label}'])[1]"
            "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
        ),
    )


def type_into(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)


def screenshot(session, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    session.save_screenshot(str(path))
    return path
