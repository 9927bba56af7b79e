"""Benchmark the Streamlit lab: server-side render time per page, and time to first chart in a browser.

    python benchmarks/bench_app.py                 # on cache/demo (the shipped demo run)
    python benchmarks/bench_app.py --run cache/X   # on another run
    python benchmarks/bench_app.py --synthetic     # on a fake run of the paper's size

Server side: each page is run with Streamlit's AppTest (first run = cold caches,
then the median of warm re-runs; target ≤ 1 s). Browser: `streamlit run app.py`
on loopback and Debian's chromium; the app is opened once, then each page is
reached through the sidebar and timed until its first chart's SVG is drawn and
the script is idle (target ≤ 3 s). Prints both tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pages() -> dict[str, str | None]:
    """Title -> script of every page, from the app's one page list (ui/pages.py)."""
    from ui.pages import PAGES

    return {p.title: p.script for p in PAGES}


def load() -> str:
    """The machine's load averages and core count, printed beside every figure."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def server_side(cache: Path, run: str, repeat: int) -> list[tuple[str, float, float]]:
    """(page, cold seconds, median warm seconds) for every page via AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ["ATLAS_CACHE"] = str(cache)
    rows = []
    for name, path in _pages().items():
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.query_params["run"] = run
        if path:
            at.run()  # st.navigation registers the pages on the first run
            at.switch_page(path)
        t = time.perf_counter()
        at.run()
        cold = time.perf_counter() - t
        if at.exception:
            raise SystemExit(f"{name} raised: {at.exception[0].value}")
        warm = []
        for _ in range(repeat):
            t = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t)
        rows.append((name, cold, statistics.median(warm)))
    return rows


def browser_side(cache: Path, run: str) -> list[tuple[str, float, float]]:
    """(page, cold, warm): seconds from a sidebar click to the page's first chart drawn in
    headless chromium, on the first visit of each page and on a second round of visits."""
    tb = _load_test_browser()
    from playwright.sync_api import sync_playwright

    pages = _pages()
    port = tb.free_port()
    log = Path(tempfile.mkdtemp()) / "streamlit.log"
    proc = tb.start_server(cache, port, log)
    url = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {name: [] for name in pages}
    try:
        tb.wait_healthy(url, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(120_000)
            t = time.perf_counter()
            tab.goto(f"{url}/?run={run}")
            tab.wait_for_selector(tb.CHART)
            first_load = time.perf_counter() - t
            tb.wait_idle(tab)
            order = [*list(pages)[1:], list(pages)[0]]
            for _ in range(2):  # cold round, then warm round
                for name in order:
                    link = tab.locator('[data-testid="stSidebarNav"] a').filter(has_text=name)
                    t = time.perf_counter()
                    link.first.click()
                    title = "Influence Atlas" if pages[name] is None else name
                    # Done when the new page's title is up, its script is idle and a chart is
                    # drawn (the Run a study page has no chart: its start button instead).
                    target = 'button[kind="primary"]' if name == "Run a study" else tb.CHART
                    tab.wait_for_function(
                        "([title, sel]) => { const a = document.querySelector('[data-testid=stApp]');"
                        " const h = document.querySelector('h1');"
                        " return a && a.dataset.testScriptState === 'notRunning'"
                        " && h && h.innerText.trim() === title && document.querySelector(sel) !== null; }",
                        arg=[title, target],
                    )
                    times[name].append(time.perf_counter() - t)
                    tb.wait_idle(tab)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    rows = [("first load of the app (page, JS, Home's first run)", first_load, float("nan"))]
    return rows + [(name, t[0], t[1]) for name, t in times.items()]


def _load_test_browser():
    """``tests/test_browser.py`` (its server and browser helpers), with the factory it imports."""
    _load_tests_module("runstore_factory")
    return _load_tests_module("test_browser")


def _load_tests_module(name: str):
    """``tests/<name>.py``, loaded by its path (the tests folder is not a package) and
    registered as ``name`` so that the test modules importing it find it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """Parse arguments, pick the run, print both tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run", default=str(REPO / "cache" / "demo"), help="run folder (default cache/demo)"
    )
    ap.add_argument("--synthetic", action="store_true", help="use a fake run of the paper's size")
    ap.add_argument("--repeat", type=int, default=3, help="warm re-runs per page")
    ap.add_argument("--no-browser", action="store_true", help="server-side numbers only")
    args = ap.parse_args()

    run_dir = Path(args.run)
    if args.synthetic or not (run_dir / "manifest.json").exists():
        factory = _load_tests_module("runstore_factory")
        if not args.synthetic:
            print(f"{run_dir} not found: using a synthetic run of the paper's size instead.")
        tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-"))
        run_dir = factory.make_run(
            tmp, "demo", n_train=1600, n_val=200, n_test=200, n_flips=40, epochs=10, hidden=64
        )
        factory.make_sweep(tmp)
    cache, run = run_dir.parent, run_dir.name
    print(f"run: {run_dir}")

    print(f"\nServer-side render (AppTest), seconds; target ≤ 1 s warm; {load()}")
    print(f"{'page':<22}{'cold':>8}{'warm':>8}")
    for name, cold, warm in server_side(cache, run, args.repeat):
        flag = "" if warm <= 1.0 else "  > 1 s"
        print(f"{name:<22}{cold:>8.2f}{warm:>8.2f}{flag}")

    if args.no_browser:
        return
    tb = _load_test_browser()
    if not Path(tb.CHROMIUM).exists():
        print(f"\nBrowser numbers skipped: {tb.CHROMIUM} not found (apt-get install chromium).")
        return
    rows = browser_side(cache, run)
    print(
        "\nTime to first chart in chromium after a sidebar click, seconds; target ≤ 3 s cold, "
        f"≤ 1 s warm; {load()}"
    )
    print(f"{'page':<52}{'cold':>8}{'warm':>8}")
    for name, cold, warm in rows:
        flag = "" if (cold <= 3.0 and not warm > 1.0) or "first load" in name else "  over target"
        print(f"{name:<52}{cold:>8.2f}{warm:>8.2f}{flag}")


if __name__ == "__main__":
    main()
