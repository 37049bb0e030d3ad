"""The night report in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver`` packages, installed here with apt-get when missing and run as root)
driven by selenium. Loads the report of the simulated night, checks every image decodes,
the metric tables are present and coloured, and the console is clean; saves screenshots to
``tests/output/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from debian import apt_install

OUTPUT = Path(__file__).parent / "output"
PACKAGES = ("chromium", "chromium-driver")


def _browser_binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def _install_chromium() -> str | None:
    """Install Debian's chromium and its driver when missing; a reason when impossible."""
    return apt_install(PACKAGES, lambda: all(_browser_binaries()))


@pytest.fixture(scope="module")
def browser():
    reason = _install_chromium()
    if reason:
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium never downloads a browser or a driver
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def _check_page(driver, page: Path, shot: str) -> dict:
    """Load ``page``; assert that every image decoded and the console holds no errors."""
    driver.get(page.as_uri())
    state = driver.execute_script(
        "return {ready: document.readyState,"
        " images: Array.from(document.images).map(i => [i.getAttribute('src'),"
        "   i.complete, i.naturalWidth]),"
        " tables: document.querySelectorAll('table.metrics').length,"
        " rows: document.querySelectorAll('tr.metric').length};")
    assert state["ready"] == "complete"
    assert state["images"], f"{page}: no images"
    broken = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not broken, f"{page}: images that did not decode: {broken}"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors {errors}"
    OUTPUT.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUTPUT / shot))
    assert (OUTPUT / shot).stat().st_size > 10_000
    return state


def _colour(driver, selector: str) -> set[str]:
    return set(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(e => getComputedStyle(e).backgroundColor);", selector))


def test_night_report_in_chromium(browser, reduced):
    """The report the night run wrote: every image decodes, the metric tables exist and
    their status cells are coloured (pass green, others not white), no console errors."""
    night = reduced / "NIGHTS" / "20181108"
    report = night / "report.html"
    assert report.exists(), "reduce_night did not write the QA report"
    state = _check_page(browser, report, "report_20181108.png")
    # four channels: trace, arc residuals, fiber-to-fiber and response plots each
    assert len(state["images"]) >= 4 * 3
    assert state["tables"] == 4 and state["rows"] >= 4 * 12
    green = _colour(browser, "td.pass")
    assert green == {"rgb(185, 228, 180)"}
    white = "rgba(0, 0, 0, 0)"
    assert white not in _colour(browser, "td.warn, td.fail, td.info")
    # every observation page, and the index over the nights
    pages = sorted(night.glob("obs_*.html"))
    assert len(pages) >= 2
    for page in pages:
        state = _check_page(browser, page, f"{page.stem}.png")
        assert state["tables"] >= 1
    browser.get((reduced / "NIGHTS" / "index.html").as_uri())
    links = browser.execute_script(
        "return Array.from(document.links).map(a => a.getAttribute('href'));")
    assert "20181108/report.html" in links


def test_report_is_offline(reduced):
    """No scripts, web fonts or remote resources in any page."""
    for page in (reduced / "NIGHTS").rglob("*.html"):
        text = page.read_text()
        for banned in ("<script", "@import", "@font-face", "http://", "https://", "//cdn"):
            assert banned not in text, f"{page}: contains {banned!r}"
