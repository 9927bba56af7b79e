"""Does the paper hold? Each claim tested across conditions and seeds (core.analysis.claims), with evidence."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.analysis import claims as core_claims
from core.analysis.replication import REPLICATION_KIND, claims_of
from core.storage import store
from core.storage.errors import AtlasError
from ui import charts, data, widgets

QP_CELL = "cell"
MAKE_COMMAND = "python -m core replication GROUP … --sweep SWEEP --name replication"
CURVE_PANELS = 12
EVIDENCE_COLUMNS = 3  # panels per row; Streamlit stacks columns on a phone


def render() -> None:
    """Draw the page."""
    widgets.setup_page("replication")
    st.caption(
        "The paper's claims as numbered statements (rules written before the grid was run: "
        "docs/replication.md). Each cell is one claim in one condition, pooled over seeds: "
        "green holds, red contradicted, orange inconclusive (the 95 % interval crosses the "
        "null), grey not testable (too few instances). Hover for the statistic and its "
        "interval; click a cell for its evidence."
    )
    rows = [
        r
        for r in data.list_runs(str(data.cache_dir()))
        if r.get("kind") == REPLICATION_KIND and r.get("status") != "unreadable"
    ]
    if not rows:
        st.info(
            "No replication summary in this run store yet. Group each condition's seeds with "
            "`python -m core group RUN RUN RUN --name NAME [--view raw:1-3]`, then:"
        )
        st.code(MAKE_COMMAND, language="bash")
        single_run()
        return
    names = [r["name"] for r in rows]
    name = names[0] if len(names) == 1 else st.sidebar.selectbox("Replication grid", names)
    rep = data.Replication(next(r["path"] for r in rows if r["name"] == name))
    with widgets.guard():
        body(rep)


def body(rep: data.Replication) -> None:
    """The grid, the chosen cell's evidence, one paragraph per claim and the teaching run."""
    summary = rep.summary
    cells = grid_cells(summary)
    event = st.altair_chart(
        charts.verdict_grid(cells.drop(columns="claim_dict")),
        width="stretch",
        on_select="rerun",
        key="verdict_grid",
    )
    picked = _picked(event)
    conditions = list(dict.fromkeys(cells["condition"]))
    claim_ids = list(dict.fromkeys(cells["claim"]))
    if picked:
        st.session_state["rep_condition"], st.session_state["rep_claim"] = picked
    c1, c2 = st.columns(2)
    condition = c1.selectbox("Condition", conditions, key="rep_condition")
    claim_id = c2.selectbox("Claim", claim_ids, key="rep_claim")
    evidence(rep, summary, cells, condition, claim_id)

    st.subheader("What the data show, claim by claim")
    for cid in claim_ids:
        pairs = [(r.condition, r.claim_dict) for r in cells.itertuples() if r.claim == cid]
        st.markdown(core_claims.paragraph(cid, pairs))
    regime(summary)
    teaching(summary)
    conditions_table(summary)


def single_run() -> None:
    """Without a grid: the claims on the default run alone (one seed, one condition)."""
    runs = [
        r
        for r in data.list_runs(str(data.cache_dir()))
        if r.get("kind") == "run" and r.get("status") == store.STATUS_COMPLETE
    ]
    name = data.default_run(runs)
    if name is None:
        return
    path = next(r["path"] for r in runs if r["name"] == name)
    try:
        payload = _run_claims(path, data.stamp(Path(path) / store.TRACIN))
    except AtlasError as exc:
        st.info(f"The claims cannot be read on run {widgets.md_escape(name)}: {exc}")
        return
    st.subheader(f"Meanwhile, on run {widgets.md_escape(name)} alone")
    st.caption(
        "One run is one seed of one condition; the same table in a terminal: "
        f"`python -m core claims {data.display_path(Path(path))}`."
    )
    summary = {"conditions": [{"name": f"run {name}", "claims": payload["claims"]}]}
    cells = grid_cells(summary)
    st.altair_chart(charts.verdict_grid(cells.drop(columns="claim_dict")), width="stretch")
    for cid in dict.fromkeys(cells["claim"]):
        pairs = [(r.condition, r.claim_dict) for r in cells.itertuples() if r.claim == cid]
        st.markdown(core_claims.paragraph(cid, pairs))


