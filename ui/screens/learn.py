"""Learn the shapes: the paper's three curve patterns taught from the run's own test instances.

Every example is a real test instance of the selected run, shown under the view in which
its class is most common (the analyze stage picks them: ``analysis.json["examples"]``).
The calibration references are synthetic and labelled so; they are never shown as data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import shape_references, views
from core.analysis import shapes as core_shapes
from ui import charts, compute, data, influence, widgets
from ui.screens import curves

EXPLAIN = {
    core_shapes.SHAPE_S: (
        "Most training instances have small absolute scores and a few have large ones at both "
        "ends. The paper finds the flipped instances **near both ends**: they are the few that "
        "pushed this prediction hardest, one way or the other. Its explanation: the test instance "
        "is far from most training data, so only a few training instances matter to it."
    ),
    core_shapes.SHAPE_Z: (
        "Many training instances have large absolute scores: two plateaus with a steep middle. "
        "The paper finds the flipped instances **mainly near the centre**. Its explanation: the "
        "test instance is close to much of the training data, so whole groups of instances "
        "(split by the sign of their error) push it together, and the flips drown in the middle."
    ),
    core_shapes.SHAPE_BACKSLASH: (
        "In between: scores spread fairly evenly along the ranks, a nearly straight falling line. "
        "The paper finds the flipped instances **between the centre and the ends**."
    ),
}
GUESS_KEY = "learn_guess"


def render() -> None:
    """Draw the Learn-the-shapes page."""
    widgets.run_page(
        "learn",
        (
            "The paper sorts every training instance's TracIn score for one test instance and finds "
            "three curve shapes: S, backslash and Z. Here they are, from this run's own data."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """The rule, real examples per class, the guessing exercise and the reference curves."""
    rule = run.rule()
    st.markdown(
        "**How a curve is classed.** Sort the scores from highest to lowest. The paper's index "
        "compares two straight lines through that curve: the least-squares line (yellow) and the "
        "line joining its two ends (green). Their slope difference, divided by the green slope, "
        "is about 1 for an ideal S, 0 for a straight line and −0.5 for an ideal Z. A handful of "
        "extreme points can move the green line a long way, so the class reads the curve "
        f"without its top and bottom {rule.trim:.0%} of ranks (the *bulk S*): S if bulk S ≥ "
        f"{rule.s_min:g}, Z if ≤ {rule.z_max:g}, backslash between."
    )
    examples = run.analysis().get("examples") or {}
    counts = (run.analysis().get("views") or {}).get("counts") or {}
    k = influence.n_checkpoints(run)
    for cls in core_shapes.SHAPE_ORDER:
        st.subheader(f"{cls} curves")
        st.markdown(EXPLAIN[cls])
        ex = examples.get(cls) or {}
        ids = [int(i) for i in ex.get("ids") or []]
        if not ids:
            st.info(
                f"No test instance of this run shows a {cls} curve in any stored view "
                "(all checkpoints, each checkpoint alone, each cumulative sum, every normalisation), "
                "although the paper found them on its data. The reference curves below show the shape."
            )
            continue
        view = _view_of(run, ex.get("view"))
        where = view.label(k) if view is not None else "the default view"
        st.caption(
            f"Shown under {where}: {ex.get('count', len(ids))} of {len(run.test_ids)} test "
            f"instances are {cls} there" + _default_note(run, cls, counts, ex.get("view"))
        )
        _example_grid(run, ids, view or influence.default_view(run))
    guess(run)
    references()


def _view_of(run: data.Run, key: str | None) -> views.View | None:
    """The view of an example key ('default' or a stored view key)."""
    if not key or key == "default":
        return influence.default_view(run)
    try:
        return views.View.parse(key)
    except Exception:
        return None


def _default_note(run: data.Run, cls: str, counts: dict, key: str | None) -> str:
    """'; under the default view: n' when the example view is not the default."""
    if key in (None, "default"):
        return "."
    n = int((run.shapes()["shape"] == cls).sum())
    return f"; under the default view (all checkpoints, raw scores): {n}."


def _example_grid(run: data.Run, ids: list[int], view: views.View) -> None:
    """Curves of real examples with their distance to the training data."""
    shapes = run.shapes().set_index("id")
    median = float(shapes["mean_distance"].median()) if "mean_distance" in shapes else np.nan
    cols = st.columns(len(ids))
    clipped = 0
    for col, test_id in zip(cols, ids, strict=True):
        c = curves.load_curve(run, test_id, view, curves.PANEL_POINTS)
        with col:
            clipped += curves.draw_panel(run, test_id, view) is not None
            dist = (
                float(shapes.loc[test_id, "mean_distance"]) if "mean_distance" in shapes else None
            )
            st.caption(
                f"end ratio {widgets.fmt(c.end_ratio, '.0f')} % · mean distance "
                f"{widgets.fmt(dist, '.2f')} (run median {widgets.fmt(median, '.2f')})"
            )
    if clipped:
        st.caption(compute.panels_clip_note(clipped, len(ids)))


def guess(run: data.Run) -> None:
    """Guess the shape of a real curve, drawn from any class and any stored view, then reveal.

    Nothing is preselected; Reveal locks the guess (changing the radio afterwards changes
    nothing) and counts it in the session's score; once revealed, a class that differs in
    another stored view is said (curves.view_note).
    """
    st.subheader("Guess the shape")
    pool = _exercise_pool(run)
    state = st.session_state.setdefault(GUESS_KEY, {"run": None, "right": 0, "answered": 0})
    if state.get("run") != run.name or (state.get("view"), state.get("id")) not in _pool_keys(pool):
        _new_draw(state, run, pool, first=True)
    view = views.View.parse(state["view"])
    k = influence.n_checkpoints(run)
    c = curves.load_curve(run, state["id"], view, curves.PANEL_POINTS * 2)
    locked = state["locked"]
    left, right = st.columns([3, 1])
    with left:
        clip = curves.draw_panel(
            run,
            state["id"],
            view,
            height=260,
            max_points=curves.PANEL_POINTS * 2,
            reveal=locked is not None,
        )
        st.caption(f"This curve is shown under {view.label(k)}.")
        if clip is not None:
            st.caption(compute.panels_clip_note(1, 1))
        if locked is not None:  # before Reveal it would give the answer away
            curves.view_note(run, state["id"], view, c.shape)
    with right:
        choice = st.radio(
            "Your guess",
            list(core_shapes.SHAPE_ORDER),
            index=None,
            key=CHOICE_KEY,
            disabled=locked is not None,
        )
        st.button(
            "Reveal",
            key="learn_reveal",
            disabled=choice is None or locked is not None,
            on_click=_reveal,
            args=(state, c.shape),
            help="Pick a guess first; once revealed, the guess is locked.",
        )
        if locked is not None:
            right_answer = locked == state["answer"]
            (st.success if right_answer else st.warning)(
                f"{'Right' if right_answer else 'Not quite'}: you said {locked}; "
                f"this curve is {state['answer']}."
            )
            st.markdown(
                f"bulk S **{c.lines['s_bulk']:+.3f}** · S (whole curve) {c.lines['s']:+.3f} · "
                f"flipped instances' end ratio {widgets.fmt(c.end_ratio, '.0f')} % (red dots, now shown)"
            )
        st.button("Another curve", key="learn_next", on_click=_new_draw, args=(state, run, pool))
        st.caption(f"Score this session: {state['right']} of {state['answered']}.")


CHOICE_KEY = "learn_choice"
# The last first curve of each run in this server process, so a new session never opens on
# the curve the previous one opened on (a deterministic pick would open on the same one every time).
_LAST_FIRST: dict[str, tuple[str, int]] = {}


def _exercise_pool(run: data.Run) -> pd.DataFrame:
    """(view, id, shape) of every curve the exercise may show (compute.exercise_pool)."""
    return compute.exercise_pool(
        run.shapes(), influence.default_view(run).key, run.shapes_by_view()
    )


def _pool_keys(pool: pd.DataFrame) -> set[tuple[str, int]]:
    return set(zip(pool["view"], pool["id"].astype(int), strict=True))


def _new_draw(state: dict, run: data.Run, pool: pd.DataFrame, first: bool = False) -> None:
    """Draw the next curve (never the one shown), clear the guess and unlock."""
    shown = (state.get("view"), state.get("id"))
    avoid = _LAST_FIRST.get(run.name) if first else shown
    key, test_id = compute.draw_exercise(pool, np.random.default_rng(), avoid)
    if first:
        _LAST_FIRST[run.name] = (key, test_id)
    state.update(run=run.name, view=key, id=test_id, locked=None, answer=None)
    st.session_state[CHOICE_KEY] = None


def _reveal(state: dict, answer: str) -> None:
    """Lock the current guess and score it once (a button callback, before the rerun)."""
    choice = st.session_state.get(CHOICE_KEY)
    if choice is None or state["locked"] is not None:
        return
    state.update(locked=choice, answer=answer)
    state["answered"] += 1
    state["right"] += int(choice == answer)


@st.cache_data(show_spinner=False)
def _reference_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sorted reference curves (seed 0) and the calibration table, computed by core."""
    frames = []
    for name, (y, shape) in shape_references.reference_curves(0).items():
        sorted_y = core_shapes.sorted_curves(y)
        keep = core_shapes.downsample_curve(sorted_y, np.zeros(len(y), bool), 200)
        scaled = (sorted_y[keep] - sorted_y.mean()) / (sorted_y.std() or 1.0)
        frames.append(
            pd.DataFrame({"reference": f"{name} ({shape})", "rank": keep, "score": scaled})
        )
    return pd.concat(frames, ignore_index=True), pd.DataFrame(shape_references.reference_table())


def references() -> None:
    """The synthetic reference curves the thresholds were calibrated on, labelled as such."""
    st.subheader("Reference curves (synthetic, not data)")
    st.markdown(
        "The paper names its shapes by eye. The thresholds here were set once on these "
        "synthetic score distributions, halfway between the classes (docs/shapes.md): "
        "uniform and Gaussian scores are backslash, Laplace and Student-t(3) are S, two plateaus "
        "(50/50 to 70/30) are Z, each with and without 2.5 % extreme points. They were never "
        "tuned on a run's data. Each panel shows one reference's scores standardised (mean 0, "
        "standard deviation 1) against their rank."
    )
    curves_df, table = _reference_data()
    names = list(dict.fromkeys(curves_df["reference"]))
    # Rows of three columns, one chart each: Streamlit stacks columns on a phone.
    for start in range(0, len(names), 3):
        for col, name in zip(st.columns(3), names[start : start + 3], strict=False):
            part = curves_df[curves_df["reference"] == name]
            col.altair_chart(charts.reference_curve_chart(part, name), width="stretch")
    widgets.number_table(table, "%.3f", ("s_bulk_mean", "s_bulk_min", "s_bulk_max", "s_mean"))
