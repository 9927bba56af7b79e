"""Cleaning lab: detectors compared against the known flips, a review queue, intervention results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import metrics as core_metrics
from core.cleaning import interventions as core_cleaning
from core.storage import store
from ui import charts, data, widgets

METRIC_NAMES = {
    "recall_at_1pct": "recall @1%",
    "recall_at_2_5pct": "recall @2.5%",
    "recall_at_5pct": "recall @5%",
    "recall_at_10pct": "recall @10%",
    "recall_at_20pct": "recall @20%",
    "precision_at_k": "precision@k",
    "average_precision": "AP",
    "auroc": "AUROC",
}


def render() -> None:
    """Draw the Cleaning lab page."""
    widgets.run_page(
        "cleaning",
        (
            "Each detector ranks the training instances by suspicion. Because this lab flipped the labels "
            "itself, every ranking can be scored against the truth: how many flips would you find after "
            "inspecting the top few percent?"
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Comparison, review queue, interventions, downloads."""
    det = run.detectors()
    detection = run.detection()
    names = [c for c in det.columns if c != "id"]
    flipped = run.train.set_index("id").loc[det["id"].to_numpy(), "flipped"].to_numpy(bool)
    k = int(flipped.sum())
    st.markdown(f"{k} flipped of {len(det)} training instances ({k / max(len(det), 1):.1%}).")

    st.header("Detectors compared")
    max_q = st.select_slider(
        "inspect up to",
        [0.05, 0.1, 0.2, 0.3, 0.5, 1.0],
        value=0.3,
        key="clean_maxq",
        format_func=lambda q: f"{q:.0%}",
    )
    curves = pd.concat(
        [recall_frame(det[n].to_numpy(), flipped, n) for n in names], ignore_index=True
    )
    st.altair_chart(charts.recall_chart(curves, max_q), width="stretch")
    # Full width below the chart: eight metric columns do not fit beside it.
    st.dataframe(metrics_table(detection), hide_index=True, width="stretch")
    notes = detection.get("notes") or {}
    if notes:
        with st.expander("How each detector is computed"):
            for n, note in notes.items():
                st.markdown(f"**{widgets.md_escape(n)}** — {widgets.md_escape(note)}")

    st.header("Review queue")
    c1, c2, c3 = st.columns([2, 1, 1])
    detector = c1.selectbox("detector", names, key="clean_detector")
    top = c2.number_input(
        "suspects", 5, max(5, len(det)), min(max(2 * k, 10), len(det)), step=5, key="clean_top"
    )
    reveal = c3.toggle(
        "reveal flipped",
        key="clean_reveal",
        help="Hidden by default, so you can judge the texts first.",
    )
    queue = review_queue(det, detector, run.train, int(top), run.label_names)
    found = int(queue["flipped"].sum())
    # Revealed, the answer sits right after the rank, where the eye starts (not off-screen).
    shown = queue if reveal else queue.drop(columns=["flipped"])
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "flipped": st.column_config.CheckboxColumn(
                "flipped", help="Known answer: this label was flipped by the study.", width="small"
            ),
            "text": st.column_config.TextColumn("text", width="large"),
        },
    )
    if reveal:
        st.success(
            f"{found} of the top {len(queue)} are flipped ({found / max(k, 1):.0%} of all flips)."
        )
    st.download_button(
        "Download this review queue (CSV)",
        queue.drop(columns=["flipped"]).to_csv(index=False).encode("utf-8"),
        file_name=f"review_queue_{run.name}_{detector}.csv",
        mime="text/csv",
    )

    st.header("Interventions")
    interventions(run)


def recall_frame(scores: np.ndarray, flipped: np.ndarray, detector: str) -> pd.DataFrame:
    """core.analysis.metrics.recall_curve as a long frame (fraction, recall, detector) for the chart."""
    fractions, recall = core_metrics.recall_curve(scores, flipped, 201)
    return pd.DataFrame({"fraction": fractions, "recall": recall, "detector": detector})