@st.cache_data(show_spinner=False, max_entries=8)
def _run_claims(path: str, stamp: int) -> dict:
    """core.analysis.replication.claims_of without writing (the store stays read-only for the app)."""
    return claims_of(path, write=False)


def grid_cells(summary: dict) -> pd.DataFrame:
    """One row per (condition, claim), the sweep's C7 as its own row."""
    rows = []
    blocks = [(c["name"], c["claims"]) for c in summary["conditions"]]
    if summary.get("sweep"):
        blocks.append((f"sweep: {summary['sweep']['name']}", summary["sweep"]["claims"]))
    for condition, claim_list in blocks:
        for c in claim_list:
            stat, ci = c.get("statistic"), c.get("ci")
            rows.append(
                {
                    "condition": condition,
                    "claim": c["id"],
                    "verdict": c["verdict"],
                    "label": "–" if stat is None else f"{stat:.3g}",
                    "statement": c["statement"],
                    "ci": "–" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]",
                    "n": c["n"],
                    "view": c["view"],
                    "why": c["why"],
                    "claim_dict": c,
                }
            )
    return pd.DataFrame(rows)


def evidence(
    rep: data.Replication, summary: dict, cells: pd.DataFrame, condition: str, claim_id: str
) -> None:
    """The data behind one cell: curves, a scatter or the sweep."""
    row = cells[(cells["condition"] == condition) & (cells["claim"] == claim_id)]
    if row.empty:
        st.info(f"{claim_id} is not evaluated for {condition}.")
        return
    claim = row.iloc[0]["claim_dict"]
    st.markdown(
        f"**{condition} · {claim_id}: {claim['verdict']}.** {widgets.md_escape(claim['why'])} "
        f"(n = {claim['n']}, view `{claim['view']}`)"
    )
    if claim_id == "C7":
        cells_df = rep.sweep_cells()
        fit = claim.get("fit")
        if cells_df is None or not fit:
            st.info("The sweep's cells are not stored with this summary.")
            return
        st.altair_chart(charts.threshold_fit_chart(cells_df, fit), width="stretch")
        return
    inst = rep.instances()
    if inst is None:
        st.info("The per-instance evidence is not stored with this summary.")
        return
    wrong = inst[(inst["condition"] == condition) & ~inst["correct"].astype(bool)]
    if claim_id in ("C5", "C6"):
        y = "end_ratio" if claim_id == "C5" else "mean_distance"
        st.altair_chart(charts.shape_scatter(wrong, y=y, select_name="rep_pick"), width="stretch")
        st.caption(
            "Each point is a misclassified test instance of one seed's run; the statistic is "
            "the Spearman correlation within each seed, averaged with the seeds' n as weights."
        )
        return
    curves = rep.curves()
    if curves is None:
        st.info("The curves are not stored with this summary.")
        return
    want = {"C2": ["S"], "C3": ["Z"]}.get(claim_id, ["S", "backslash", "Z"])
    chosen = wrong[wrong["shape"].isin(want)]
    picks = pd.concat([chosen[chosen["shape"] == s].head(CURVE_PANELS // len(want)) for s in want])
    if picks.empty:
        st.info(f"No {' or '.join(want)} curve among this condition's misclassified instances.")
        return
    sub = curves[curves["condition"] == condition].merge(
        picks[["run", "id", "shape", "end_ratio", "s_bulk"]], on=["run", "id"]
    )
    sub["panel"] = (
        sub["shape"]
        + " · "
        + sub["run"]
        + " #"
        + sub["id"].astype(str)
        + " · ER "
        + sub["end_ratio"].round(0).astype(int).astype(str)
        + " %"
    )
    panels = list(dict.fromkeys(sub["panel"]))
    for start in range(0, len(panels), EVIDENCE_COLUMNS):
        cols = st.columns(EVIDENCE_COLUMNS)
        for col, panel in zip(cols, panels[start : start + EVIDENCE_COLUMNS], strict=False):
            with col:
                st.altair_chart(
                    charts.evidence_curves(sub[sub["panel"] == panel], panel), width="stretch"
                )
    st.caption(
        f"Up to {CURVE_PANELS} misclassified curves of this condition ({', '.join(want)}), "
        "downsampled for display (every flipped instance kept, in red; clean ones blue); ER is the "
        "flips' end ratio "
        "(0 % centre, 100 % ends, random 50 %)."
    )


def regime(summary: dict) -> None:
    """The hypothesis: shape follows how much training loss the summed checkpoints leave."""
    rows = []
    for c in summary["conditions"]:
        counts = c.get("counts") or {}
        total = sum(counts.values())
        if not total or c.get("train_loss") is None:
            continue
        rows.append(
            {
                "condition": c["name"],
                "train_loss": c["train_loss"],
                **{s: counts.get(s, 0) / total for s in ("S", "backslash", "Z")},
            }
        )
    if len(rows) < 2:
        return
    st.subheader("Shape against the loss still unfitted")
    st.caption(
        "The hypothesis under test: early or slow training (much loss unexplained) gives Z, "
        "late training (only flips and hard instances unfitted) gives S. One point per "
        "condition and class: the class's share among the misclassified, pooled over seeds."
    )
    st.altair_chart(charts.regime_chart(pd.DataFrame(rows)), width="stretch")


def teaching(summary: dict) -> None:
    """The teaching run chosen by the rule written before the grid."""
    t = summary.get("teaching")
    if not t:
        return
    st.subheader("The teaching run")
    counts = ", ".join(f"{v} {k}" for k, v in t["counts"].items())
    if t.get("all_three"):
        st.success(
            f"Chosen by the rule ({t['rule']}): **{t['run']}** (condition {t['condition']}, "
            f"view `{t['view']}`), misclassified curves {counts}."
        )
    else:
        st.warning(
            f"No condition of the grid shows all three shapes among its misclassified curves. "
            f"The closest, by the rule ({t['rule']}), is **{t['run']}** (condition "
            f"{t['condition']}, view `{t['view']}`): {counts}."
        )


def conditions_table(summary: dict) -> None:
    """What each condition is: its runs, seeds, view and accuracy."""
    rows = []
    for c in summary["conditions"]:
        cfg = c.get("config") or {}
        per = c.get("per_run") or []
        accs = [r["accuracy"] for r in per if r.get("accuracy") is not None]
        rows.append(
            {
                "condition": c["name"],
                "dataset": cfg.get("dataset"),
                "lr": cfg.get("lr"),
                "epochs": cfg.get("epochs"),
                "flip rate": cfg.get("flip_rate"),
                "view": c["view"],
                "seeds": ", ".join(str(s) for s in c["seeds"]),
                "mean accuracy": sum(accs) / len(accs) if accs else None,
                "misclassified (S / backslash / Z)": " / ".join(
                    str((c.get("counts") or {}).get(s, 0)) for s in ("S", "backslash", "Z")
                ),
            }
        )
    with st.expander("Conditions", expanded=False):
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _picked(event) -> tuple[str, str] | None:
    """(condition, claim) of a clicked grid cell, if any."""
    try:
        points = event.selection["cell"]
    except (AttributeError, KeyError, TypeError):
        return None
    if not points:
        return None
    p = points[0]
    if "condition" in p and "claim" in p:
        return str(p["condition"]), str(p["claim"])
    return None
