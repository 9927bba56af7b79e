"""End to end in a real browser: `streamlit run app.py` on loopback, Debian's chromium via Playwright.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or $ATLAS_CHROMIUM);
``playwright install`` is never used. Three servers: the shipped run store as a fresh clone
has it (``git archive`` of ``cache/``), every page on the shipped runs at 390, 1,280 and
1,920 px, failing on a clipped chart title or a page wider than the window, with a full-page
screenshot of each kept in ``artifacts/layout/<run>/<width>/`` (gitignored; ``problems.txt``
beside them lists what failed); a fake store for the interactions (click a scatter point,
follow a link, reveal the flips, download); and a store full of hostile texts (Markdown
images, HTML, ``javascript:`` links, a very long line, right-to-left and zero-width characters
in dataset text, run, file and column names) on which no page may make the browser request
anything outside the app.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import runstore_factory as factory

from core.storage import store
from ui.pages import PAGES as PAGE_SPECS

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
# url path -> does the page draw a chart (every page but Run a study)
PAGES = {p.url_path: p.key != "study" for p in PAGE_SPECS}
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


def start_server(
    cache: Path, port: int, log: Path, env_extra: dict[str, str] | None = None
) -> subprocess.Popen:
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
    env = {**os.environ, "ATLAS_CACHE": str(cache), **(env_extra or {})}
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


@contextlib.contextmanager
def serving(cache: Path, root: Path, env_extra: dict[str, str] | None = None) -> Iterator[str]:
    """A running app on ``cache``; yields its base URL."""
    port = free_port()
    proc = start_server(cache, port, root / f"streamlit-{port}.log", env_extra)
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
def server(tmp_path_factory) -> Iterator[str]:
    """A running app on the fake store (with hostile texts, see hostile_store); its base URL."""
    root = tmp_path_factory.mktemp("browser")
    with serving(hostile_store(root / "cache"), root) as url:
        yield url


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory) -> Iterator[str]:
    """The app on the run store a fresh clone has: the committed files of cache/, nothing else."""
    root = tmp_path_factory.mktemp("shipped")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD", "cache"], cwd=REPO, capture_output=True
    )
    if archive.returncode != 0 or not archive.stdout:
        pytest.skip("not a git checkout with a committed cache/")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    with serving(root / "cache", root) as url:
        yield url


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


# One pass over a page at one width: what the test fails on, measured in the browser.
#  - overflow: the page is wider than the window (document or Streamlit's main container);
#  - wide: a chart's drawing is wider than its own frame or sticks out of the window;
#  - clipped: a chart title (Vega's role-title text) lies outside its chart's frame or svg, or
#    was shortened with an ellipsis by a title `limit`;
#  - marks / visible: an empty chart, or none drawn.
LAYOUT_REPORT = """() => {
  const doc = document.documentElement;
  const vw = doc.clientWidth;
  const main = document.querySelector('[data-testid="stMain"]');
  const overflow = Math.max(doc.scrollWidth - vw, main ? main.scrollWidth - main.clientWidth : 0);
  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map((el) => {
    const svg = el.querySelector('svg');
    const frame = el.getBoundingClientRect();
    const box = svg ? svg.getBoundingClientRect() : null;
    const name = (svg && svg.getAttribute('aria-label')) || '';
    const clipped = [];
    if (svg && box.width > 0) {
      svg.querySelectorAll('.role-title-text, .role-title text').forEach((t) => {
        const r = t.getBoundingClientRect();
        const text = t.textContent || '';
        if (!r.width || !text) return;
        const left = Math.max(frame.left, box.left, 0) - 1;
        const right = Math.min(frame.right, box.right, vw) + 1;
        const top = Math.max(frame.top, box.top) - 1;
        const bottom = Math.min(frame.bottom, box.bottom) + 1;
        const outside = r.left < left || r.right > right || r.top < top || r.bottom > bottom;
        if (outside || text.endsWith('\u2026')) clipped.push(text);
      });
    }
    return {
      name,
      clipped: [...new Set(clipped)],
      marks: el.querySelectorAll('svg .role-mark > *').length,
      // checkVisibility: a chart in a closed tab or expander keeps a stale box nobody sees
      visible: !!(box && box.width > 0 && box.height > 0 && el.checkVisibility()),
      wide: box ? Math.round(Math.max(box.right - Math.min(frame.right, vw), box.width - frame.width)) : 0,
    };
  });
  // Text an element cuts off (overflow hidden or an ellipsis): a page link's label, a metric,
  // an expander's title. Scrolling frames (a dataframe) scroll and are not counted; tiny
  // boxes are screen-reader copies (KaTeX) and radio inputs, drawn 1 px wide on purpose.
  const cut = [];
  (main || doc).querySelectorAll('*').forEach((el) => {
    if (el.closest('svg') || el.clientWidth < 20 || el.scrollWidth <= el.clientWidth + 1) return;
    const style = getComputedStyle(el);
    if (!['hidden', 'clip'].includes(style.overflowX) || !el.checkVisibility()) return;
    const text = (el.textContent || '').trim();
    if (text) cut.push(text.slice(0, 80));
  });
  return {overflow: Math.round(overflow), charts, cut: [...new Set(cut)]};
}"""
LAYOUT_WIDTHS = (1280, 390, 1920)  # a laptop (first: the one most people use), phone, projector
# The runs a fresh clone ships: the English demo (the default), the paper-size run and the
# Japanese run (CJK text, scores with outliers).
LAYOUT_RUNS = ("demo", "paper-s2", "ja-demo")
LAYOUT_SHOTS = REPO / "artifacts" / "layout"


def layout_problems(report: dict, where: str, has_chart: bool) -> list[str]:
    """What LAYOUT_REPORT found wrong, one sentence per problem."""
    out = []
    if report["overflow"] > 1:
        out.append(f"{where}: the page is {report['overflow']} px wider than the window")
    out += [f"{where}: text {t!r} is cut off" for t in report["cut"]]
    drawn = [c for c in report["charts"] if c["visible"]]
    if has_chart and not drawn:
        out.append(f"{where}: no chart")
    for c in drawn:
        if not c["marks"]:
            out.append(f"{where}: empty chart {c['name']!r}")
        if c["wide"] > 2:
            out.append(f"{where}: chart {c['name']!r} is {c['wide']} px wider than its frame")
        out += [f"{where}: chart title {t!r} is cut off" for t in c["clipped"]]
    return out


HEIGHT = 1400  # the window's height while checking; a screenshot grows it to the page's
CLOSED_EXPANDERS = '[data-testid="stExpander"] details:not([open]) > summary'
PAGE_HEIGHT = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  return Math.max(document.documentElement.scrollHeight, main ? main.scrollHeight : 0);
}"""


