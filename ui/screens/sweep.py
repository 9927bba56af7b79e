"""Noise sweep (paper Fig. 4–5): accuracy and training loss against the number of flipped labels."""

from __future__ import annotations

import shlex
import sys
import time

import pandas as pd
import streamlit as st

from core.inputs.config import PRESETS
from core.inputs.datasets import BUILTINS
from core.orchestration import jobs
from core.storage import store
from core.storage.errors import AtlasError
from ui import charts, compute, data, study, widgets
from ui.screens import study as study_screen

SWEEP_COMMAND = "python -m core sweep --preset quick"


def render() -> None:
    """Draw the Noise sweep page."""
    widgets.setup_page("sweep")
    st.caption(
        "Paper Fig. 4–5: a few flipped labels barely hurt; beyond a threshold, accuracy falls and the "
        "training loss climbs. One model per (flip rate, seed); thin lines are seeds, the bold line "
        "their mean, the band their range."
    )
    row = widgets.pick_run("sweep")
    if row is None:
        empty_state()
    else:
        with widgets.guard():
            body(data.Sweep(row["path"]))
    start_section(data.cache_dir())


def start_section(cache) -> None:
    """Start a sweep in the background (as Run a study does for a run) and follow it."""
    if jobs.readonly():
        return
    jobs.dispatch(cache)
    st.divider()
    study_screen.jobs_panel(cache, kind="sweep", title="Sweeps started here", key="sweep_job")
    with st.expander("Start a new sweep", expanded=False):
        missing = study.compute_stack()
        if missing:
            st.warning(missing, icon=":material/memory:")
        c1, c2, c3 = st.columns(3)
        preset = c1.selectbox(
            "Preset",
            sorted(PRESETS),
            key="sweep_preset",
            index=sorted(PRESETS).index("quick") if "quick" in PRESETS else 0,
        )
        dataset = c2.selectbox(
            "Dataset",
            list(BUILTINS),
            format_func=lambda k: f"{k} — {BUILTINS[k].description}",
            key="sweep_dataset",
        )
        seeds = int(c3.number_input("Seeds per flip rate", 1, 20, 3, key="sweep_seeds"))
        rates = st.text_input(
            "Flip rates (comma-separated, each in [0, 1))",
            study.DEFAULT_FLIP_RATES,
            key="sweep_rates",
        )
        epochs = st.number_input("Epochs (0 = preset)", 0, 100, 0, key="sweep_epochs")
        name = st.text_input(
            "Sweep name", f"sweep-{preset}-{dataset}-{seeds}seeds", key="sweep_name"
        ).strip()
        req = study.SweepRequest(
            name=name,
            preset=preset,
            flip_rates=rates.replace(" ", ""),
            seeds=seeds,
            dataset=dataset,
            extra={"epochs": int(epochs) or None},
        )
        ready = True
        try:
            cmd = study.build_sweep_command(req, cache)
            shown = ["python" if c == sys.executable else c for c in cmd]
            st.code(shlex.join(shown), language="bash", wrap_lines=True)
        except AtlasError as exc:
            st.error(widgets.md_escape(exc))
            ready = False
        study_screen.slots_note(cache)
        st.caption(
            "One model per flip rate and seed (no TracIn): the quick preset's 7 rates × 3 seeds take "
            "a few minutes on a laptop CPU. A cancelled sweep resumes where it stopped."
        )
        if st.button(
            "Start the sweep",
            type="primary",
            disabled=not ready or bool(missing),
            key="sweep_start",
        ):
            try:
                j = study.start(cache, req)
            except AtlasError as exc:
                st.error(widgets.md_escape(exc))
            else:
                st.query_params[study_screen.QP_JOB] = j.name
                st.session_state.pop("sweep_job", None)  # the picker opens on the new sweep
                time.sleep(0.3)
                st.rerun()


