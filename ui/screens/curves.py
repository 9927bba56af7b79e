"""Score curves (paper Fig. 1): sorted TracIn curves under a chosen view, and how they form over training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import lesson as core_lesson
from core.analysis import shapes as core_shapes
from core.analysis import views
from core.storage import store
from ui import charts, compute, data, influence, widgets

PANEL_POINTS = 150  # points per small multiple (every flipped instance is kept on top)
ENLARGED_POINTS = 2000
SUMMED_UP_TO = "sum of checkpoints 1…c"
ALONE = "checkpoint c alone"


@dataclass
class Curve:
    """One test instance's sorted curve ready to draw."""

    test_id: int
    points: pd.DataFrame  # rank, train_id, score, flipped, text, label, observed_label
    lines: dict[str, float]  # a_reg, b_reg, a_end, b_end, s, s_bulk
    shape: str
    n: int  # full curve length (the points may be thinned)
    end_ratio: float
    clip: compute.AxisClip | None = None  # a robust y axis when a few scores dwarf the rest


def load_curve(run: data.Run, test_id: int, view: views.View, max_points: int) -> Curve:
    """The curve of ``test_id`` under ``view``; cached per process, keyed by the run's file stamps."""
    files = (
        store.SHAPES,
        store.CURVES,
        store.TRACIN,
        store.TRACIN_PER_CHECKPOINT,
        store.ANALYSIS,
        store.GRAD_NORMS_TRAIN,
    )
    stamps = tuple(data.stamp(run.file(f)) if run.has(f) else 0 for f in files)
    return _cached_curve(str(run.path), stamps, int(test_id), view.key, int(max_points))


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_curve(
    path: str, stamps: tuple[int, ...], test_id: int, key: str, max_points: int
) -> Curve:
    """``_load_curve`` keyed by the run's file stamps (a recomputed run is re-read)."""
    return _load_curve(data.Run(path), test_id, views.View.parse(key), max_points)


def _load_curve(run: data.Run, test_id: int, view: views.View, max_points: int) -> Curve:
    """Build one curve from the run store (uncached), every number from core's definitions."""
    train = run.train
    flipped_all = train["flipped"].to_numpy(bool)
    if influence.is_default(run, view) and run.curves() is not None:
        curves = run.curves()
        c = curves[curves["test_id"] == test_id].sort_values("rank")
        if len(c):
            row = run.shapes().set_index("id").loc[test_id]
            keep = core_shapes.downsample_curve(
                c["score"].to_numpy(np.float64), c["flipped"].to_numpy(bool), max_points
            )
            clip = compute.robust_axis(c["score"].to_numpy(np.float64))
            c = c.iloc[keep]
            lines = {k: float(row[k]) for k in ("a_reg", "b_reg", "a_end", "b_end", "s")}
            lines["s_bulk"] = float(row.get("s_bulk", np.nan))
            return Curve(
                test_id,
                _with_text(run, c["rank"], c["train_id"], c["score"], c["flipped"]),
                lines,
                str(row["shape"]),
                len(train),
                float(row["end_ratio"]),
                clip,
            )
    scores = influence.view_row(run, view, test_id)
    cls = core_shapes.classify(scores, flipped_all, rule=run.rule())
    order = core_shapes.sort_order(scores)
    keep = core_shapes.downsample_curve(scores[order], flipped_all[order], max_points)
    pos = order[keep]
    lines = {k: float(cls[k][0]) for k in ("a_reg", "b_reg", "a_end", "b_end", "s", "s_bulk")}
    pts = _with_text(run, keep, train["id"].to_numpy()[pos], scores[pos], flipped_all[pos])
    return Curve(
        test_id,
        pts,
        lines,
        str(cls["shape"][0]),
        len(scores),
        float(cls["end_ratio"][0]),
        compute.robust_axis(scores),
    )


def draw_panel(
    run: data.Run,
    test_id: int,
    view: views.View,
    *,
    correct: bool | None = None,
    suffix: str = "",
    height: int = 170,
    max_points: int = PANEL_POINTS,
    reveal: bool = True,
) -> compute.AxisClip | None:
    """One small curve panel, stretched to its column; returns its axis clip (None: the full
    range). The Vega-Lite spec is cached per process: building and validating an Altair chart
    costs ~0.15 s, and a page draws a dozen."""
    files = (store.SHAPES, store.CURVES, store.TRACIN_PER_CHECKPOINT, store.ANALYSIS)
    stamps = tuple(data.stamp(run.file(f)) if run.has(f) else 0 for f in files)
    spec = _panel_spec(
        str(run.path), stamps, int(test_id), view.key, correct, suffix, height, max_points, reveal
    )
    st.vega_lite_chart(spec, width="stretch")
    return load_curve(run, test_id, view, max_points).clip


