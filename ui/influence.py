"""The influence view a page shows (a checkpoint range × a normalisation), from core's definitions.

Every number here comes from ``core``: the default view's shapes from ``shapes.parquet``,
the precomputed single / cumulative views from ``shapes_by_view.parquet``, and any other
range computed on the fly with :func:`core.analysis.views.view_scores` and
:func:`core.analysis.shapes.classify` under the run's recorded rule. Nothing is re-derived.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis import shapes as core_shapes
from core.analysis import views
from core.storage import store
from core.storage.errors import AtlasError
from ui import data, widgets

TABLE_COLUMNS = ["id", "correct", "s_raw", "s", "s_bulk", "shape", "end_ratio", "mean_distance"]
_NORM_KEY = "view_normalisation"
_RANGE_KEY = "view_range"
_SEEDED_KEY = "view_link_read"


def n_checkpoints(run: data.Run) -> int:
    """How many checkpoints the run's per-checkpoint stack holds (0 without one)."""
    if not run.has(store.TRACIN_PER_CHECKPOINT):
        return 0
    return int(run.per_checkpoint().shape[0])


def normalisations(run: data.Run) -> tuple[str, ...]:
    """Normalisations the run's stored arrays allow (core's rule, :func:`core.analysis.views.allowed_normalisations`)."""
    return views.allowed_normalisations(
        n_checkpoints(run) > 0, run.has(store.GRAD_NORMS_TRAIN), run.has(store.GRAD_NORMS_TEST)
    )


def default_view(run: data.Run) -> views.View:
    """Every checkpoint, raw scores: the TracIn matrix itself."""
    return views.full_view(max(n_checkpoints(run), 1))


def is_default(run: data.Run, view: views.View) -> bool:
    """Whether ``view`` is what ``shapes.parquet`` describes."""
    return view == default_view(run)


def score_title(view: views.View) -> str:
    """Axis title of a view's scores, the same on every chart."""
    return {
        views.RAW: "TracIn",
        views.RELATIVE: "relative TracIn",
        views.COSINE: "cosine TracIn",
    }[view.normalisation]


def view_from_link(run: data.Run, asked: str | None) -> views.View | None:
    """The view a ``?view=`` link names (core's view key, e.g. ``cosine:2-5``), or None when
    it names none this run can show (no link, a malformed key, a range or normalisation the
    run lacks)."""
    if not asked:
        return None
    try:
        view = views.View.parse(str(asked))
        views.check_view(view, max(n_checkpoints(run), 1), True)
    except AtlasError:
        return None
    if view.normalisation not in normalisations(run):
        return None
    return view


def pick_view(run: data.Run, where=st.sidebar, key: str = "") -> views.View:
    """Sidebar controls for the view: normalisation and checkpoint range (default: all, raw).

    The view lives in the URL as ``?view=<core view key>`` next to ``?run=`` and ``?test=``
    (the default view is left out), so a share link reproduces it. As with the run, the URL
    wins on a fresh session; afterwards the widgets do.
    """
    k = n_checkpoints(run)
    norms = normalisations(run)
    nkey, rkey = _NORM_KEY + key, _RANGE_KEY + key
    asked = st.query_params.get(widgets.QP_VIEW)
    first_call = _SEEDED_KEY not in st.session_state
    st.session_state[_SEEDED_KEY] = True  # a link is read once, at the session's start
    if asked is not None and first_call:
        linked = view_from_link(run, asked)
        if linked is None:
            st.warning(
                f"The link asks for the view {widgets.md_escape(asked, 40)}, which this run "
                "cannot show; showing every checkpoint, raw scores instead.",
                icon=":material/link_off:",
            )
        else:
            st.session_state[nkey] = linked.normalisation
            st.session_state[rkey] = (linked.first, linked.last)
    if k <= 1 and len(norms) == 1:
        st.query_params.pop(widgets.QP_VIEW, None)
        return default_view(run)
    where.markdown("**Influence view**")
    if st.session_state.get(nkey) not in norms:
        st.session_state[nkey] = views.RAW
    # Re-asserted so the view survives a page switch (Streamlit drops a left page's widget values).
    st.session_state[nkey] = st.session_state[nkey]
    norm = where.selectbox(
        "Normalisation",
        norms,
        key=nkey,
        format_func=lambda n: n,
        help="; ".join(f"{n}: {views.NORMALISATION_HELP[n]}" for n in norms)
        + (f". {note}" if (note := views.missing_normalisations_note(norms)) else ""),
    )
    first, last = 1, max(k, 1)
    if k > 1:
        current = st.session_state.get(rkey)
        if not (isinstance(current, tuple | list) and 1 <= current[0] <= current[1] <= k):
            st.session_state[rkey] = (1, k)
        st.session_state[rkey] = tuple(st.session_state[rkey])
        first, last = where.slider(
            "Checkpoints summed",
            1,
            k,
            key=rkey,
            help="TracIn sums one term per checkpoint. Pick one checkpoint (both handles "
            "together) or any range; 1 to the last is the full score. Every chart on the "
            "page uses this range.",
        )
    view = views.View(int(first), int(last), norm)
    where.caption(view.label(k))
    if is_default(run, view):
        st.query_params.pop(widgets.QP_VIEW, None)
    elif st.query_params.get(widgets.QP_VIEW) != view.key:
        st.query_params[widgets.QP_VIEW] = view.key
    return view


