"""The lesson: five steps on the three shapes, on the teaching run, each with a question.

Linkable per step (``?step=N``); every number and every sentence about the data comes from
core (``core.analysis.lesson``, ``core.analysis.replication``, ``core.analysis.claims``); this file only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import lesson as core_lesson
from core.analysis import replication as core_replication
from core.analysis import shapes as core_shapes
from core.analysis import views
from core.storage import store
from ui import charts, compute, data, widgets
from ui.screens import curves

QP_STEP = "step"
VIEW_STEP = "Why one instance changes shape with the view"  # the pages showing a class link here
STEPS = (
    "What a TracIn score is",
    "One sorted curve, its two lines and the index",
    "S, backslash and Z from real instances",
    VIEW_STEP,
    "What the shape says about the data",
)


@dataclass(frozen=True)
class Question:
    """A multiple-choice question; ``why`` is shown once it is answered."""

    text: str
    options: tuple[str, ...]
    answer: str
    why: str


QUESTIONS = (
    Question(
        "A training instance has a large positive TracIn score for a test instance. What did "
        "training on it do?",
        (
            "It lowered the test instance's loss (a proponent)",
            "It raised the test instance's loss (an opponent)",
            "Nothing: TracIn only measures similarity",
        ),
        "It lowered the test instance's loss (a proponent)",
        "Each term η·∇ℓ(z)·∇ℓ(z') is the first-order drop of the test loss after a gradient "
        "step on z: positive means the step helped the test instance.",
    ),
    Question(
        "On a sorted curve, the least-squares line (yellow) is flatter than the line joining the "
        "two ends (green). Which shape is that?",
        ("S", "backslash", "Z"),
        "S",
        "A flat bulk with steep ends makes the regression line flatter than the endpoint line: "
        "S = (b_reg − b_end)/|b_end| > 0.",
    ),
    Question(
        "By the paper, where do the flipped instances sit on a Z curve?",
        ("Near both ends", "Mainly near the centre", "Spread at random"),
        "Mainly near the centre",
        "That is the paper's statement (§IV); the captions above say whether this run agrees.",
    ),
    Question(
        "Early in training almost every training instance is still unfitted. Which shape do the "
        "summed checkpoints tend to give then?",
        ("S", "Z", "backslash"),
        "Z",
        "With large errors everywhere, the head's part of each score splits by the sign of the "
        "error into two plateaus (the binary-head identity 2·e·e'·(h·h')): a Z. Once only flips and hard "
        "instances stay unfitted, a few large scores remain at the ends: an S.",
    ),
    Question(
        "A curve's shape is S in the raw sum and Z under cosine. What does that say?",
        (
            "The shape is an artefact to ignore",
            "The raw sum is dominated by a few instances with large gradients; dividing by the "
            "norms shows the many similar instances",
            "The model is wrong",
        ),
        "The raw sum is dominated by a few instances with large gradients; dividing by the "
        "norms shows the many similar instances",
        "Raw TracIn weights instances by their gradient norms, which are largest for the "
        "unfitted ones; cosine removes that weight.",
    ),
)


def render() -> None:
    """Draw the lesson."""
    widgets.setup_page("lesson")
    target = teaching_target()
    if target is None:
        st.info(
            "No run to teach from in this run store. Make one with `python -m core run --preset "
            "quick`."
        )
        return
    run, view, reason = target
    step = _step()
    st.caption(f"Step {step} of {len(STEPS)} · on run **{widgets.md_escape(run.name)}**, {reason}")
    st.progress(step / len(STEPS))
    st.header(f"{step}. {STEPS[step - 1]}")
    with widgets.guard():
        (step_one, step_two, step_three, step_four, step_five)[step - 1](run, view)
    answered = question(step)
    navigation(step, answered)


def teaching_target() -> tuple[data.Run, views.View, str] | None:
    """The teaching run and its view from the replication summary, else the default run."""
    cache = data.cache_dir()
    rows = data.list_runs(str(cache))
    for r in rows:
        if r.get("kind") != core_replication.REPLICATION_KIND:
            continue
        try:
            t = data.Replication(r["path"]).summary.get("teaching") or {}
        except Exception:  # an unreadable summary falls back to the default run
            continue
        path = cache / str(t.get("run", ""))
        if t.get("all_three") and (path / store.MANIFEST).exists():
            return (
                data.Run(path),
                views.View.parse(t["view"]),
                f"view `{t['view']}`: the teaching run chosen by the replication grid's rule "
                f"({t['rule']}).",
            )
    runs = [r for r in rows if r.get("kind") == "run" and r.get("status") == store.STATUS_COMPLETE]
    name = data.default_run(runs)
    if name is None:
        return None
    run = data.Run(cache / name)
    k = max(int(run.manifest.get("config", {}).get("epochs") or 1), 1)
    if run.has(store.TRACIN_PER_CHECKPOINT):
        k = int(run.per_checkpoint().shape[0])
    return (
        run,
        views.full_view(k),
        "all checkpoints, raw: no replication grid names a teaching run with all three shapes "
        "in this store, so the lesson uses the default run.",
    )


@st.cache_data(show_spinner=False, max_entries=16)
def _table(path: str, stamp: int, view_key: str) -> pd.DataFrame:
    """Every test instance in the view (core.analysis.replication.run_table: the claims' own numbers)."""
    return core_replication.run_table(path, view_key)[0]


def view_table(run: data.Run, view: views.View) -> pd.DataFrame:
    """The run's instances in ``view``, cached by the run's score files."""
    name = store.TRACIN_PER_CHECKPOINT if run.has(store.TRACIN_PER_CHECKPOINT) else store.TRACIN
    return _table(str(run.path), data.stamp(run.file(name)), view.key)


def examples(run: data.Run, view: views.View) -> dict[str, dict | None]:
    """One example per class by the written rule (core.analysis.lesson.EXAMPLE_RULE)."""
    return core_lesson.class_examples(view_table(run, view))


def step_one(run: data.Run, view: views.View) -> None:
    """The score, and one real training instance's per-checkpoint terms."""
    st.markdown(
        "TracIn asks how much each training instance $z$ helped the model on a test instance "
        "$z'$ by replaying training: at every saved checkpoint $w_i$ a gradient step on $z$ "
        "changes the loss on $z'$ by about $\\eta_i\\,\\nabla\\ell(w_i,z)\\cdot\\nabla\\ell(w_i,z')$. "
        "Summed over checkpoints this is the score. **Positive**: a *proponent* (it pushed the "
        "model towards the test instance's true label). **Negative**: an *opponent*. A flipped "
        "training instance teaches the wrong label, so it tends to oppose test instances that "
        "resemble it."
    )
    ex = examples(run, view)
    first = next((e for e in ex.values() if e), None)
    if first is None:
        return
    scores = _row(run, view, first["id"])
    top, _ = compute.top_influencers(scores, 3)
    train = run.train.reset_index(drop=True)
    rows = [
        {
            "training text": str(train.loc[i, "text"])[:120],
            "label used in training": run.label_names[int(train.loc[i, "observed_label"])],
            "flipped": bool(train.loc[i, "flipped"]),
            "TracIn": float(scores[i]),
        }
        for i in top
    ]
    st.markdown(
        f"The three strongest proponents of test instance **{first['id']}** ({view.label()}):"
    )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    if run.has(store.TRACIN_PER_CHECKPOINT):
        raw_terms = run.per_checkpoint()[:, run.test_row(first["id"]), int(top[0])]
        k = int(raw_terms.shape[0])
        checkpoint = np.arange(1, k + 1)
        in_view = (checkpoint >= view.first) & (checkpoint <= view.last)
        terms = pd.DataFrame({"checkpoint": checkpoint, "term": raw_terms, "in view": in_view})
        summed = float(raw_terms[in_view].sum())
        whole = float(raw_terms.sum())
        span = f"checkpoints {view.first}–{view.last}"
        if view.normalisation == views.RAW:
            what = f"the view sums {span}: {summed:.4g}, the TracIn in the table."
        else:
            what = (
                f"the view sums {span}, each term divided by gradient norms "
                f"({view.normalisation}); in raw units those terms add up to {summed:.4g}."
            )
        left_out = (
            f" Faded bars are checkpoints the view leaves out (all {k} add up to {whole:.4g})."
            if not in_view.all()
            else ""
        )
        st.markdown(
            "The strongest proponent's score is a sum of one term per checkpoint (raw terms "
            f"below); {what}{left_out}"
        )
        st.altair_chart(charts.checkpoint_terms_chart(terms), width="stretch")


def step_two(run: data.Run, view: views.View) -> None:
    """One curve drawn large with both lines and the index."""
    ex = examples(run, view)
    pick = ex.get(core_shapes.SHAPE_S) or next((e for e in ex.values() if e), None)
    if pick is None:
        return
    c = curves.load_curve(run, pick["id"], view, curves.ENLARGED_POINTS)
    lines = compute.line_rows(c.lines, c.n)
    st.altair_chart(
        charts.curve_chart(
            c.points, lines, title=f"test instance {pick['id']} · {view.label()}", height=300
        ),
        width="stretch",
    )
    b_reg, b_end = c.lines["b_reg"], c.lines["b_end"]
    st.markdown(
        f"Yellow, the least-squares line: slope {b_reg:.3g}. Green, the line joining the first "
        f"and last points: slope {b_end:.3g}. The paper's index S = (b_reg − b_end)/|b_end| = "
        f"**{c.lines['s']:+.2f}** on the whole curve; without the top and bottom 5 % of ranks "
        f"(the bulk, which the class reads) **{c.lines['s_bulk']:+.2f}**, so this curve is "
        f"**{c.shape}**. About +1 is an ideal S, 0 a straight line, −0.5 an ideal Z "
        "(docs/shapes.md)."
    )


def step_three(run: data.Run, view: views.View) -> None:
    """One real instance of each class, captioned with its numbers beside the paper's words."""
    st.caption(f"Examples chosen by a rule written in docs/lesson.md: {core_lesson.EXAMPLE_RULE}.")
    for cls, ex in examples(run, view).items():
        st.subheader(cls)
        if ex is None:
            st.warning(f"No test instance of this run is {cls} in this view.")
            continue
        curves.draw_panel(run, ex["id"], view, height=220)
        origin = (
            ""
            if ex["misclassified"]
            else " (no misclassified instance is "
            + cls
            + " here; this one is classified correctly)"
        )
        st.caption(
            f"Test instance {ex['id']}{origin}, bulk S {ex['s_bulk']:+.2f}. "
            + core_lesson.placement_sentence(cls, ex["end_ratio"])
        )


def step_four(run: data.Run, view: views.View) -> None:
    """The same instance over the checkpoints, raw and cosine, with the unfitted loss."""
    if not run.has(store.TRACIN_PER_CHECKPOINT) or int(run.per_checkpoint().shape[0]) < 2:
        st.info("This run has a single checkpoint, so its curves cannot be followed over training.")
        return
    ex = examples(run, view)
    pick = ex.get(core_shapes.SHAPE_Z) or ex.get(core_shapes.SHAPE_S)
    if pick is None:
        return
    trace = _trace(run, pick["id"])
    st.markdown(core_lesson.trace_sentence(trace))
    k = int(trace["checkpoint"].max())
    first, last = views.View(1, 1), views.View(1, k)
    cols = st.columns(2)
    for col, v in zip(cols, (first, last), strict=True):
        with col:
            curves.draw_panel(run, pick["id"], v, height=200, suffix=f" · {v.label(k)}")
    if (trace["normalisation"] == views.COSINE).any():
        cols = st.columns(2)
        for col, v in zip(cols, (views.View(1, k), views.View(1, k, views.COSINE)), strict=True):
            with col:
                curves.draw_panel(run, pick["id"], v, height=200, suffix=f" · {v.label(k)}")
    st.dataframe(trace, hide_index=True, width="stretch")


def step_five(run: data.Run, view: views.View) -> None:
    """The paper's reading and what the replication grid says about it."""
    st.markdown(
        "The paper reads the shape as a statement about the data: a test instance **far** from "
        "the training data has few relevant training instances, so most scores are small and the "
        "flips stand out at the ends (S); one **close** to much of the training data gets large "
        "scores from whole groups, and the flips drown near the centre (Z). If that holds, the "
        "ends of S curves are where to look for wrong labels."
    )
    rep = _replication()
    if rep is None:
        st.info("No replication summary in this store: the claims are untested here.")
        return
    from core.analysis import claims as core_claims

    cells = {}
    for cond in rep["conditions"]:
        for c in cond["claims"]:
            cells.setdefault(c["id"], []).append((cond["name"], c))
    for cid in ("C2", "C3", "C6"):
        st.markdown(core_claims.paragraph(cid, cells.get(cid, [])))


def question(step: int) -> bool:
    """The step's question; True once answered (right or wrong: the answer then locks)."""
    q = QUESTIONS[step - 1]
    st.divider()
    key = f"lesson_q{step}"
    locked = st.session_state.get(f"{key}_locked")
    choice = st.radio(q.text, q.options, index=None, key=key, disabled=bool(locked))
    if not locked and st.button("Check my answer", key=f"{key}_check", disabled=choice is None):
        st.session_state[f"{key}_locked"] = choice
        st.rerun()
    if locked:
        (st.success if locked == q.answer else st.warning)(
            f"{'Right' if locked == q.answer else 'Not quite'}: {q.answer}. {q.why}"
        )
    return bool(locked)


def navigation(step: int, answered: bool) -> None:
    """Back / next; next waits for the step's question."""
    left, right = st.columns(2)
    if step > 1 and left.button("← Back", key="lesson_back"):
        st.query_params[QP_STEP] = str(step - 1)
        st.rerun()
    if step < len(STEPS) and right.button(
        "Next →", key="lesson_next", disabled=not answered, help="Answer the question first."
    ):
        st.query_params[QP_STEP] = str(step + 1)
        st.rerun()


def _step() -> int:
    try:
        step = int(st.query_params.get(QP_STEP, 1))
    except (TypeError, ValueError):
        step = 1
    step = min(max(step, 1), len(STEPS))
    st.query_params[QP_STEP] = str(step)
    return step


def _row(run: data.Run, view: views.View, test_id: int):
    from ui import influence

    return influence.view_row(run, view, test_id)


def _trace(run: data.Run, test_id: int) -> pd.DataFrame:
    norms = run.grad_norms()
    epochs = run.manifest.get("epochs") or []
    return core_lesson.view_trace(
        run.per_checkpoint(),
        run.train["flipped"].to_numpy(bool),
        run.test_row(test_id),
        None if norms is None else norms[0],
        None if norms is None else norms[1],
        [e.get("train_loss") for e in epochs],
    )


def _replication() -> dict | None:
    for r in data.list_runs(str(data.cache_dir())):
        if r.get("kind") == core_replication.REPLICATION_KIND:
            try:
                return data.Replication(r["path"]).summary
            except Exception:  # unreadable: the step says the claims are untested here
                return None
    return None
