"""Home: run picker, the run's summary, and an illustrated explanation of TracIn and the shapes."""

from __future__ import annotations

import contextlib
import shlex

import pandas as pd
import streamlit as st

from core.analysis import shapes as core_shapes
from core.analysis.analyze import final_correct, majority_baseline
from core.options.commands import reproduce_command
from core.storage import store
from core.storage.errors import AtlasError
from ui import charts, compute, data, pages, widgets

INTRO = """
**Where do mislabeled training instances land in TracIn influence scores?** This lab reproduces
the study in the paper (§III–IV): flip the labels of a few training instances, fine-tune, score every
training instance's influence on every test instance with TracIn, and look at where the flipped
ones end up. Pick a run in the sidebar; each page shows one finding.
"""

TRACIN = r"""
TracIn (Pruthi et al. 2020) estimates how much training instance $z$ helped the model on test
instance $z'$ by replaying training: at each saved checkpoint $w_i$, a gradient step on $z$ changes
the loss on $z'$ by about $\eta_i\,\nabla\ell(w_i,z)\cdot\nabla\ell(w_i,z')$. Summing over checkpoints:
"""

SHAPES_TEXT = """
Sort all training instances by their score for one test instance and plot score against rank: the
**sorted curve**. A large positive score is a *proponent* (it pushed the model towards the test
instance's true label), a large negative score an *opponent*. The paper finds three shapes
(flipped instances red, clean blue):

* **S** — most scores near zero, a few very large at both ends. The test instance is unusual; only
  a few training instances resemble it, and the flipped ones sit at the **ends**.
* **Z** — two plateaus with a steep middle: many training instances resemble the test instance and
  split by label into proponents and opponents; the flipped ones sit near the **centre**.
* **backslash** — a straight line, in between.

The **S-shapedness** index compares the slope of the least-squares line (yellow) with the slope of
the line joining the two ends (green): `S = (b_reg − b_end) / |b_end|` — about 1 for an ideal S,
0 for a straight line, −0.5 for an ideal Z. The **end ratio** says where the flipped instances sit:
0 % at the centre, 100 % at the ends, 50 % for random placement.
"""


def render() -> None:
    """Draw the home page."""
    widgets.setup_page("home", title="Influence Atlas")
    st.markdown(INTRO)
    run = widgets.open_run()
    if run is not None:
        with widgets.guard():
            summary(run)
    # A short label: a page link does not wrap, and a longer one is cut off on a phone.
    widgets.page_link("replication")
    st.caption("Each claim of the paper tested across conditions and seeds.")
    teaching()


def summary(run: data.Run) -> None:
    """The selected run's key facts."""
    m = run.manifest
    cfg = m.get("config", {})
    st.header(f"Run {widgets.md_escape(run.name)}")
    if run.status != store.STATUS_COMPLETE:
        note = m.get("error") or "some stages have not finished yet"
        (st.error if run.status == store.STATUS_FAILED else st.warning)(
            f"Status: {widgets.md_escape(run.status)} — {widgets.md_escape(note, 400)}."
        )
    if m.get("purpose"):
        st.info(widgets.md_escape(m["purpose"], 600), icon=":material/info:")
    inst = run.instances
    n_flip = int(inst["flipped"].sum())
    esc = widgets.md_escape
    source = "an uploaded file" if cfg.get("data_file") else esc(cfg.get("dataset", "?"))
    st.markdown(
        f"Dataset {source} · model {esc(cfg.get('model', '?'), 80)} · "
        f"preset {esc(cfg.get('preset', '?'))} · {plural(cfg.get('epochs'), 'epoch')} "
        f"at lr {esc(cfg.get('lr', '?'))}"
    )
    n_val = int((inst.split == "val").sum())
    cols = st.columns(5)
    cols[0].metric("training instances", f"{len(run.train)}")
    cols[1].metric("val / test", f"{n_val} / {len(run.test)}")
    cols[2].metric(
        "flipped labels",
        f"{n_flip}",
        f"{n_flip / max(len(run.train), 1):.1%} of train",
        delta_color="off",
        delta_arrow="off",
    )
    acc = m.get("test_accuracy")
    baseline = majority_baseline(inst)
    cols[3].metric(
        "test accuracy",
        widgets.fmt(acc, ".1%"),
        None if baseline is None else f"majority class {baseline:.1%}",
        delta_color="off",
        delta_arrow="off",
        help="Always predicting the test split's most frequent label scores the majority "
        "baseline; an accuracy near it means the model learned little.",
    )
    miscls = None
    with contextlib.suppress(AtlasError):
        shapes = run.shapes()
        if "correct" in shapes:
            miscls = int((~shapes["correct"].astype(bool)).sum())
    if miscls is None and run.has(store.LOGITS):
        miscls = int((~final_correct(run.logits(), inst)).sum())
    cols[4].metric("misclassified test", "–" if miscls is None else str(miscls))

    left, right = st.columns([3, 2])
    with left:
        acc_df = compute.accuracy_per_epoch(m)
        if len(acc_df):
            st.subheader("Accuracy per epoch")
            st.altair_chart(charts.accuracy_chart(acc_df), width="stretch")
        else:
            st.info("No training epochs recorded yet.")
    with right:
        st.subheader("Curve shapes")
        if run.has(store.SHAPES):
            shapes = run.shapes()
            counts = _shape_counts(shapes)
            # Short headers: the column is two fifths of a laptop's window, and a header as
            # long as "mean end ratio %" cuts off the last column.
            st.dataframe(
                counts,
                hide_index=True,
                width="stretch",
                column_config={
                    "all test": st.column_config.NumberColumn("test", help="test instances"),
                    "misclassified": st.column_config.NumberColumn(
                        "wrong", help="misclassified test instances"
                    ),
                    "mean end ratio %": st.column_config.TextColumn(
                        "end ratio %",
                        help="mean end ratio of the flipped instances on these curves "
                        "(0 % centre, 100 % ends; — where no curve has this shape)",
                    ),
                },
            )
            rule = run.rule()
            st.caption(
                f"Classes from S: S if S ≥ {rule.s_min:g}, Z if S ≤ {rule.z_max:g}, "
                "backslash between."
            )
        else:
            st.info("Shapes appear after the analyze stage:")
            st.code(run.command("analyze"), language="bash")
        with st.expander("How this run was made"):
            again = reproduce_command(run.path)
            st.code(again or "(not recorded)", language="bash")
            if again and again != m.get("command"):
                st.caption(
                    "The manifest records "
                    + widgets.md_escape(str(m.get("command")))
                    + "; today's presets set some of its options differently, so they are "
                    "written out here."
                )
            st.json(
                {
                    k: cfg.get(k)
                    for k in (
                        "preset",
                        "model",
                        "epochs",
                        "lr",
                        "batch_size",
                        "n_train",
                        "flip_rate",
                        "seed",
                    )
                },
                expanded=False,
            )
    scores_exactness(run)


