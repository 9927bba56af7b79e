"""Shape vs position (paper Fig. 3) and vs distance (Fig. 2): an S index against the flips' end
ratio or the mean [CLS] distance, under any view, with correlations only where they mean something."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.analysis import shapes as core_shapes
from core.analysis import stats
from ui import charts, data, influence, pages, widgets
from ui.screens import curves

Y_CHOICES = {
    "end_ratio": "flips' end ratio (Fig. 3)",
    "mean_distance": "mean distance to training data (Fig. 2)",
}
X_CHOICES = {"s_bulk": "bulk S (class rule)", "s": "S, whole curve (paper)"}
PAPER = {
    "end_ratio": "the paper: the more S-shaped the curve, the nearer the flipped instances sit to "
    "the ends (a positive correlation)",
    "mean_distance": "the paper's hypothesis: the farther a test instance from the training data, the "
    "more S-shaped its curve (a positive correlation); Z curves belong to close instances",
}


def render() -> None:
    """Draw the Shape vs position page."""
    widgets.run_page(
        "shape",
        (
            "Paper Fig. 3 (and Fig. 2): one point per test instance, its curve's S-shapedness against "
            "where its flipped training instances sit, or against its distance to the training data. "
            "Click a point to see its curve."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Scatter, correlations, class counts, sensitivity, and the clicked instance's curve."""
    view = influence.pick_view(run)
    table = influence.view_table(run, view)
    sb = st.sidebar
    which = sb.radio("Test instances", ["all", "misclassified"], key="shape_which", horizontal=True)
    y = sb.radio("Against", list(Y_CHOICES), format_func=Y_CHOICES.get, key="shape_y")
    x = sb.radio("Index", list(X_CHOICES), format_func=X_CHOICES.get, key="shape_x")
    if y == "mean_distance" and "mean_distance" not in table:
        st.info("This run has no distances; run analyze to compute them.")
        y = "end_ratio"
    shown = (
        table if which == "all" or "correct" not in table else table[~table["correct"].astype(bool)]
    )
    correlation_table(table, x, y)
    class_counts(run, table, view)
    test_id = widgets.pick_test(run, table.sort_values("s_bulk", ascending=False, kind="stable"))
    chart = charts.shape_scatter(shown, selected=test_id, rule=run.rule(), x=x, y=y)
    key = f"shape_scatter_{run.name}"

    def on_pick() -> None:
        # A callback, not the return value: it fires only when the selection changes, so a
        # stale selection never overrides a later choice made in the picker.
        clicked = widgets.selected_point(st.session_state.get(key))
        if clicked is not None:
            widgets.select_test(run, clicked)

    st.altair_chart(chart, on_select=on_pick, selection_mode="pick", key=key, width="stretch")
    st.caption(
        f"View: {view.label(influence.n_checkpoints(run))}. The selected instance is drawn large and "
        "outlined. Dashed vertical lines: the class thresholds; dotted line: 50 %, random placement."
    )
    sensitivity(run, view)
    st.subheader(f"Curve of test instance {test_id}")
    widgets.page_link(
        "curves",
        label=f"Open in {pages.BY_KEY['curves'].title}",
        query_params={
            widgets.QP_RUN: run.name,
            widgets.QP_TEST: str(test_id),
            **({} if influence.is_default(run, view) else {widgets.QP_VIEW: view.key}),
        },
    )
    c = curves.draw_curve(run, test_id, view)
    curves.view_note(run, test_id, view, c.shape)


def correlation_table(table: pd.DataFrame, x: str, y: str) -> None:
    """Spearman / Pearson of the index with the chosen quantity, per group, via core.analysis.stats."""
    groups = {"all": table}
    if "correct" in table:
        groups["misclassified"] = table[~table["correct"].astype(bool)]
        groups["correct"] = table[table["correct"].astype(bool)]
    rows = []
    for name, g in groups.items():
        r = stats.correlation(g[x].to_numpy(), g[y].to_numpy(), names=(x, y))
        rows.append(
            {
                "test instances": name,
                "n": r["n"],
                "Spearman ρ": r["spearman"],
                "p (Spearman)": r["spearman_p"],
                "Pearson r": r["pearson"],
                "p (Pearson)": r["pearson_p"],
                "why none": r["reason"] or "",
            }
        )
    frame = pd.DataFrame(rows)
    left, right = st.columns([1, 3])
    main = rows[1] if len(rows) > 1 and rows[1]["Spearman ρ"] is not None else rows[0]
    left.metric(
        f"Spearman ρ ({main['test instances']})",
        widgets.fmt(main["Spearman ρ"], "+.2f"),
        f"n = {main['n']}",
        delta_color="off",
        delta_arrow="off",
    )
    columns = ("Spearman ρ", "p (Spearman)", "Pearson r", "p (Pearson)")
    widgets.number_table(frame, "%.3g", columns, where=right)
    st.caption(verdict(main, y))


def verdict(row: dict, y: str) -> str:
    """One sentence comparing the measured correlation with the paper's claim."""
    rho, p = row["Spearman ρ"], row["p (Spearman)"]
    if rho is None:
        return (
            f"No correlation is shown for the {row['test instances']} instances: {row['why none']}."
        )
    agrees = rho > 0 and p is not None and p < 0.05
    where = f"Here ({row['test instances']}, n = {row['n']}): ρ = {rho:+.2f}, p = {p:.2g}"
    if agrees:
        return f"{where}: in the direction of {PAPER[y]}."
    return f"{where}: this does not reproduce {PAPER[y]}."


def class_counts(run: data.Run, table: pd.DataFrame, view) -> None:
    """Counts per class under the view, all and misclassified."""
    cols = st.columns(len(core_shapes.SHAPE_ORDER))
    mis = ~table["correct"].astype(bool) if "correct" in table else None
    for col, cls in zip(cols, core_shapes.SHAPE_ORDER, strict=True):
        hit = table["shape"] == cls
        extra = "" if mis is None else f"{int((hit & mis).sum())} misclassified"
        col.metric(f"{cls} curves", int(hit.sum()), extra, delta_color="off", delta_arrow="off")


def sensitivity(run: data.Run, view) -> None:
    """The stored sensitivity table: class counts of the default view as each threshold moves."""
    rows = run.analysis().get("sensitivity") or []
    with st.expander("How the class counts move with the thresholds (default view)"):
        if not rows:
            st.info(f"Not stored for this run; `{run.command('analyze')}` computes it.")
            return
        frame = pd.DataFrame(rows)
        rule = run.rule()
        st.caption(
            f"Rule in force: S if bulk S ≥ {rule.s_min:g}, Z if ≤ {rule.z_max:g}, "
            f"trimming {rule.trim:.0%} of ranks at each end. The thresholds were calibrated on "
            "reference curves (Learn the shapes), not on this run."
        )
        for name, part in frame.groupby("threshold", sort=False):
            st.altair_chart(charts.sensitivity_chart(part, name), width="stretch")