@st.cache_data(show_spinner=False, max_entries=1024)
def _panel_spec(
    path: str,
    stamps: tuple[int, ...],
    test_id: int,
    key: str,
    correct: bool | None,
    suffix: str,
    height: int,
    max_points: int,
    reveal: bool,
) -> dict:
    """The Vega-Lite dict of one panel (``reveal`` False hides the flips and the lines)."""
    run, view = data.Run(path), views.View.parse(key)
    c = load_curve(run, test_id, view, max_points)
    lines = compute.line_rows(c.lines, c.n)
    points = c.points
    title = compute.panel_title(test_id, c.shape, c.lines["s_bulk"], correct) + suffix
    if not reveal:
        title = f"test instance {test_id}{suffix}"
        points, lines = points.assign(flipped=False), lines.iloc[0:0]
    clip = None if c.clip is None else (c.clip.lo, c.clip.hi)
    chart = charts.panel_chart(
        points, lines, title, influence.score_title(view), height=height, clip=clip
    )
    return chart.to_dict()


def draw_curve(run: data.Run, test_id: int, view: views.View) -> Curve:
    """The enlarged curve with text tooltips (spec cached like :func:`draw_panel`); returns it."""
    files = (store.SHAPES, store.CURVES, store.TRACIN_PER_CHECKPOINT, store.ANALYSIS)
    stamps = tuple(data.stamp(run.file(f)) if run.has(f) else 0 for f in files)
    spec = _curve_spec(str(run.path), stamps, int(test_id), view.key)
    st.vega_lite_chart(spec, width="stretch")
    return load_curve(run, test_id, view, ENLARGED_POINTS)


@st.cache_data(show_spinner=False, max_entries=256)
def _curve_spec(path: str, stamps: tuple[int, ...], test_id: int, key: str) -> dict:
    """The Vega-Lite dict of one enlarged curve."""
    run, view = data.Run(path), views.View.parse(key)
    c = load_curve(run, test_id, view, ENLARGED_POINTS)
    chart = charts.curve_chart(
        c.points,
        compute.line_rows(c.lines, c.n),
        title=compute.panel_title(test_id, c.shape, c.lines["s_bulk"]),
        label_names=run.label_names,
        score_title=influence.score_title(view),
        clip=None if c.clip is None else (c.clip.lo, c.clip.hi),
    )
    return chart.to_dict()


def _with_text(run: data.Run, rank, train_id, score, flipped) -> pd.DataFrame:
    """Curve points joined with the training rows' text and labels (for tooltips)."""
    ids = np.asarray(train_id, dtype=np.int64)
    meta = run.instances.iloc[ids]
    return pd.DataFrame(
        {
            "rank": np.asarray(rank, dtype=np.int64),
            "train_id": ids,
            "score": np.asarray(score, dtype=np.float64),
            "flipped": np.asarray(flipped, dtype=bool),
            "text": meta["text"].to_numpy(),
            "label": meta["label"].to_numpy(),
            "observed_label": meta["observed_label"].to_numpy(),
        }
    )