def review_queue(
    detectors: pd.DataFrame, detector: str, train: pd.DataFrame, top: int, label_names: list[str]
) -> pd.DataFrame:
    """core.cleaning.interventions.review_queue (the CLI export's queue) as the page shows it: rank, the known
    answer, id, text, label names instead of numbers, score and reason."""
    scores = detectors.set_index("id")[detector].reindex(train["id"].to_numpy())
    queue = core_cleaning.review_queue(
        train.reset_index(drop=True), scores.to_numpy(np.float64), detector, top
    )

    def name(v: int) -> str:
        return label_names[v] if 0 <= v < len(label_names) else str(v)

    return pd.DataFrame(
        {
            "rank": queue["rank"],
            "flipped": queue["flipped"],
            "id": queue["id"],
            "text": queue["text"],
            "observed_label": [name(v) for v in queue["label"]],
            "suggested_label": [name(v) for v in queue["suggested_label"]],
            "score": queue["score"],
            "reason": queue["reason"],
        }
    )


def metrics_table(detection: dict) -> pd.DataFrame:
    """One row per detector, best average precision first, then the random baseline."""
    rows = [
        {"detector": name, **{METRIC_NAMES.get(k, k): v for k, v in m.items()}}
        for name, m in (detection.get("detectors") or {}).items()
    ]
    rows.sort(key=lambda r: -(r.get("AP") or 0.0))
    if detection.get("random"):
        base = {METRIC_NAMES.get(k, k): v for k, v in detection["random"].items()}
        rows.append({"detector": "random (expected)", **base})
    return pd.DataFrame(rows).round(3)


def interventions(run: data.Run) -> None:
    """Retraining results from ``core clean`` and the exported CSVs."""
    rows = run.cleaning_results()
    if not rows:
        st.info(
            "No intervention has been run on this run yet. Retrain without (or with relabeled) "
            "suspects with:"
        )
        widgets.command_needing_checkpoints(
            run, "python -m core clean {run} --detector self_influence --action exclude --k 40"
        )
        # Retraining takes minutes per arm, so point a class to a run that ships its results.
        shown = [
            r["name"]
            for r in data.list_runs(str(data.cache_dir()))
            if r["name"] != run.name
            and (
                data.cache_dir() / r["name"] / store.CLEANING_DIR / store.CLEANING_RESULTS
            ).exists()
        ]
        if shown:
            st.caption(
                f"Run {widgets.md_escape(shown[0])} ships its interventions' results, "
                "so they show without retraining:"
            )
            widgets.page_link(
                "cleaning", label=f"Cleaning lab on {shown[0]}", query_params={"run": shown[0]}
            )
    else:
        results = pd.DataFrame(rows)
        st.altair_chart(
            charts.cleaning_chart(core_cleaning.intervention_arms(rows)), width="stretch"
        )
        st.caption(
            "Every arm of a seed is trained with that seed: no change (grey), a random choice of "
            "the same size (red), the oracle that acts on exactly the flips (green), and the "
            "detector's top k (blue). Points are means over seeds, lines their range."
        )
        effects = core_cleaning.intervention_effects(rows)
        for reading in effects["reading"]:
            st.markdown(f"- {widgets.md_escape(reading)}")
        st.caption(
            "The reading rule, written before the results: an intervention helps (or hurts) only "
            f"if it beats (or trails) no change on every one of at least "
            f"{core_cleaning.MIN_SEEDS_TO_READ} seeds; the sign test's p says how often chance "
            "alone gives that split."
        )
        with st.expander("Effects per detector and action"):
            st.dataframe(effects.drop(columns="reading"), hide_index=True, width="stretch")
        st.dataframe(results, hide_index=True, width="stretch")
        st.download_button(
            "Download intervention results (CSV)",
            results.to_csv(index=False).encode(),
            file_name=f"interventions_{run.name}.csv",
            mime="text/csv",
        )
    files = run.cleaning_files()
    if files:
        st.subheader("Exports made by the CLI")
        for i, path in enumerate(files):
            st.download_button(
                widgets.md_escape(path.name),
                path.read_bytes(),
                file_name=path.name,
                mime="text/csv",
                key=f"clean_file_{i}",
            )