def empty_state() -> None:
    """What to do when no sweep exists yet."""
    st.info(
        f"No noise sweep in {widgets.md_escape(data.display_path(data.cache_dir()))} yet. A sweep trains one model per "
        "flip rate and seed (no TracIn), so it takes a while; make one with:"
    )
    st.code(SWEEP_COMMAND, language="bash")
    st.caption(
        "Options: `--flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 --seeds 3`, plus any `core run` option "
        "(dataset, model, epochs...). A killed sweep resumes where it stopped."
    )


def body(sweep: data.Sweep) -> None:
    """The two figures, the threshold and the table."""
    m = sweep.manifest
    if m.get("status") != store.STATUS_COMPLETE:
        st.warning(
            f"Sweep status: {widgets.md_escape(m.get('status', '?'))} — showing the cells "
            "finished so far."
        )
    table = sweep.table()
    x_axis = st.sidebar.radio(
        "x axis", ["flip rate", "number of flipped labels"], key="sweep_x", horizontal=True
    )
    x = "flip_rate" if x_axis == "flip rate" else "flip_count"
    if x not in table:
        x = "flip_rate"
    threshold = m.get("threshold") or {}
    t_rate = threshold.get("rate")
    t_x = None
    if t_rate is not None:
        t_x = (
            float(t_rate)
            if x == "flip_rate"
            else float(table.loc[table.flip_rate == t_rate, "flip_count"].mean())
        )
    cols = st.columns(4)
    cols[0].metric("cells", f"{len(table)}")
    cols[1].metric("flip rates", f"{table['flip_rate'].nunique()}")
    cols[2].metric("seeds", f"{table['seed'].nunique()}")
    cols[3].metric("threshold", "none found" if t_rate is None else f"{float(t_rate):.1%}")
    if threshold.get("rule"):
        note = f" ({widgets.md_escape(threshold['note'])})" if threshold.get("note") else ""
        st.caption(f"Threshold rule: {widgets.md_escape(threshold['rule'])}{note}.")

    left, right = st.columns(2)
    with left:
        st.altair_chart(
            charts.sweep_chart(
                table, "final_test_accuracy", title="final test accuracy", x=x, threshold=t_x
            ),
            width="stretch",
        )
    with right:
        loss = "train_loss_observed" if "train_loss_observed" in table else None
        if loss:
            which = st.radio(
                "training loss on",
                ["observed labels", "true labels"],
                key="sweep_loss",
                horizontal=True,
            )
            loss = (
                "train_loss_observed"
                if which == "observed labels" or "train_loss_true" not in table
                else "train_loss_true"
            )
            st.altair_chart(
                charts.sweep_chart(
                    table, loss, title=f"final training loss ({which})", x=x, threshold=t_x
                ),
                width="stretch",
            )
        else:
            st.info("This sweep recorded no training loss.")

    epochs = sweep.epochs()
    if epochs is not None and len(epochs):
        with st.expander("Per-epoch curves"):
            value = st.selectbox(
                "value",
                [c for c in ("test_accuracy", "val_accuracy", "train_loss") if c in epochs],
                key="sweep_epoch_value",
            )
            st.altair_chart(
                charts.sweep_epochs_chart(epochs, value, value.replace("_", " ")), width="stretch"
            )
    st.subheader("Summary per flip rate")
    summary = (
        compute.sweep_summary(table, "final_test_accuracy")
        if "flip_count" in table
        else table.groupby("flip_rate").mean(numeric_only=True).reset_index()
    )
    st.dataframe(summary.round(4), hide_index=True, width="stretch")
    st.download_button(
        "Download the sweep table (CSV)",
        table.to_csv(index=False).encode(),
        file_name=f"{sweep.name}.csv",
        mime="text/csv",
    )
    with st.expander("How this sweep was made"):
        st.code(m.get("command", "(not recorded)"), language="bash")
        st.json(pd.Series(m.get("config", {})).to_dict(), expanded=False)
