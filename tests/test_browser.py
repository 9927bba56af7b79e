"""End to end in a real browser: `streamlit run app.py` on loopback, Debian's chromium via Playwright.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or $ATLAS_CHROMIUM);
``playwright install`` is never used. Every page loads and draws its charts,
clicking a point of the Shape vs position scatter opens that instance's curve,
and a screenshot of each page is kept in ``artifacts/screenshots/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import runstore_factory as factory  # also puts the repository on sys.path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ATLAS_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# url path -> does the page draw a chart on the factory store?
PAGES = {
    "": True,
    "Score_curves": True,
    "Shape_vs_position": True,
    "Neighbourhoods": True,
    "Noise_sweep": True,
    "Cleaning_lab": True,
    "Run_a_study": False,
}
CHART = '[data-testid="stVegaLiteChart"] svg'
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"][data-test-connection-state="CONNECTED"]'

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)",
    ),
]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache: Path, port: int, log: Path) -> subprocess.Popen:
    """`streamlit run app.py` headless on loopback, reading ``cache``."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py")]
    cmd += [
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
    ]
    cmd += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    env = {**os.environ, "ATLAS_CACHE": str(cache)}
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Poll Streamlit's health endpoint until it answers 'ok'."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not become healthy at {url}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A running app on a fake store; yields its base URL."""
    root = tmp_path_factory.mktemp("browser")
    cache = factory.make_store(root / "cache")
    port = free_port()
    proc = start_server(cache, port, root / "streamlit.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's chromium driven by Playwright."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh tab with a desktop-sized viewport."""
    # Tall: Streamlit scrolls inside its own container, so a full-page shot is the viewport.
    context = browser.new_context(viewport={"width": 1400, "height": 2200})
    tab = context.new_page()
    tab.set_default_timeout(45_000)
    yield tab
    context.close()


def wait_idle(tab) -> None:
    """Wait until the app is connected and its script has finished running."""
    tab.wait_for_selector('[data-testid="stApp"]')
    tab.wait_for_selector(IDLE)


@pytest.mark.parametrize("path", list(PAGES))
def test_page_loads_and_draws(path, server, page):
    page.goto(f"{server}/{path}")
    wait_idle(page)
    if PAGES[path]:
        page.wait_for_selector(CHART)
        assert page.locator(CHART).count() >= 1
    else:
        page.get_by_role("button", name="Start the study").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(300)  # let Vega finish its transitions before the picture
    page.screenshot(path=str(SHOTS / f"{path or 'Home'}.png"), full_page=True)


def test_clicking_a_scatter_point_opens_its_curve(server, page):
    page.goto(f"{server}/Shape_vs_position?run=demo")
    wait_idle(page)
    scatter = page.locator('[data-testid="stVegaLiteChart"]').first
    scatter.locator("svg .mark-symbol path").first.wait_for()
    heading = page.get_by_text(re.compile(r"^Curve of test instance \d+$"))
    before = int(heading.inner_text().rsplit(" ", 1)[1])
    # a point of another shape than the current one, so it is not hidden under the selection
    points = scatter.locator("svg .mark-symbol path")
    labels = [points.nth(i).get_attribute("aria-label") or "" for i in range(points.count())]
    shape_before = re.search(
        r"shape: (\w+)", next(lb for lb in labels if f"test id: {before};" in lb)
    )
    target = next(
        i
        for i, lb in enumerate(labels)
        if f"shape: {shape_before.group(1)};" not in lb and "test id:" in lb
    )
    points.nth(target).click(force=True)
    page.wait_for_function(
        "(before) => !new URL(location.href).searchParams.get('test')?.match(new RegExp('^' + before + '$'))",
        arg=str(before),
    )
    wait_idle(page)
    clicked = int(re.search(r"[?&]test=(\d+)", page.url).group(1))
    assert clicked != before
    page.get_by_text(f"Curve of test instance {clicked}", exact=True).wait_for()
    curve = page.locator('[data-testid="stVegaLiteChart"]').nth(1)
    curve.locator("svg").wait_for()
    assert curve.get_by_text(re.compile(rf"^{clicked} \(")).count() >= 1  # the chart's title
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "Shape_vs_position_clicked.png"), full_page=True)


def test_shared_link_reproduces_the_view(server, page):
    page.goto(f"{server}/Score_curves?run=older-run&test=80")
    wait_idle(page)
    page.wait_for_selector(CHART)
    page.get_by_text("Curve of test instance 80", exact=True).wait_for()
    assert "run=older-run" in page.url and "test=80" in page.url