def render() -> None:
    """Draw the Score curves page."""
    widgets.run_page(
        "curves",
        (
            "Paper Fig. 1: for each test instance, every training instance's TracIn score sorted from "
            "most helpful to most harmful. Red: flipped labels; blue: clean. Yellow: least-squares line; "
            "green: the line joining the ends."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Controls, the enlarged curve, how it formed over training, and the small multiples."""
    run.tracin()  # fail early, with the command to run, when TracIn is missing
    sb = st.sidebar
    view = influence.pick_view(run)
    if influence.n_checkpoints(run) > 1:
        sb.caption(
            "*Checkpoints summed* sets the view of every chart on this page except the panel "
            "under *Built up over training*, which steps through training with its own "
            "*Checkpoint c*."
        )
    table = influence.view_table(run, view)
    which = sb.radio(
        "Test instances", ["misclassified", "all"], key="curves_which", horizontal=True
    )
    kinds = sb.multiselect(
        "Shapes",
        list(core_shapes.SHAPE_ORDER),
        default=list(core_shapes.SHAPE_ORDER),
        key="curves_shapes",
    )
    max_panels = sb.slider("Panels at most", 3, 48, 12, step=3, key="curves_panels")
    n_cols = sb.slider("Panels per row", 1, 6, 3, key="curves_columns")

    # The paper's order, under the view shown: most S-shaped first, down to the most Z-shaped.
    ordered = table.sort_values("s_bulk", ascending=False, kind="stable")
    test_id = widgets.pick_test(run, ordered, where=st, label="Enlarge test instance")
    enlarged(run, test_id, view)
    over_training(run, test_id, view)

    sel = ordered[ordered["shape"].isin(kinds)]
    if which == "misclassified" and "correct" in sel:
        sel = sel[~sel["correct"].astype(bool)]
    st.subheader(f"{min(len(sel), max_panels)} of {len(sel)} {which} test instances")
    st.caption(
        f"View: {view.label(influence.n_checkpoints(run))}; ordered by bulk S, highest first."
    )
    if sel.empty:
        st.info("No test instance matches these filters.")
        return
    grid(run, sel.head(max_panels), view, n_cols)


def grid(run: data.Run, sel: pd.DataFrame, view: views.View, n_cols: int) -> None:
    """Small multiples as a grid of columns, so the panels wrap to the window's width."""
    correct = sel.set_index("id")["correct"] if "correct" in sel else None
    ids = [int(i) for i in sel["id"]]
    clipped = 0
    for start in range(0, len(ids), n_cols):
        cols = st.columns(n_cols)
        for col, test_id in zip(cols, ids[start : start + n_cols], strict=False):
            ok = None if correct is None else bool(correct.loc[test_id])
            with col:
                clipped += draw_panel(run, test_id, view, correct=ok) is not None
    if clipped:
        st.caption(compute.panels_clip_note(clipped, len(ids)))


def enlarged(run: data.Run, test_id: int, view: views.View) -> None:
    """One curve, large, with text tooltips and the facts about its flipped instances."""
    row = run.shapes().set_index("id").loc[test_id]
    inst = run.instances.iloc[test_id]
    names = run.label_names
    st.subheader(f"Curve of test instance {test_id}")
    left, right = st.columns([3, 1])
    with left:
        c = draw_curve(run, test_id, view)
        if c.clip is not None:
            st.caption(compute.clip_note(c.clip))
    with right:
        st.text(str(inst["text"]))
        st.caption(
            f"true label: {widgets.md_escape(names[int(inst['label'])])}"
            + ("" if row.get("correct", True) else " · misclassified")
        )
        st.metric(
            "shape (bulk S)",
            c.shape,
            widgets.fmt(c.lines["s_bulk"], "+.3f"),
            delta_color="off",
            delta_arrow="off",
            help="The class reads the curve without its top and bottom 5 % of ranks.",
        )
        st.metric(
            "S, whole curve (paper)",
            widgets.fmt(c.lines["s"], "+.3f"),
            help="(b_reg − b_end)/|b_end|: yellow slope minus green slope, scale-free.",
        )
        flips = c.points[c.points["flipped"]]
        st.metric(
            "end ratio of flipped",
            widgets.fmt(c.end_ratio, ".1f") + " %",
            help="0 % centre, 100 % ends, 50 % random",
        )
        st.caption(
            f"{len(flips)} flipped of {c.n} training instances; {len(c.points)} points drawn."
        )
    view_note(run, test_id, view, c.shape)
    with st.expander(f"The {len(flips)} flipped training instances on this curve"):
        table = flips[["rank", "train_id", "score", "text"]].copy()
        table["label used"] = [names[int(v)] for v in flips["observed_label"]]
        table["true label"] = [names[int(v)] for v in flips["label"]]
        st.dataframe(table, hide_index=True, width="stretch")


def view_note(run: data.Run, test_id: int, view: views.View, shape: str) -> None:
    """When the run stores another view in which this instance has another class: one sentence
    naming it (core reads the stored classes) and a link to the lesson's step on why, so a
    class that changes with the view is not read as an artefact of a setting."""
    stored = run.shapes_by_view()
    if stored is None:
        return
    others = core_lesson.other_view_classes(stored, test_id, view, shape)
    if not others:
        return
    sentence = core_lesson.other_view_sentence(shape, view, others, influence.n_checkpoints(run))
    st.caption(widgets.md_escape(sentence))
    # Imported here: the lesson page draws its curves with this module.
    from ui.screens import lesson

    step = lesson.STEPS.index(lesson.VIEW_STEP) + 1
    widgets.page_link(
        "lesson",
        label=f"Why? Lesson step {step}",  # short: a page link does not wrap on a phone
        query_params={lesson.QP_STEP: str(step)},
    )


def one_checkpoint(run: data.Run) -> bool:
    """Whether the run saved a single checkpoint (a 1-epoch run): then no recompute can give it
    per-checkpoint views, and the page must not suggest one."""
    k = influence.n_checkpoints(run)
    saved = run.manifest.get("checkpoints") or []
    return k == 1 or (k == 0 and len(saved) == 1)


def over_training(run: data.Run, test_id: int, view: views.View) -> None:
    """How this test instance's curve forms checkpoint by checkpoint, and where its flips move."""
    k = influence.n_checkpoints(run)
    st.subheader("Built up over training")
    stored = run.shapes_by_view()
    if one_checkpoint(run):
        st.info(
            "This run saved one checkpoint (it trained for one epoch), so there is nothing to "
            "build up: the curve above is that checkpoint's. A run with more epochs shows here "
            "how its curve forms."
        )
        return
    if k < 2 or stored is None or run.flip_ranks() is None:
        st.info(
            "This run stores no per-checkpoint views; recompute them with "
            f"`{run.command('analyze')}`."
        )
        return
    norm = view.normalisation
    left, right = st.columns([2, 3])
    with left:
        c = st.select_slider("Checkpoint c", list(range(1, k + 1)), value=k, key="train_ckpt")
        mode = st.radio("Scores", [SUMMED_UP_TO, ALONE], key="train_mode", horizontal=True)
        st.caption(
            "*Checkpoint c* moves only this section: it shows checkpoint c alone or the sum "
            "up to c, whatever range the sidebar's *Checkpoints summed* sets for the rest of "
            f"the page (the normalisation, {norm}, is the sidebar's)."
        )
    step = views.View(1, c, norm) if mode == SUMMED_UP_TO else views.View(c, c, norm)
    with right:
        clip = draw_panel(
            run,
            test_id,
            step,
            suffix=f" · {step.label(k)}",
            height=220,
            max_points=PANEL_POINTS * 2,
        )
        if clip is not None:
            st.caption(compute.panels_clip_note(1, 1))
    mine = stored[(stored["id"] == test_id) & (stored["normalisation"] == norm)]
    series = mine.assign(
        checkpoint=mine["last"],
        scores=np.where(mine["kind"] == "single", ALONE, SUMMED_UP_TO),
    )
    # Checkpoint 1 alone is also the sum up to checkpoint 1.
    first = series[series["view"] == f"{norm}:1-1"].assign(scores=SUMMED_UP_TO)
    series = pd.concat([series, first], ignore_index=True)
    order = run.analysis().get("views", {}).get("rank_order", [])
    flip_ids = run.analysis().get("views", {}).get("flipped_train_ids", [])
    ranks = run.flip_ranks()
    row = run.test_row(test_id)
    traces = []
    for cc in range(1, k + 1):
        key = views.View(1, cc, norm).key if mode == SUMMED_UP_TO else views.View(cc, cc, norm).key
        if key in order:
            r = np.asarray(ranks[order.index(key), row], dtype=np.float64)
            centre = (len(run.train) - 1) / 2
            traces.append(
                pd.DataFrame(
                    {
                        "checkpoint": cc,
                        "train_id": flip_ids[: len(r)],
                        "rank": r,
                        "from_centre": np.abs(r - centre) / centre * 100,
                    }
                )
            )
    a, b = st.columns(2)
    with a:
        st.altair_chart(charts.index_over_training(series, run.rule()), width="stretch")
    with b:
        if traces:
            st.altair_chart(
                charts.flip_ranks_over_training(pd.concat(traces), len(run.train), mode),
                width="stretch",
            )
    # Neutral order words: the two columns stack on a narrow screen, where left/right is wrong.
    st.caption(
        "First: the bulk S of this curve for each checkpoint alone and for the sum up to it, with "
        "the class thresholds. Then: the rank of every flipped training instance at each "
        f"checkpoint ({mode}); the paper's S puts them near both ends, Z near the centre."
    )