EXACTNESS_TEXT = """
TracIn's definition sums gradient dot products over **all** parameters. Cheaper methods score
a part of the model (the last layers, the head) or project the gradients to a few numbers
(dense random projection, or the factorized projection that covers every parameter). The error
study measured each against exact all-parameter scores on the test rows below: per row the
rank correlation (Spearman), the share of the exact top-10 / top-1 % proponents recovered,
whether the curve's shape class stays the same and how far the flipped instances' end ratio
moves; per method the self-influence detector's recall after inspecting 10 % and its average
precision (exact: {ref_rec} and {ref_ap}).
"""


def exactness_table(summary: dict) -> pd.DataFrame:
    """One row per method of a stored error study, in the order it was run."""
    rows = []
    for name, m in (summary.get("methods") or {}).items():
        if not isinstance(m, dict):
            continue
        si = m.get("self_influence") or {}
        rows.append(
            {
                "method": name,
                "parameters": m.get("n_params"),
                "median Spearman": m.get("spearman_median"),
                "min Spearman": m.get("spearman_min"),
                "top-10 overlap": m.get("top10_overlap_mean"),
                "top-1 % overlap": m.get("top1pct_overlap_mean"),
                "same shape class": m.get("shape_agreement"),
                "mean |Δ end ratio| (points)": m.get("end_ratio_diff_mean_abs"),
                "self-infl. recall@10 %": si.get("recall_at_10pct"),
                "self-infl. AP": si.get("average_precision"),
                "seconds per checkpoint": m.get("seconds_per_checkpoint", m.get("seconds")),
            }
        )
    return pd.DataFrame(rows)


