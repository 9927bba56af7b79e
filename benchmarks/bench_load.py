"""How many viewers one host serves: N concurrent browser sessions on each page of the demo.

    python benchmarks/bench_load.py                          # N = 5, 10, 20 on every page
    python benchmarks/bench_load.py --sessions 5 --pages Home "Score curves"

`streamlit run app.py` on loopback (read-only, as the container serves it) and Debian's
chromium: for each page and each N, N browser tabs (separate sessions) open the page at
the same moment; each is timed until its first chart's SVG is drawn (Run a study: its
page title). Printed per (page, N): median and max time to first chart, the server's
resident memory (RSS) at the peak of that round and after the tabs are closed, beside the
warm RSS measured once the server has served one visit of every page, and the machine's
load, and the server's CPU seconds per session (the browsers run on the same machine, so wall
times include their rendering; the server's CPU per session is what a host with remote viewers
pays). Times are wall-clock on a shared machine: read them with the load printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_test_browser():
    """The browser tests' server and browser helpers, through bench_app's loader (by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_app", REPO / "benchmarks" / "bench_app.py")
    bench_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_app)
    return bench_app._load_test_browser()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (its own threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _one(browser, url: str, target: str) -> float:
    """Seconds from opening a new session on ``url`` to ``target`` being drawn."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    page.set_default_timeout(300_000)
    t = time.perf_counter()
    await page.goto(url)
    await page.wait_for_selector(target)
    took = time.perf_counter() - t
    await ctx.close()
    return took


async def _round(browser, url: str, target: str, n: int, pid: int) -> tuple[list[float], float]:
    """N sessions at once; returns their times and the server's peak RSS during the round."""
    peak = rss_mb(pid)
    tasks = [asyncio.create_task(_one(browser, url, target)) for _ in range(n)]
    while not all(t.done() for t in tasks):
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.2)
    return [t.result() for t in tasks], peak


async def main_async(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    from ui.pages import PAGES

    tb = _load_test_browser()
    cache = Path(args.cache).resolve()
    port = tb.free_port()
    log = Path(tempfile.mkdtemp()) / "streamlit.log"
    os.environ["ATLAS_READONLY"] = "1"
    proc = tb.start_server(cache, port, log)
    base = f"http://127.0.0.1:{port}"
    pages = [p for p in PAGES if not args.pages or p.title in args.pages]
    try:
        tb.wait_healthy(base, proc)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
            # Warm: one visit of every page, so caches hold what a steady host holds.
            for p in pages:
                await _one(browser, f"{base}/{p.url_path}?run={args.run}", _target(p, tb))
            await asyncio.sleep(2)
            warm = rss_mb(proc.pid)
            print(f"server warm RSS {warm:.0f} MiB after one visit of each page; {_load()}")
            print(
                f"{'page':<22}{'N':>4}{'median s':>10}{'max s':>8}{'peak RSS':>10}{'after':>8}  load"
            )
            for p in pages:
                url = f"{base}/{p.url_path}?run={args.run}"
                for n in args.sessions:
                    cpu0 = cpu_s(proc.pid)
                    times, peak = await _round(browser, url, _target(p, tb), n, proc.pid)
                    per_session = (cpu_s(proc.pid) - cpu0) / n
                    await asyncio.sleep(3)  # let sessions expire their scripts
                    after = rss_mb(proc.pid)
                    print(
                        f"{p.title:<22}{n:>4}{statistics.median(times):>10.2f}{max(times):>8.2f}"
                        f"{peak:>9.0f}M{after:>7.0f}M{per_session:>9.2f}  {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            await browser.close()
        print(f"server RSS at the end {rss_mb(proc.pid):.0f} MiB (warm {warm:.0f} MiB)")
    finally:
        proc.terminate()
        proc.wait(10)


def _target(page, tb) -> str:
    """What 'the page is drawn' means: its first chart, or Run a study's title."""
    return "h1" if page.script and "Run_a_study" in page.script else tb.CHART


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(REPO / "cache"), help="run store (default cache/)")
    ap.add_argument("--run", default="demo", help="run shown (default demo)")
    ap.add_argument(
        "--sessions",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[5, 10, 20],
        help="concurrent sessions per round, comma-separated (default 5,10,20)",
    )
    ap.add_argument("--pages", nargs="*", help="page titles (default: every page)")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
