"""Score curves (paper Fig. 1): small multiples of sorted TracIn curves, one enlarged with tooltips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from core import store
from ui import charts, compute, data, widgets

SUMMED = "sum over checkpoints"
PANEL_POINTS = 150  # points per small multiple (every flipped instance is kept on top)
ENLARGED_POINTS = 2000


@dataclass
class Curve:
    """One test instance's sorted curve ready to draw."""

    test_id: int
    points: pd.DataFrame  # rank, train_id, score, flipped, text, label, observed_label
    lines: dict[str, float]  # a_reg, b_reg, a_end, b_end, s (and s_raw when known)
    shape: str
    n: int  # full curve length (the points may be thinned)


def score_sources(run: data.Run) -> list[str]:
    """'sum over checkpoints' plus one entry per checkpoint when per-checkpoint scores exist."""
    options = [SUMMED]
    if run.has(store.TRACIN_PER_CHECKPOINT):
        cps = run.manifest.get("checkpoints") or []
        k = run.per_checkpoint().shape[0]
        for i in range(k):
            epoch = cps[i].get("epoch", i + 1) if i < len(cps) else i + 1
            options.append(f"checkpoint {i + 1} (epoch {epoch})")
    return options


def load_curve(run: data.Run, test_id: int, source: str, max_points: int) -> Curve:
    """The curve of ``test_id`` for the summed score (curves.parquet when present) or one checkpoint.

    Cached per process: widget changes re-run the page, and the same curves come back.
    """
    files = (store.SHAPES, store.CURVES, store.TRACIN, store.TRACIN_PER_CHECKPOINT, store.ANALYSIS)
    stamps = tuple(data.stamp(run.file(f)) for f in files)
    return _cached_curve(str(run.path), stamps, int(test_id), source, int(max_points))


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_curve(
    path: str, stamps: tuple[int, ...], test_id: int, source: str, max_points: int
) -> Curve:
    """``_load_curve`` keyed by the run's file stamps (a recomputed run is re-read)."""
    return _load_curve(data.Run(path), test_id, source, max_points)


def _load_curve(run: data.Run, test_id: int, source: str, max_points: int) -> Curve:
    """Build one curve from the run store (uncached)."""
    shapes = run.shapes().set_index("id")
    s_min, z_max = run.thresholds()
    if source == SUMMED:
        curves = run.curves()
        pts = (
            compute.curve_from_long(curves, test_id, run.train, max_points)
            if curves is not None
            else None
        )
        if pts is not None:
            row = shapes.loc[test_id]
            if {"a_reg", "b_reg", "a_end", "b_end"} <= set(shapes.columns):
                lines = {k: float(row[k]) for k in ("a_reg", "b_reg", "a_end", "b_end")}
                lines["s"] = float(row["s"])
            else:  # older analyze output: refit on the stored (possibly thinned) curve
                lines = compute.fit_lines(pts["score"].to_numpy())
            return Curve(test_id, pts, lines, str(row["shape"]), len(run.train))
        scores = np.asarray(run.tracin()[run.test_row(test_id)], dtype=np.float64)
    else:
        k = score_sources(run).index(source) - 1
        scores = np.asarray(run.per_checkpoint()[k, run.test_row(test_id)], dtype=np.float64)
    lines = compute.fit_lines(np.sort(scores)[::-1])
    pts = compute.sorted_curve(scores, run.train, max_points)
    shape = compute.classify(lines["s"], s_min, z_max)
    return Curve(test_id, pts, lines, shape, len(scores))