def scores_exactness(run: data.Run) -> None:
    """'How exact are the scores': the run's stored error study (core.analysis.error_study), if any."""
    try:
        study = run.error_study()
    except (AtlasError, data.MissingData) as exc:
        st.caption(f"The run's error study could not be read: {exc}")
        return
    tracin = run.manifest.get("tracin") or {}
    with st.expander("How exact are the scores"):
        if study is None:
            st.markdown(
                f"This run's scores use the parameter scope **{tracin.get('params', '?')}**"
                + (f" with projection {tracin['project']}" if tracin.get("project") else "")
                + ". No error study is stored for it; to measure how far its method and the "
                "cheaper ones are from exact all-parameter TracIn:"
            )
            widgets.command_needing_checkpoints(run, "python -m core error-study {run}")
            return
        summary, table = study
        ref = summary.get("reference") or {}
        ref_si = ref.get("self_influence") or {}
        st.markdown(
            EXACTNESS_TEXT.format(
                ref_rec=widgets.fmt(ref_si.get("recall_at_10pct"), ".2f"),
                ref_ap=widgets.fmt(ref_si.get("average_precision"), ".2f"),
            )
        )
        used = summary.get("checkpoints_used")
        n_ckpt = summary.get("n_checkpoints")
        ckpt_note = (
            ""
            if not used or len(used) == n_ckpt
            else f", scores summed over checkpoints {', '.join(map(str, used))} of {n_ckpt}"
        )
        st.caption(
            f"{summary.get('n_test_rows', '?')} test rows ({summary.get('test_subset', '?')}; "
            f"{summary.get('n_misclassified', '?')} misclassified) × "
            f"{summary.get('n_train', '?')} training instances{ckpt_note}. "
            f"This run's own scores: {tracin.get('params', '?')}"
            + (f" + {tracin['project']}" if tracin.get("project") else "")
            + f". Training took {widgets.fmt(summary.get('train_seconds'), '.0f')} s; the exact "
            f"reference {widgets.fmt(ref.get('seconds_per_checkpoint'), '.0f')} s per checkpoint "
            "on these rows. Seconds are wall time on the machine that ran the study (a method "
            "read from the run's own TracIn files shows that stage's time, for all test rows)."
        )
        widgets.number_table(
            exactness_table(summary),
            "%.3f",
            (
                "median Spearman",
                "min Spearman",
                "top-10 overlap",
                "top-1 % overlap",
                "same shape class",
                "self-infl. recall@10 %",
                "self-infl. AP",
            ),
        )
        worst = table.sort_values("spearman").head(5)
        st.caption(
            "Lowest per-row Spearman: "
            + "; ".join(
                f"{r.method} on test {int(r.test_id)}: {r.spearman:.3f}" for r in worst.itertuples()
            )
        )
        recorded = summary.get("command")
        st.caption(
            "The study was made with: " + widgets.md_escape(str(recorded or "(not recorded)"))
        )
        words = shlex.split(recorded) if isinstance(recorded, str) else []
        if words[:4] == ["python", "-m", "core", "error-study"] and len(words) > 4:
            st.markdown("To compute it again for this run:")
            rest = shlex.join(words[5:]).replace("{", "{{").replace("}", "}}")
            widgets.command_needing_checkpoints(run, shlex.join(words[:4]) + " {run} " + rest)


def plural(n: object, noun: str) -> str:
    """'1 epoch', '10 epochs', '? epochs' when unknown."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return f"? {noun}s"
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {noun}s"


def _shape_counts(shapes: pd.DataFrame) -> pd.DataFrame:
    """Counts per shape, all test instances and misclassified ones."""
    rows = []
    wrong = (
        ~shapes["correct"].astype(bool)
        if "correct" in shapes
        else pd.Series(False, index=shapes.index)
    )
    for shape in core_shapes.SHAPE_ORDER:
        sel = shapes["shape"] == shape
        rows.append(
            {
                "shape": shape,
                "all test": int(sel.sum()),
                "misclassified": int((sel & wrong).sum()),
                # Text, so a class without curves reads "—" rather than "None".
                "mean end ratio %": f"{float(shapes.loc[sel, 'end_ratio'].mean()):.1f}"
                if sel.any()
                else "—",
            }
        )
    return pd.DataFrame(rows)


@st.cache_data(show_spinner=False)
def _teaching_spec(kind: str, title: str) -> tuple[dict, str]:
    """The Vega-Lite dict of one synthetic teaching curve and its caption (class and bulk S),
    built once per process: the home page is every visitor's first page, and Altair's spec
    building is most of its time. The numbers go in the caption, which wraps; in the chart's
    title they were cut off in a third of a laptop's window."""
    df = compute.synthetic_curve(kind)
    cls = core_shapes.classify(df["score"].to_numpy())
    caption = f"class {cls['shape'][0]}, bulk S = {cls['s_bulk'][0]:+.2f}"
    return charts.teaching_curve(df, title).to_dict(), caption


def teaching() -> None:
    """TracIn and the three shapes, illustrated with synthetic curves."""
    st.header("How to read this lab")
    st.markdown(TRACIN)
    st.latex(
        r"\mathrm{TracIn}(z, z') = \sum_i \eta_i \, \nabla \ell(w_i, z) \cdot \nabla \ell(w_i, z')"
    )
    st.markdown(
        "The training instance is scored with the label it was *trained* with (flipped or not); the "
        "test instance with its true label. A flipped training instance usually works *against* the "
        "test instances it resembles."
    )
    st.markdown(SHAPES_TEXT)
    cols = st.columns(3)
    for col, kind, title in zip(
        cols, ("S", "backslash", "Z"), ("S-shaped", "backslash-shaped", "Z-shaped"), strict=True
    ):
        spec, caption = _teaching_spec(kind, title)
        col.vega_lite_chart(spec, width="stretch")
        col.caption(f"{title}: {caption}")
    st.caption("Synthetic curves of 200 training instances with 8 flipped, for illustration.")
    st.subheader("The pages")
    st.markdown(pages.pages_markdown())
    with st.expander("About this lab and the data it ships"):
        st.markdown(widgets.ABOUT)
