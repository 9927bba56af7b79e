"""The app's page list, in one place: app.py builds the navigation from it, the tests walk it,
and the README's page table follows its order.

Each entry names the page's script (None for the home page, which app.py draws itself), the
title the sidebar shows, its icon and its URL path (``http://host/<url_path>``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageSpec:
    """One page of the app."""

    key: str  # short name used by tests
    title: str  # what the sidebar and the browser tab call it
    icon: str  # drawn with the bundled Material Symbols font (the tab's icon is FAVICON)
    url_path: str  # "" for the home page
    script: str | None  # path relative to app.py; None: the home page (ui.screens.home)
    blurb: str = ""  # one line for the home page's list of pages


PAGES: tuple[PageSpec, ...] = (
    PageSpec(
        "home", "Home", ":material/explore:", "", None, "this page: pick a run, read its summary."
    ),
    PageSpec(
        "curves",
        "Score curves",
        ":material/show_chart:",
        "Score_curves",
        "pages/1_Score_curves.py",
        "the sorted curves of the misclassified test instances (Fig. 1).",
    ),
    PageSpec(
        "shape",
        "Shape vs position",
        ":material/scatter_plot:",
        "Shape_vs_position",
        "pages/2_Shape_vs_position.py",
        "S against end ratio or distance (Fig. 3); click a point to open its curve.",
    ),
    PageSpec(
        "replication",
        "Does the paper hold?",
        ":material/fact_check:",
        "Does_the_paper_hold",
        "pages/8_Does_the_paper_hold.py",
        "each claim of the paper tested across conditions and seeds, with its evidence.",
    ),
    PageSpec(
        "lesson",
        "Lesson: the three shapes",
        ":material/co_present:",
        "Lesson",
        "pages/9_Lesson.py",
        "a guided lesson in five steps on the teaching run, a question at each step.",
    ),
    PageSpec(
        "learn",
        "Learn the shapes",
        ":material/school:",
        "Learn_the_shapes",
        "pages/7_Learn_the_shapes.py",
        "the S, Z and backslash patterns taught from the run's own curves.",
    ),
    PageSpec(
        "neighbourhoods",
        "Neighbourhoods",
        ":material/hub:",
        "Neighbourhoods",
        "pages/3_Neighbourhoods.py",
        "distances in the model's [CLS] space and a map of all instances (Fig. 2).",
    ),
    PageSpec(
        "sweep",
        "Noise sweep",
        ":material/stacked_line_chart:",
        "Noise_sweep",
        "pages/4_Noise_sweep.py",
        "accuracy and loss against the number of flipped labels (Fig. 4–5).",
    ),
    PageSpec(
        "cleaning",
        "Cleaning lab",
        ":material/cleaning_services:",
        "Cleaning_lab",
        "pages/5_Cleaning_lab.py",
        "detectors that rank suspects, and whether fixing them helps.",
    ),
    PageSpec(
        "study",
        "Run a study",
        ":material/science:",
        "Run_a_study",
        "pages/6_Run_a_study.py",
        "run the experiment on a built-in dataset or your own file.",
    ),
)

BY_KEY = {p.key: p for p in PAGES}
FAVICON = "🧭"


def pages_markdown() -> str:
    """The page list as Markdown bullets (the home page shows it)."""
    return "\n".join(f"* **{p.title}** — {p.blurb}" for p in PAGES if p.script)


def navigation():
    """The ``st.navigation`` of every page (call once, from app.py); returns the chosen page."""
    import streamlit as st

    from ui.screens import home

    pages = [
        st.Page(
            p.script or home.render,
            title=p.title,
            icon=p.icon,
            url_path=p.url_path or None,
            default=p.script is None,
        )
        for p in PAGES
    ]
    # The tab's icon first: an emoji becomes a data: URL in the browser, while a page's
    # ":material/…" icon as favicon would be fetched from fonts.gstatic.com (a request leaving
    # the page, failing offline).
    st.set_page_config(page_icon=FAVICON, layout="wide")
    return st.navigation(pages)


def link_target(key: str):
    """What ``st.page_link`` / ``st.switch_page`` take for a page: its script, or the home page."""
    import streamlit as st

    spec = BY_KEY[key]
    if spec.script:
        return spec.script
    from ui.screens import home

    return st.Page(home.render, title=spec.title, icon=spec.icon, default=True)
