"""Driving the web console in Debian's headless Chromium (Selenium), shared by the console's
browser tests: the browser itself and a page object for what a person at the console does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
WAIT = 10  # seconds any page or element may take


def chromium(download_dir: Path | None = None, insecure_certs: bool = False) -> webdriver.Chrome:
    """Headless Chromium at 1280x900 keeping its console log; files it downloads go to
    ``download_dir`` without asking; ``insecure_certs`` accepts a server certificate it cannot
    verify (a self-signed test CA the browser does not know)."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if insecure_certs:
        options.accept_insecure_certs = True
    if download_dir is not None:
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(download_dir),
                "download.prompt_for_download": False,
            },
        )
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    if download_dir is not None:
        try:
            driver.execute_cdp_cmd(
                "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
            )
        except BaseException:
            driver.quit()
            raise
    return driver


def left_the_page(element: WebElement) -> Callable[[object], bool]:
    """A wait condition: `element` (of the page before a click) is gone, the next page is here.

    Selenium's `staleness_of` knows only the stale-reference answer; while a page is being
    replaced chromedriver may instead answer that the node "does not belong to the document"
    (an unknown error), which means the same."""

    def gone(_driver: object) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    return gone


@dataclass
class ConsolePage:
    """The browser at the console of the control plane at ``url``; ``accounts`` maps a role to
    the (name, password) of its console account."""

    driver: webdriver.Chrome
    url: str
    accounts: Mapping[str, tuple[str, str]]

    def go(self, path: str) -> None:
        self.driver.get(self.url + path)

    def path(self) -> str:
        return urlsplit(self.driver.current_url).path

    def h1(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "h1").text

    def notice(self) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, "p.notice").text

    def wait_h1(self, text: str) -> None:
        WebDriverWait(self.driver, WAIT).until(
            lambda d: d.find_element(By.TAG_NAME, "h1").text == text,
            f"no page with the heading {text!r} (at {self.driver.current_url})",
        )

    def field(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def fill(self, element_id: str, value: str) -> None:
        box = self.field(element_id)
        box.clear()
        box.send_keys(value)

    def press(self, button: WebElement) -> None:
        """Click a submit button and wait for the page it leads to."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        button.click()
        WebDriverWait(self.driver, WAIT).until(left_the_page(old))

    def press_and_confirm(self, button: WebElement) -> str:
        """Click a button of a form that asks first (data-confirm), accept the question and
        wait for the page the form leads to; returns the question."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        button.click()
        alert = WebDriverWait(self.driver, WAIT).until(ec.alert_is_present())
        question = alert.text
        alert.accept()
        WebDriverWait(self.driver, WAIT).until(left_the_page(old))
        return question

    def button(self, text: str, scope: str = "main") -> WebElement:
        found = [
            b
            for b in self.driver.find_elements(By.CSS_SELECTOR, f"{scope} button")
            if b.text == text
        ]
        assert len(found) == 1, f"{len(found)} buttons {text!r} on {self.driver.current_url}"
        return found[0]

    def nav(self) -> list[str]:
        return [a.text for a in self.driver.find_elements(By.CSS_SELECTOR, "header nav a")]

    def open_nav(self, text: str) -> None:
        link = self.driver.find_element(By.CSS_SELECTOR, "header nav").find_element(
            By.LINK_TEXT, text
        )
        old = self.driver.find_element(By.TAG_NAME, "html")
        link.click()
        WebDriverWait(self.driver, WAIT).until(left_the_page(old))

    def sign_in(self, role: str) -> None:
        name, password = self.accounts[role]
        self.go("/console/login")
        self.wait_h1("Sign in to the vpnfleet console")
        self.fill("name", name)
        self.fill("password", password)
        self.press(self.button("Sign in"))
        self.wait_h1("Fleet")
        assert self.path() == "/console/"
        who = self.driver.find_element(By.CSS_SELECTOR, "header .who").text
        assert who == f"{name} ({role})"

    def sign_out(self) -> None:
        self.press(self.button("Sign out", scope="header"))
        self.wait_h1("Sign in to the vpnfleet console")

    def rows(self) -> list[list[str]]:
        return [
            [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in self.driver.find_elements(By.CSS_SELECTOR, "main table tbody tr")
        ]

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(SHOTS / f"{name}.png"))