# Every chart on view as wide as its frame: Vega has re-laid out the charts after a resize
# (each is sized by its column, and redraws when a ResizeObserver fires).
RELAID_OUT = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
  .filter((el) => el.checkVisibility())
  .every((el) => {
    const svg = el.querySelector('svg');
    return svg && Math.abs(svg.getBoundingClientRect().width - el.getBoundingClientRect().width) <= 2;
  })"""


def relaid_out(tab) -> None:
    """Wait (3 s at most) until Vega has redrawn the charts at the new width. A chart that
    stays wider than its frame is not waited for: LAYOUT_REPORT reports it."""
    timeout = pytest.importorskip("playwright.sync_api").TimeoutError
    tab.wait_for_timeout(150)  # the ResizeObserver's first callback
    with contextlib.suppress(timeout):
        tab.wait_for_function(RELAID_OUT, timeout=3_000, polling=100)


def open_expanders(tab) -> None:
    """Open every expander (a browser-side toggle, no rerun), so what is in them is checked too."""
    for _ in range(tab.locator(CLOSED_EXPANDERS).count()):
        tab.locator(CLOSED_EXPANDERS).first.click()
    wait_idle(tab)


def full_screenshot(tab, path: Path, width: int) -> None:
    """The whole page: Streamlit scrolls inside its own container, so the window is made as
    tall as the page (capped) for the picture."""
    height = min(int(tab.evaluate(PAGE_HEIGHT)), 16_000)
    if height > HEIGHT:
        tab.set_viewport_size({"width": width, "height": height})
        tab.wait_for_timeout(300)
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(path), full_page=True)


def walk(tab, url: str, widths: tuple[int, ...], has_chart: bool, shots: Path, name: str) -> list:
    """Open ``url`` once with its expanders open, then at each width: check the layout and
    keep a screenshot in ``shots/<width>/<name>.png``."""
    problems: list[str] = []
    tab.set_viewport_size({"width": widths[0], "height": HEIGHT})
    tab.goto(url)
    settle(tab, has_chart)
    open_expanders(tab)
    for width in widths:
        tab.set_viewport_size({"width": width, "height": HEIGHT})
        relaid_out(tab)
        settle(tab, has_chart)
        where = f"{name} at {width} px"
        if tab.locator('[data-testid="stException"]').count():
            problems.append(f"{where}: exception")
        if tab.locator('[data-testid="stAlertContentError"]').count():
            problems.append(f"{where}: error message")
        problems += layout_problems(tab.evaluate(LAYOUT_REPORT), where, has_chart)
        full_screenshot(tab, shots / str(width) / f"{name}.png", width)
    return problems


def settle(tab, charts: bool) -> None:
    """Wait for the script to finish and, on a page with charts, for Vega to draw them."""
    wait_idle(tab)
    if charts:
        tab.wait_for_selector(CHART)
        tab.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=\"stVegaLiteChart\"]')]"
            ".every((el) => el.querySelector('svg .role-mark > *'))"
        )
    tab.wait_for_timeout(250)  # Vega's last transition before the picture


def test_no_page_clips_a_title_or_overflows_at_three_widths(shipped_server, browser):
    """A fresh clone's store, every page of ui/pages.py on the shipped runs at 390 / 1,280 /
    1,920 px: no exception, no error, no empty chart, no chart wider than its frame, no chart
    title cut off (outside its chart or shortened with an ellipsis) and no page wider than the
    window. Each page loads once per run and the window is resized (the layout is the
    browser's work); a screenshot of each page x width is kept in artifacts/layout/<run>/<width>/.
    """
    problems: list[str] = []
    context = browser.new_context(viewport={"width": LAYOUT_WIDTHS[0], "height": HEIGHT})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    try:
        for run in LAYOUT_RUNS:
            for path, has_chart in PAGES.items():
                url = f"{shipped_server}/{path}?run={run}"
                problems += walk(
                    tab, url, LAYOUT_WIDTHS, has_chart, LAYOUT_SHOTS / run, path or "Home"
                )
    finally:
        context.close()
    (LAYOUT_SHOTS / "problems.txt").write_text("".join(f"{p}\n" for p in problems), "utf-8")
    assert not problems, f"{len(problems)} layout problems:\n" + "\n".join(problems)


# Breakages made in the page itself, each of which LAYOUT_REPORT must see: a chart title moved
# above its svg (what Streamlit's zero top padding did), one shortened with an ellipsis (what
# a title `limit` does), one pushed past the chart's right edge, and a page wider than the window.
BREAK_TITLE = """(how) => {
  const t = document.querySelectorAll('[data-testid="stVegaLiteChart"] svg .role-title-text text')[0];
  if (how === 'up') t.setAttribute('transform', 'translate(0,-30)');
  if (how === 'ellipsis') t.textContent = t.textContent.slice(0, 8) + '\u2026';
  if (how === 'right') t.setAttribute('transform', 'translate(4000,9)');
  return t.textContent;
}"""
SQUEEZE_CAPTION = """() => {
  const c = document.querySelector('[data-testid="stMain"] [data-testid="stCaptionContainer"]');
  Object.assign(c.style, {width: '60px', overflow: 'hidden', whiteSpace: 'nowrap'});
  return c.textContent.trim().slice(0, 80);
}"""
WIDEN_PAGE = """() => {
  const d = document.createElement('div');
  d.style.width = '3000px'; d.style.height = '10px';
  document.querySelector('[data-testid="stMainBlockContainer"]').appendChild(d);
}"""


def test_the_layout_check_sees_a_clipped_title_and_an_overflowing_page(shipped_server, page):
    """The walk above can fail: on Home, a teaching curve's title moved out of its chart, one
    cut with an ellipsis or pushed past the right edge, a caption cut off by its box and a page
    made wider than the window are each reported."""
    page.set_viewport_size({"width": 390, "height": HEIGHT})
    page.goto(shipped_server)
    settle(page, True)
    assert layout_problems(page.evaluate(LAYOUT_REPORT), "Home", True) == []
    for how in ("up", "ellipsis", "right"):
        page.reload()
        settle(page, True)
        title = page.evaluate(BREAK_TITLE, how)
        found = layout_problems(page.evaluate(LAYOUT_REPORT), "Home", True)
        assert found == [f"Home: chart title {title!r} is cut off"], how
    page.reload()
    settle(page, True)
    caption = page.evaluate(SQUEEZE_CAPTION)
    found = layout_problems(page.evaluate(LAYOUT_REPORT), "Home", True)
    assert found == [f"Home: text {caption!r} is cut off"]
    page.evaluate(WIDEN_PAGE)
    found = layout_problems(page.evaluate(LAYOUT_REPORT), "Home", True)
    assert any(re.fullmatch(r"Home: the page is \d+ px wider than the window", f) for f in found)


def test_sidebar_calls_the_home_page_home(server, page):
    page.goto(server)
    wait_idle(page)
    nav = page.locator('[data-testid="stSidebarNav"]')
    assert nav.get_by_text("Home", exact=True).count() == 1
    assert nav.get_by_text("app", exact=True).count() == 0
    for spec in PAGE_SPECS:
        assert nav.get_by_text(spec.title, exact=True).count() == 1


def test_cleaning_lab_reveal_and_download(server, page):
    page.goto(f"{server}/Cleaning_lab")
    settle(page, True)
    assert page.get_by_text(re.compile(r"are flipped \(")).count() == 0
    page.get_by_text("reveal flipped").click()
    page.get_by_text(re.compile(r"of the top \d+ are flipped")).wait_for()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download this review queue (CSV)").click()
    frame = pd.read_csv(dl.value.path())
    assert "text" in frame.columns and "flipped" not in frame.columns and len(frame) >= 5


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
    # the enlarged curve's chart carries the clicked instance in its title, e.g. "141 (S) · S = ..."
    title = page.locator('[data-testid="stVegaLiteChart"] svg').get_by_text(
        re.compile(rf"^{clicked} \(")
    )
    title.first.wait_for()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "Shape_vs_position_clicked.png"), full_page=True)


def test_shared_link_reproduces_the_view(server, page):
    page.goto(f"{server}/Score_curves?run=older-run&test=80")
    wait_idle(page)
    page.wait_for_selector(CHART)
    page.get_by_text("Curve of test instance 80", exact=True).wait_for()
    assert "run=older-run" in page.url and "test=80" in page.url


# -- untrusted text is text ----------------------------------------------------------------------

TRAP = "127.0.0.1:9"  # the discard port: anything asking for it is a request that left the page
HOSTILE = [
    f"![x](http://{TRAP}/p.png) a Markdown image in a review",
    f'<img src="http://{TRAP}/h.png"><script>fetch("http://{TRAP}/s")</script> raw HTML',
    f"[click me](javascript:fetch('http://{TRAP}/j')) a javascript: link",
    "a very long line " + "A" * 6000,
    "\u202eRTL override \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 zero\u200bwidth\u200d\ufeff",
    ":material/warning: :red[colour] $x^2$ **bold** `code` <b>b</b>",
    f"<style>body{{background:url(http://{TRAP}/c.png)}}</style> CSS",
    f"![y](http:&#47;&#47;{TRAP}&#47;e.png) an entity-encoded image",
]
HOSTILE_RUN = "[run](javascript:alert(1))"
HOSTILE_FILE = f"![f](http:&#47;&#47;{TRAP}&#47;f.png).csv"


def hostile_store(cache: Path) -> Path:
    """The fake store with every instance text hostile, a hostile run name and export name."""
    factory.make_store(cache)
    for run in ("demo", "older-run"):
        path = cache / run / "instances.parquet"
        inst = pd.read_parquet(path)
        inst["text"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(inst))]
        inst.to_parquet(path)
    shutil.copytree(cache / "older-run", cache / HOSTILE_RUN)
    exports = cache / "demo" / store.CLEANING_DIR
    exports.mkdir(exist_ok=True)
    (exports / HOSTILE_FILE).write_text("id,text\n1,x\n", "utf-8")
    return cache


def outside_requests(tab, base: str, visit) -> list[str]:
    """URLs the page asked for outside the app while ``visit()`` ran."""
    seen: list[str] = []
    tab.on("request", lambda r: seen.append(r.url))
    visit()
    tab.wait_for_timeout(500)  # let any late image or script request show up
    host = urllib.parse.urlsplit(base).netloc
    return [
        u
        for u in seen
        if not u.startswith(("data:", "blob:", "about:"))
        and urllib.parse.urlsplit(u).netloc != host
    ]


def assert_inert(tab) -> None:
    """No element built from the texts: no trap image, no javascript: link, no injected tag."""
    assert tab.locator(f'img[src*="{TRAP}"]').count() == 0
    assert tab.locator('a[href^="javascript:"]').count() == 0
    assert tab.locator('[data-testid="stException"]').count() == 0


def test_hostile_texts_stay_text_on_every_page(server, page):
    def visit():
        for path, has_chart in PAGES.items():
            page.goto(f"{server}/{path}?run=demo")
            settle(page, has_chart)
            assert_inert(page)

    assert outside_requests(page, server, visit) == []


def test_hostile_run_names_links_and_uploads_stay_text(server, page):
    quoted = urllib.parse.quote(HOSTILE_RUN)
    trap_link = urllib.parse.quote(f"![q](http://{TRAP}/q.png)")

    def visit():
        page.goto(f"{server}/?run={quoted}")
        settle(page, True)
        page.get_by_role("heading", name=re.compile(r"^Run \[run\]")).wait_for()
        page.goto(f"{server}/Neighbourhoods?run={trap_link}")
        settle(page, True)
        page.get_by_text("The link asks for run").wait_for()
        page.goto(f"{server}/Run_a_study")
        wait_idle(page)
        page.get_by_text("upload a file").click()
        wait_idle(page)
        rows = "\n".join(
            f'"{HOSTILE[i % 3]}",{"<b>p</b>" if i % 2 else f"![n](http://{TRAP}/n.png)"}'
            for i in range(40)
        )
        header = f'"![c](http://{TRAP}/col.png)","<img src=http://{TRAP}/l.png>"'
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            {"name": HOSTILE_FILE, "mimeType": "text/csv", "buffer": f"{header}\n{rows}\n".encode()}
        )
        page.get_by_text("Label column", exact=True).wait_for()
        wait_idle(page)

    assert outside_requests(page, server, visit) == []
    assert_inert(page)


# -- the guess-the-shape exercise ----------------------------------------------------------------
#
# On the shipped English demo: its default view (all checkpoints, raw) holds no Z curve, the
# stored per-checkpoint views do, so a Z only ever comes up if the exercise draws from them.

EXERCISE = "Learn_the_shapes?run=demo"
SHAPE_CLASSES = ("S", "backslash", "Z")
VERDICT = re.compile(r"(Right|Not quite): you said (\w+); this curve is (\w+)\.")
SCORE = re.compile(r"Score this session: (\d+) of (\d+)\.")
HIDDEN_TITLE = re.compile(r"^test instance \d+$")  # the guess's panel title until Reveal


def open_exercise(tab, base: str):
    """Open the Learn page with its charts drawn; the exercise's radio group."""
    tab.goto(f"{base}/{EXERCISE}")
    settle(tab, True)
    return tab.locator('[data-testid="stRadio"]').filter(has_text="Your guess")


def guess_radios(group) -> dict[str, object]:
    """Each answer's radio input, by its label."""
    return {cls: group.get_by_role("radio", name=cls, exact=True) for cls in SHAPE_CLASSES}


def verdict(tab) -> tuple[str, str, str] | None:
    """(Right / Not quite, the guess, the curve's class) from the revealed answer, or None."""
    alert = tab.locator('[data-testid="stAlert"]').filter(has_text=VERDICT)
    if not alert.count():
        return None
    return VERDICT.search(alert.first.inner_text()).groups()


def score(tab) -> tuple[int, int]:
    """(right, answered) from the page's score line."""
    found = SCORE.search(tab.get_by_text(SCORE).first.inner_text())
    return int(found.group(1)), int(found.group(2))


def first_curve(tab) -> tuple[str, str]:
    """What identifies the curve on show: its panel title (the test id) and its view caption."""
    title = tab.locator(f"{CHART}").get_by_text(HIDDEN_TITLE).first.text_content()
    caption = tab.get_by_text(re.compile(r"^This curve is shown under ")).first.inner_text()
    return title, caption


def choose_and_reveal(tab, group, cls: str) -> tuple[str, str, str]:
    """Pick ``cls``, press Reveal (enabled only once a guess is picked); the verdict."""
    group.get_by_text(cls, exact=True).click()
    reveal = tab.get_by_role("button", name="Reveal")
    tab.wait_for_function(
        "() => [...document.querySelectorAll('button')].some("
        "(b) => b.innerText.trim() === 'Reveal' && !b.disabled)"
    )
    reveal.click()
    tab.locator('[data-testid="stAlert"]').filter(has_text=VERDICT).wait_for()
    wait_idle(tab)
    found = verdict(tab)
    assert found is not None
    return found


def test_exercise_starts_unanswered_and_locks_at_reveal(shipped_server, page):
    """A fresh session: no answer picked and Reveal disabled. After Reveal, the verdict shows,
    every answer is disabled, a click on another answer changes neither the choice nor the
    verdict, and the session's score counts the one answer."""
    group = open_exercise(page, shipped_server)
    radios = guess_radios(group)
    assert all(r.count() == 1 for r in radios.values())
    assert [cls for cls, r in radios.items() if r.is_checked()] == []  # nothing preselected
    assert page.get_by_role("button", name="Reveal").is_disabled()
    assert verdict(page) is None and score(page) == (0, 0)
    assert page.locator(CHART).get_by_text(HIDDEN_TITLE).count() == 1  # class not in the title
    said = verdict_before = choose_and_reveal(page, group, "S")
    assert said[1] == "S" and said[2] in SHAPE_CLASSES
    assert said[0] == ("Right" if said[2] == "S" else "Not quite")
    assert score(page) == (int(said[0] == "Right"), 1)
    assert all(r.is_disabled() for r in radios.values())
    assert page.get_by_role("button", name="Reveal").is_disabled()
    # Try to change the guess (to the right answer when S was wrong): nothing may change.
    other = said[2] if said[2] != "S" else "Z"
    group.get_by_text(other, exact=True).click(force=True)
    page.wait_for_timeout(500)  # a rerun, if the click started one
    wait_idle(page)
    assert radios["S"].is_checked() and not radios[other].is_checked()
    assert verdict(page) == verdict_before
    assert score(page) == (int(said[0] == "Right"), 1)


DRAWS = 30


def test_exercise_draws_all_three_classes_and_keeps_score(shipped_server, page):
    """Over 30 curves drawn with 'Another curve' in one session, S, backslash and Z each come
    up (classes read from the revealed answers); every new curve starts unanswered and the
    score counts every answer and every right one."""
    group = open_exercise(page, shipped_server)
    radios = guess_radios(group)
    seen: list[str] = []
    right = 0
    for n in range(1, DRAWS + 1):
        assert not any(r.is_checked() for r in radios.values()), f"draw {n} starts answered"
        guess = SHAPE_CLASSES[n % 3]
        outcome, said, cls = choose_and_reveal(page, group, guess)
        assert said == guess and outcome == ("Right" if cls == guess else "Not quite")
        right += cls == guess
        seen.append(cls)
        assert score(page) == (right, n)
        page.get_by_role("button", name="Another curve").click()
        page.locator('[data-testid="stAlert"]').filter(has_text=VERDICT).wait_for(state="detached")
        wait_idle(page)
    assert set(seen) == set(SHAPE_CLASSES), f"classes drawn: {seen}"
    assert score(page) == (right, DRAWS)  # a new curve keeps the session's score


def test_exercise_never_opens_on_the_same_curve_twice(shipped_server, browser):
    """Two fresh sessions, one after the other, open the exercise on different curves (test
    instance or view)."""
    firsts = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 2200})
        try:
            tab = context.new_page()
            tab.set_default_timeout(45_000)
            open_exercise(tab, shipped_server)
            firsts.append(first_curve(tab))
        finally:
            context.close()
    assert firsts[0] != firsts[1], firsts