def render() -> None:
    """Draw the Score curves page."""
    widgets.run_page(
        "Score curves",
        ":material/show_chart:",
        (
            "Paper Fig. 1: for each test instance, every training instance's TracIn score sorted from "
            "most helpful to most harmful. Red: flipped labels; blue: clean. Yellow: least-squares line; "
            "green: the line joining the ends."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Controls, the enlarged curve and the small multiples."""
    shapes = run.shapes()
    run.tracin()  # fail early, with the command to run, when TracIn is missing
    sources = score_sources(run)
    sb = st.sidebar
    source = sb.selectbox(
        "Score",
        sources,
        key="curves_source",
        help="The summed TracIn score, or one checkpoint's η-weighted contribution.",
    )
    which = sb.radio(
        "Test instances", ["misclassified", "all"], key="curves_which", horizontal=True
    )
    kinds = sb.multiselect(
        "Shapes", list(compute.SHAPES), default=list(compute.SHAPES), key="curves_shapes"
    )
    max_panels = sb.slider("Panels at most", 3, 48, 12, step=3, key="curves_panels")

    test_id = widgets.pick_test(run, shapes, where=st, label="Enlarge test instance")
    enlarged(run, test_id, source)

    sel = shapes[shapes["shape"].isin(kinds)]
    if which == "misclassified" and "correct" in sel:
        sel = sel[~sel["correct"].astype(bool)]
    # The paper's order: most S-shaped first, down to the most Z-shaped.
    sel = sel.sort_values("s", ascending=False)
    st.subheader(f"{min(len(sel), max_panels)} of {len(sel)} {which} test instances")
    if sel.empty:
        st.info("No test instance matches these filters.")
        return
    points, lines, order = panels(run, sel.head(max_panels), source)
    st.altair_chart(charts.small_multiples(points, lines, order), width="content")


def panels(
    run: data.Run, sel: pd.DataFrame, source: str
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Stacked points and line segments of the selected test instances, with panel titles."""
    pts, lns, order = [], [], []
    correct = sel.set_index("id")["correct"] if "correct" in sel else None
    for test_id in sel["id"].astype(int):
        c = load_curve(run, test_id, source, PANEL_POINTS)
        ok = None if correct is None else bool(correct.loc[test_id])
        title = compute.panel_title(test_id, c.shape, c.lines["s"], ok)
        order.append(title)
        pts.append(c.points[["rank", "score", "flipped"]].assign(panel=title))
        lns.append(compute.line_rows(c.lines, c.n).assign(panel=title))
    return pd.concat(pts, ignore_index=True), pd.concat(lns, ignore_index=True), order


def enlarged(run: data.Run, test_id: int, source: str) -> None:
    """One curve, large, with text tooltips and the facts about its flipped instances."""
    c = load_curve(run, test_id, source, ENLARGED_POINTS)
    row = run.shapes().set_index("id").loc[test_id]
    inst = run.instances.iloc[test_id]
    names = run.label_names
    title = compute.panel_title(test_id, c.shape, c.lines["s"])
    st.subheader(f"Curve of test instance {test_id}")
    left, right = st.columns([3, 1])
    with left:
        chart = charts.curve_chart(
            c.points,
            compute.line_rows(c.lines, c.n),
            title=title,
            label_names=names,
            score_title="TracIn" if source == SUMMED else "contribution",
        )
        st.altair_chart(chart, width="stretch")
    with right:
        st.markdown(f"> {inst['text']}")
        st.markdown(
            f"true label **{names[int(inst['label'])]}**"
            + ("" if row.get("correct", True) else " · **misclassified**")
        )
        st.metric(
            "S-shapedness",
            widgets.fmt(c.lines["s"], "+.3f"),
            c.shape,
            delta_color="off",
            delta_arrow="off",
        )
        flips = c.points[c.points["flipped"]]
        ratio = compute.end_ratio(flips["rank"].to_numpy(), c.n)
        st.metric(
            "end ratio of flipped",
            widgets.fmt(ratio, ".1f") + " %",
            help="0 % centre, 100 % ends, 50 % random",
        )
        st.caption(
            f"{len(flips)} flipped of {c.n} training instances; {len(c.points)} points drawn."
        )
    with st.expander(f"The {len(flips)} flipped training instances on this curve"):
        table = flips[["rank", "train_id", "score", "text"]].copy()
        table["label used"] = [names[int(v)] for v in flips["observed_label"]]
        table["true label"] = [names[int(v)] for v in flips["label"]]
        st.dataframe(table, hide_index=True, width="stretch")
