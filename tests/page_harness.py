"""Open the app's pages under Streamlit's AppTest and read back what they drew.

Shared by the app's test files (test_app, test_app_shapes, test_app_replication, test_lesson):
pages are named by their key in the page registry (``ui/pages.py``), never by a script path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
from streamlit.testing.v1 import AppTest

from ui.pages import PAGES as PAGE_SPECS

REPO = Path(__file__).resolve().parents[1]
PAGES = {p.key: p.script for p in PAGE_SPECS}  # key -> script (None: the home page)


def open_page(
    page: str,
    cache_dir: Path,
    monkeypatch,
    query: dict[str, str] | None = None,
    timeout: float = 60,
) -> AppTest:
    """Run one page of the app (entry point app.py, as `streamlit run` does) against a store."""
    monkeypatch.setenv("ATLAS_CACHE", str(cache_dir))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=timeout)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    if PAGES[page]:
        at.run()  # st.navigation registers the pages on the first run
        at.switch_page(PAGES[page])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts_named(at: AppTest, name: str) -> list[tuple[dict, list[pd.DataFrame]]]:
    """(spec, datasets) of every chart whose usermeta names it ``name``."""
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        if spec.get("usermeta", {}).get("atlas") == name:
            frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in el.proto.datasets]
            out.append((spec, frames))
    return out


def one_chart(at: AppTest, name: str) -> tuple[dict, list[pd.DataFrame]]:
    """The one chart named ``name`` (fails when there are none or several)."""
    found = charts_named(at, name)
    assert len(found) == 1, f"expected one '{name}' chart, found {len(found)}"
    return found[0]


def frame_with(frames: list[pd.DataFrame], *columns: str) -> pd.DataFrame:
    """The dataset that has all ``columns``."""
    hits = [f for f in frames if set(columns) <= set(f.columns)]
    assert hits, f"no dataset with columns {columns}: {[list(f.columns) for f in frames]}"
    return hits[0]


def qp(at: AppTest, key: str) -> str:
    """A query parameter of the page after its run (AppTest may hold a str or a list)."""
    value = at.query_params[key]
    return value[0] if isinstance(value, list) else value


def texts(at: AppTest) -> str:
    """All markdown, captions, headers, info/error/code text of a page, joined."""
    parts = []
    for kind in (
        "markdown",
        "caption",
        "header",
        "subheader",
        "title",
        "info",
        "error",
        "warning",
        "code",
        "success",
    ):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)
