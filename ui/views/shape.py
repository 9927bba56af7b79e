"""Shape vs position (paper Fig. 3): S against end ratio; clicking a point opens its curve."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import charts, compute, data, widgets
from ui.views import curves

CURVES_PAGE = "pages/1_Score_curves.py"


def render() -> None:
    """Draw the Shape vs position page."""
    widgets.run_page(
        "Shape vs position",
        ":material/scatter_plot:",
        (
            "Paper Fig. 3: the more S-shaped a test instance's curve, the nearer its flipped training "
            "instances sit to the ends of the curve. One point per test instance; click one to see its curve."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Scatter, correlations, and the clicked instance's curve."""
    shapes = run.shapes()
    which = st.sidebar.radio(
        "Test instances", ["all", "misclassified"], key="shape_which", horizontal=True
    )
    shown = (
        shapes
        if which == "all" or "correct" not in shapes
        else shapes[~shapes["correct"].astype(bool)]
    )
    correlations(run, shapes)
    test_id = widgets.pick_test(run, shapes)
    chart = charts.shape_scatter(shown, selected=test_id, thresholds=run.thresholds())
    key = f"shape_scatter_{run.name}"

    def on_pick() -> None:
        # A callback, not the return value: it fires only when the selection changes, so a
        # stale selection never overrides a later choice made in the picker.
        clicked = widgets.selected_point(st.session_state.get(key))
        if clicked is not None:
            widgets.select_test(run, clicked)

    st.altair_chart(chart, on_select=on_pick, selection_mode="pick", key=key, width="stretch")
    st.caption(
        "Dashed vertical lines: the shape thresholds; dotted horizontal line: 50 %, random placement."
    )
    st.subheader(f"Curve of test instance {test_id}")
    st.page_link(
        CURVES_PAGE,
        label="Open in Score curves",
        icon=":material/show_chart:",
        query_params={widgets.QP_RUN: run.name, widgets.QP_TEST: str(test_id)},
    )
    c = curves.load_curve(run, test_id, curves.SUMMED, curves.ENLARGED_POINTS)
    title = compute.panel_title(test_id, c.shape, c.lines["s"])
    st.altair_chart(
        charts.curve_chart(
            c.points, compute.line_rows(c.lines, c.n), title=title, label_names=run.label_names
        ),
        width="stretch",
    )


def correlations(run: data.Run, shapes: pd.DataFrame) -> None:
    """Pearson / Spearman of S with end ratio, all and misclassified (p-values from analysis.json)."""
    stored = stored_correlations(run, "s_vs_end_ratio")
    rows = []
    groups = {"all": shapes}
    if "correct" in shapes:
        groups["misclassified"] = shapes[~shapes["correct"].astype(bool)]
        groups["correct"] = shapes[shapes["correct"].astype(bool)]
    for name, g in groups.items():
        r = compute.correlation(g["s"].to_numpy(), g["end_ratio"].to_numpy())
        p = stored.get(name) or {}
        rows.append(
            {
                "test instances": name,
                "n": r["n"],
                "Spearman ρ": r["spearman"],
                "p (Spearman)": p.get("spearman_p"),
                "Pearson r": r["pearson"],
                "p (Pearson)": p.get("pearson_p"),
            }
        )
    cols = st.columns([1, 3])
    main = rows[0]
    cols[0].metric(
        "Spearman ρ (S, end ratio)",
        widgets.fmt(main["Spearman ρ"], "+.2f"),
        f"n = {main['n']}",
        delta_color="off",
        delta_arrow="off",
    )
    table = pd.DataFrame(rows)
    cols[1].dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={c: st.column_config.NumberColumn(format="%.3g") for c in table.columns[2:]},
    )


def stored_correlations(run: data.Run, key: str) -> dict[str, dict]:
    """analysis.json's correlations[key] per group ('all', 'correct', 'misclassified'), or {}."""
    corr = run.analysis().get("correlations") if isinstance(run.analysis(), dict) else None
    value = (corr or {}).get(key) or {}
    return value if isinstance(value, dict) else {}
