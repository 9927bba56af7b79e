"""Neighbourhoods (paper Fig. 2 and beyond): distances in [CLS] space and a map of all instances."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import stats
from ui import charts, compute, data, influence, widgets

MAX_LINES = 30  # sorted-distance curves drawn at most (Fig. 2b gets unreadable beyond)


def render() -> None:
    """Draw the Neighbourhoods page."""
    widgets.run_page(
        "neighbourhoods",
        (
            "The paper's hypothesis (Fig. 2): a test instance with many similar training instances gets a "
            "Z-shaped curve, an unusual one an S-shaped curve. Similarity is the Euclidean distance between "
            "final-layer [CLS] embeddings."
        ),
        body,
    )


def body(run: data.Run) -> None:
    """Fig. 2a, Fig. 2b, the map and the nearest training instances, under the sidebar's view."""
    view = influence.pick_view(run)
    shapes = influence.view_table(run, view)
    default = influence.is_default(run, view)
    dist = run.distances()
    sb = st.sidebar
    which = sb.radio(
        "Test instances in Fig. 2", ["misclassified", "all"], key="nb_which", horizontal=True
    )
    method = sb.radio("Map", ["UMAP", "PCA"], key="nb_method", horizontal=True)
    k = sb.slider("Proponents / opponents marked", 1, 50, 10, key="nb_k")
    test_id = widgets.pick_test(run, shapes)

    sel = (
        shapes
        if which == "all" or "correct" not in shapes
        else shapes[~shapes["correct"].astype(bool)]
    )
    if "mean_distance" not in sel:
        sel = sel.assign(
            mean_distance=np.asarray(dist, dtype=np.float64).mean(1)[
                [run.test_row(i) for i in sel["id"]]
            ]
        )
    mean_dist = (
        shapes["mean_distance"]
        if "mean_distance" in shapes
        else pd.Series(np.asarray(dist).mean(1))
    )
    # The analyze stage's stored value (analysis.json), the number Shape vs position and
    # `core show` report; computed with the same core.analysis.stats function only for older runs.
    r = stored_correlation(run) if default else None
    if r is None:
        r = stats.correlation(
            shapes["s_bulk"].to_numpy() if "s_bulk" in shapes else shapes["s"].to_numpy(),
            mean_dist.to_numpy(),
            names=("bulk S", "mean distance"),
        )
    if r["spearman"] is None:
        st.markdown(f"No correlation of bulk S with mean distance is shown: {r['reason']}.")
    else:
        st.markdown(
            f"Spearman ρ between bulk S ({widgets.md_escape(view.label(influence.n_checkpoints(run)))}) "
            f"and mean distance over all {r['n']} test instances: "
            f"**{widgets.fmt(r['spearman'], '+.2f')}** (p = {r['spearman_p']:.3g}). "
            "The hypothesis predicts a positive value: larger distances, more S-shaped."
        )
    left, right = st.columns(2)
    with left:
        st.subheader("(a) Mean distance to the training set")
        st.altair_chart(charts.mean_distance_chart(sel), width="stretch")
    with right:
        st.subheader("(b) Sorted distances")
        lines = sel.sort_values("s", ascending=False).head(MAX_LINES)
        rows = [run.test_row(i) for i in lines["id"]]
        long = compute.sorted_distance_curves(np.asarray(dist[rows]), lines["id"].to_numpy())
        st.altair_chart(charts.sorted_distance_chart(long, shapes), width="stretch")
        if len(sel) > MAX_LINES:
            st.caption(f"The {MAX_LINES} most S-shaped of {len(sel)} shown.")

    st.subheader(f"Map of all instances around test instance {test_id}")
    row = run.test_row(test_id)
    scores = np.asarray(influence.view_scores(run, view, rows=[row])[0], dtype=np.float64)
    pts = map_points(run, test_id, scores, k, method.lower())
    zoom = st.toggle(
        "zoom to the selection",
        value=True,
        key="nb_zoom",
        help="Frame the selected test instance and its proponents and opponents; off: the whole map.",
    )
    st.altair_chart(charts.embedding_map(pts, method=method.lower(), zoom=zoom), width="stretch")
    st.caption(
        f"Black diamond: the selected test instance; green triangles: its top {k} proponents; "
        f"purple triangles: its top {k} opponents; red: flipped training instances; grey: other "
        "training instances; light blue: validation and test instances."
        + (" Zoomed to the selection: points outside the frame are cut off." if zoom else "")
    )
    st.subheader("Nearest training instances")
    near = compute.nearest_training(np.asarray(dist[row]), scores, run.train, k=10)
    names = run.label_names
    near["label"] = [names[int(v)] for v in near["label"]]
    near["observed_label"] = [names[int(v)] for v in near["observed_label"]]
    st.dataframe(
        near.rename(
            columns={
                "tracin": f"{influence.score_title(view)} score",
                "observed_label": "label used",
            }
        ),
        hide_index=True,
        width="stretch",
    )
    inst = run.instances.iloc[test_id]
    st.caption(f"Test instance {test_id} ({widgets.md_escape(names[int(inst['label'])])}):")
    st.text(str(inst["text"]))


def stored_correlation(run: data.Run) -> dict | None:
    """analysis.json's bulk S vs mean distance correlation over all test instances, or None."""
    r = ((run.analysis().get("correlations") or {}).get("s_bulk_vs_mean_distance") or {}).get("all")
    if not isinstance(r, dict) or not {"n", "spearman", "spearman_p", "reason"} <= set(r):
        return None
    return r


def map_points(
    run: data.Run, test_id: int, scores: np.ndarray, k: int, method: str
) -> pd.DataFrame:
    """Every instance's 2-D position with its role on the map for the selected test instance."""
    coords = run.coords().set_index("id").reindex(run.instances["id"])
    inst = run.instances
    role = np.where(inst["split"].to_numpy() == "train", "training", "held out").astype(object)
    role[inst["flipped"].to_numpy(bool)] = "flipped"
    train_ids = run.train["id"].to_numpy()
    pro, opp = compute.top_influencers(scores, k)
    role[train_ids[opp]] = "opponent"
    role[train_ids[pro]] = "proponent"
    role[test_id] = "selected"
    names = run.label_names
    return pd.DataFrame(
        {
            "id": inst["id"].to_numpy(),
            "x": coords[f"{method}_x"].to_numpy(),
            "y": coords[f"{method}_y"].to_numpy(),
            "role": role,
            "split": inst["split"].to_numpy(),
            "label": [names[int(v)] for v in inst["observed_label"]],
            "flipped": inst["flipped"].to_numpy(bool),
            "text": inst["text"].to_numpy(),
        }
    )