def view_table(run: data.Run, view: views.View) -> pd.DataFrame:
    """One row per test instance under ``view``: id, correct, s_raw, s, s_bulk, shape,
    end_ratio, mean_distance (as far as the run has them)."""
    base = run.shapes()
    if is_default(run, view):
        return base[[c for c in TABLE_COLUMNS if c in base]].copy()
    extra = base[[c for c in ("id", "correct", "mean_distance") if c in base]]
    stored = run.shapes_by_view()
    if stored is not None:
        hit = stored[stored["view"] == view.key].drop_duplicates("id")
        if len(hit) == len(base):
            cols = ["id", "s_raw", "s", "s_bulk", "shape", "end_ratio"]
            return extra.merge(hit[cols], on="id", how="left")[
                [c for c in TABLE_COLUMNS if c in extra or c in cols]
            ]
    files = (store.TRACIN_PER_CHECKPOINT, store.GRAD_NORMS_TRAIN, store.GRAD_NORMS_TEST)
    stamps = tuple(data.stamp(run.file(f)) if run.has(f) else 0 for f in files)
    computed = _computed_table(
        str(run.path), stamps, view.key, tuple(sorted(run.rule().to_json().items()))
    )
    return extra.merge(computed, on="id", how="left")


@st.cache_data(show_spinner="Classifying the curves of this view…", max_entries=64)
def _computed_table(
    path: str, stamps: tuple[int, ...], key: str, rule: tuple[tuple[str, float], ...]
) -> pd.DataFrame:
    """Shapes of a view the pipeline did not precompute, through core.analysis.shapes.classify."""
    run = data.Run(path)
    scores = view_scores(run, views.View.parse(key))
    cls = core_shapes.classify(
        scores,
        run.train["flipped"].to_numpy(bool),
        rule=core_shapes.ShapeRule.from_json(dict(rule)),
    )
    return pd.DataFrame(
        {"id": run.test_ids, **{c: cls[c] for c in ("s_raw", "s", "s_bulk", "shape", "end_ratio")}}
    )


def view_scores(run: data.Run, view: views.View, rows=None) -> np.ndarray:
    """Scores of ``view`` (test rows × training instances) via core.analysis.views.view_scores."""
    if is_default(run, view):  # the stored matrix itself (the checkpoints' sum, bit for bit)
        tr = np.asarray(run.tracin(), dtype=np.float64)
        return tr if rows is None else tr[rows]
    norms = run.grad_norms()
    return views.view_scores(
        run.per_checkpoint(),
        view,
        None if norms is None else norms[0],
        None if norms is None else norms[1],
        rows=rows,
    )


def view_row(run: data.Run, view: views.View, test_id: int) -> np.ndarray:
    """One test instance's scores under ``view`` (training order)."""
    return view_scores(run, view, rows=[run.test_row(test_id)])[0]
