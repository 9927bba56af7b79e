"""Run a study: a form that starts ``python -m core run`` in the background and follows it."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from core.inputs.config import PRESETS
from core.inputs.datasets import BUILTINS
from core.options import validation
from core.orchestration import jobs
from core.storage.errors import AtlasError
from ui import data, study, widgets

MODELS = {
    "tiny": "tiny BERT trained from scratch (fast)",
    "minilm": "pretrained MiniLM (paper-like)",
    "path": "a local Hugging Face model folder…",
}
QP_JOB = "job"


def render() -> None:
    """Draw the Run a study page."""
    widgets.setup_page("study")
    st.caption(
        "Runs the whole experiment — split, flip labels, fine-tune with a checkpoint per epoch, TracIn, "
        "analytics — as `python -m core run` in the background. You can close or reload this page; "
        "the run carries on and appears in the run picker when it is done."
    )
    cache = data.cache_dir()
    if jobs.readonly():
        st.info(
            "This is a read-only demo: it shows the stored runs, and studies cannot be started or "
            "files uploaded here. To run your own, clone the project and use `make app` (README).",
            icon=":material/lock:",
        )
        return
    missing = study.compute_stack()
    if missing:
        st.warning(missing, icon=":material/memory:")
        st.caption("The form is shown so you can see what a study needs; it cannot start here.")
    jobs.dispatch(cache)
    jobs_panel(cache)
    st.divider()
    form(cache, can_start=missing is None)


def form(cache, can_start: bool = True) -> None:
    """Dataset, columns (validated before anything starts), settings, start button."""
    st.header("New study")
    source = st.radio(
        "Data", ["built-in dataset", "upload a file"], key="study_source", horizontal=True
    )
    req = study.StudyRequest(name="")
    ready = True
    if source == "built-in dataset":
        req.dataset = st.selectbox(
            "Dataset",
            list(BUILTINS),
            format_func=lambda k: f"{k} — {BUILTINS[k].description}",
            key="study_dataset",
        )
    else:
        ready = upload_section(cache, req)

    c1, c2, c3, c4 = st.columns(4)
    req.preset = c1.selectbox(
        "Preset",
        sorted(PRESETS),
        index=sorted(PRESETS).index("quick") if "quick" in PRESETS else 0,
        key="study_preset",
        help="quick: tiny model, minutes on a CPU; paper: the paper's hyper-parameters with MiniLM.",
    )
    req.flip_rate = c2.number_input(
        "Flip rate", 0.0, 0.5, 0.025, step=0.005, format="%.3f", key="study_flip"
    )
    req.seed = int(c3.number_input("Seed", 0, 10_000, 0, key="study_seed"))
    model = c4.selectbox(
        "Model",
        list(MODELS),
        format_func=lambda k: MODELS[k],
        index=list(MODELS).index(PRESETS[req.preset].model)
        if PRESETS[req.preset].model in MODELS
        else 0,
        key="study_model",
    )
    req.model = st.text_input("Model folder", key="study_model_path") if model == "path" else model
    with st.expander("More options"):
        e1, e2 = st.columns(2)
        epochs = e1.number_input("Epochs (0 = preset)", 0, 100, 0, key="study_epochs")
        n_train = e2.number_input(
            "Training instances (0 = preset)", 0, 1_000_000, 0, step=100, key="study_ntrain"
        )
        detect = st.checkbox(
            "Also run the detectors (for the Cleaning lab)", value=True, key="study_detect"
        )
        x1, x2, x3 = st.columns(3)
        choices = study.executor_choices()
        executor = x1.selectbox(
            "TracIn tasks run on",
            choices,
            key="study_executor",
            help="local: one task at a time in the job; processes: a pool on this host; ray: a "
            "Ray instance or cluster (docs/cluster.md). The scores are the same.",
        )
        workers = x2.number_input(
            "Workers (0 = default)",
            0,
            1024,
            0,
            key="study_workers",
            disabled=executor == "local",
        )
        address = x3.text_input(
            "Ray address (empty = a local instance)",
            key="study_ray_address",
            disabled=executor != "ray",
        ).strip()
        req.extra = {
            "epochs": int(epochs) or None,
            "n-train": int(n_train) or None,
            "detect": detect,
            "executor": executor if executor != "local" else None,
            "workers": int(workers) if executor != "local" and workers else None,
            "ray-address": address if executor == "ray" and address else None,
        }
    default_name = f"{req.preset}-{(req.dataset or 'upload')}-seed{req.seed}"
    req.name = st.text_input("Run name", value=default_name, key="study_name").strip()

    try:
        cmd = study.build_command(req, cache)
        shown = ["python" if c == sys.executable else c for c in cmd]  # readable, same meaning
        st.code(shlex.join(shown), language="bash", wrap_lines=True)
    except AtlasError as exc:
        st.error(widgets.md_escape(exc))
        ready = False
    if model == "path" and not req.model:
        ready = False
    slots_note(cache)
    start_clicked = st.button(
        "Start the study", type="primary", disabled=not (ready and can_start), key="study_start"
    )
    if start_clicked:
        try:
            j = study.start(cache, req)
        except AtlasError as exc:
            st.error(widgets.md_escape(exc))
        else:
            st.query_params[QP_JOB] = j.name
            st.session_state.pop("study_job", None)  # the picker opens on the new job
            st.success(f"{'Queued' if j.state() == 'queued' else 'Started'} run {j.name}.")
            time.sleep(0.3)  # let the process write its first log line before the redraw
            st.rerun()


def slots_note(cache) -> None:
    """How many jobs run and wait, against the host's cap ($ATLAS_MAX_JOBS)."""
    running, queued = jobs.running_jobs(cache), jobs.queued_jobs(cache)
    cap = jobs.max_jobs()
    if len(running) >= cap or queued:
        st.info(
            f"{len(running)} of at most {cap} job(s) running on this host"
            + (f", {len(queued)} waiting" if queued else "")
            + ": a new one joins the queue and starts when a slot frees "
            "(while this page or the Noise sweep page is open).",
            icon=":material/hourglass_top:",
        )


def upload_section(cache, req: study.StudyRequest) -> bool:
    """Upload, parse as data, pick columns, validate; fills ``req``. True when it may start."""
    limit = study.max_upload_mb()
    up = st.file_uploader(
        f"CSV, TSV or JSONL (at most {limit} MB; one row per text)",
        type=list(study.UPLOAD_TYPES),
        max_upload_size=limit,
        key="study_upload",
    )
    if up is None:
        st.caption(
            "Your file is parsed as a table only and stored under the cache; it is never modified."
        )
        return False
    raw = up.getvalue()
    try:
        df = study.parse_upload(raw, up.name)
    except AtlasError as exc:
        st.error(widgets.md_escape(exc))
        return False
    st.dataframe(df.head(8), width="stretch", hide_index=True)
    cols = [str(c) for c in df.columns]
    c1, c2 = st.columns(2)
    guess = study.guess_text_column(df)
    text_col = c1.selectbox("Text column", cols, index=cols.index(guess), key="study_text_col")
    mode = c2.radio(
        "Labels from",
        ["a label column (two classes)", "a rating column (thresholds)"],
        key="study_label_mode",
    )
    others = [c for c in cols if c != text_col] or cols
    if mode.startswith("a label"):
        label_col = st.selectbox("Label column", others, key="study_label_col")
        problems, summary = study.validate_table(df, text_col, label_col=label_col)
        req.label_col, req.rating_col = label_col, None
    else:
        r1, r2, r3 = st.columns(3)
        rating_col = r1.selectbox("Rating column", others, key="study_rating_col")
        pos_min = r2.number_input("positive if rating ≥", value=4.0, key="study_pos_min")
        neg_max = r3.number_input("negative if rating ≤", value=2.0, key="study_neg_max")
        problems, summary = study.validate_table(
            df, text_col, rating_col=rating_col, pos_min=pos_min, neg_max=neg_max
        )
        req.label_col, req.rating_col, req.pos_min, req.neg_max = None, rating_col, pos_min, neg_max
    req.text_col = text_col
    # Column names reach the command line: one rule for the CLI and this form (core.options.validation).
    for flag, column in (
        ("--text-col", req.text_col),
        ("--label-col", req.label_col),
        ("--rating-col", req.rating_col),
    ):
        try:
            validation.check_column(flag, column)
        except AtlasError as exc:
            problems = [*problems, str(exc)]
    for p in problems:
        st.error(widgets.md_escape(p))
    if summary:
        classes = "; ".join(
            f"{widgets.md_escape(k, 60)}: {v}" for k, v in (summary.get("classes") or {}).items()
        )
        st.caption(
            f"{summary.get('kept', 0)} usable rows of {summary['rows']}; classes: {classes or '–'}; "
            f"duplicate texts: {summary.get('duplicate_texts', '–')}."
        )
    if problems:
        return False
    req.data_file = str(study.save_upload(cache, raw, up.name))
    req.dataset = None
    return True


def jobs_panel(
    cache, kind: str | None = None, title: str = "Studies started here", key: str = "study_job"
) -> None:
    """Jobs started from the app (all, or one ``kind``): state, progress, log, cancel."""
    shown = [j for j in jobs.list_jobs(cache) if kind is None or j.kind() == kind]
    if not shown:
        return
    st.header(title)
    names = [j.name for j in shown]
    labels = {j.name: f"{j.name} · {j.kind()} · {j.state()}" for j in shown}
    st.session_state[key] = job_choice(
        st.session_state.get(key), names, st.query_params.get(QP_JOB)
    )
    name = st.selectbox("Job", names, key=key, format_func=labels.__getitem__)
    st.query_params[QP_JOB] = name
    running = jobs.job(cache, name).state() in ("running", "queued")
    # Only a running or queued job refreshes itself; a finished one is drawn once.
    st.fragment(run_every=2 if running else None)(job_status)(cache, name, running)


def job_choice(current: object, names: list[str], wanted: str | None) -> str:
    """The job the picker shows: this session's choice, else the link's, else the newest.

    The browser keeps the option label it last received as the picker's value, and a label
    carries the job's state. The choice is re-asserted on every run (the caller writes it into
    the session), which sends the fresh label; without that the picker said "running" after a
    job had finished, until a reload. A stale label sent back is not a job name, so the last
    name written to the URL stands in for it.
    """
    if current in names:
        return str(current)
    return wanted if wanted in names else names[0]


def job_status(cache, name: str, was_running: bool) -> None:
    """Live view of one job (re-run every two seconds by its fragment while it runs)."""
    jobs.dispatch(cache)  # a queued job starts here when a slot frees
    j = jobs.job(cache, name)
    state = j.state()
    if was_running and state not in ("running", "queued"):
        st.rerun(scope="app")  # finished: redraw the page without the timer
    info = j.info()
    if state == "queued":
        waiting = [q.name for q in jobs.queued_jobs(cache)]
        place = waiting.index(name) + 1 if name in waiting else "?"
        st.metric("state", "queued")
        st.info(
            f"Waiting for a free slot: place {place} of {len(waiting)} in the queue; at most "
            f"{jobs.max_jobs()} job(s) run at once on this host."
        )
        if st.button("Remove from the queue", key=f"cancel_{name}"):
            jobs.cancel(j)
            st.rerun()
        return
    if info.get("kind") == "sweep":
        sweep_status(cache, j, state)
        return
    prog = jobs.progress(cache / name)
    with job_panel(cache / name, j, state, info, prog, ("home", "Open the run", widgets.QP_RUN)):
        stages = prog.get("stages") or {}
        if prog.get("epochs_total"):
            done, total = prog["epochs_done"], prog["epochs_total"]
            st.progress(min(done / total, 1.0), text=f"training: epoch {done} of {total}")
        if stages:
            st.caption(" → ".join(f"{k}: {v}" for k, v in stages.items()))


@contextmanager
def job_panel(
    folder: Path,
    j: jobs.Job,
    state: str,
    info: dict,
    prog: dict,
    link: tuple[str, str, str],
) -> Iterator[None]:
    """A job's live view around its own progress lines (the ``with`` body): its state, then
    the running stage's tasks and why it stopped short, its actions (``link``: page, label,
    query parameter of what it made) and its log."""
    cols = st.columns([1, 3, 1])
    cols[0].metric("state", state)
    with cols[1]:
        yield
        tasks_view(folder)
        if prog.get("note"):  # interrupted or failed: core's sentence with the resume command
            st.warning(widgets.md_escape(prog["note"]))
        elif prog.get("error"):
            st.error(widgets.md_escape(prog["error"]))
    with cols[2]:
        job_actions(j, state, *link)
    log_view(j, info)


def tasks_view(folder) -> None:
    """One bar over the tasks of the running stage, and each worker's throughput."""
    tasks = jobs.task_progress(folder)
    total = tasks.get("total") or 0
    if not total:
        return
    done = int(tasks.get("done") or 0)
    st.progress(
        min(done / total, 1.0),
        text=f"{widgets.md_escape(tasks.get('stage', 'tasks'))} on "
        f"{widgets.md_escape(tasks.get('executor', '?'))}: {done} of {total} tasks "
        f"({widgets.md_escape(tasks.get('state', '?'))})",
    )
    rows = tasks.get("workers") or []
    if rows:
        st.dataframe(
            [
                {
                    "worker": str(w.get("worker")),
                    "tasks": w.get("tasks"),
                    "s per task": w.get("seconds_per_task"),
                    "tasks per min": w.get("tasks_per_min"),
                    "peak MiB": w.get("peak_rss_mb"),
                }
                for w in rows
            ],
            hide_index=True,
            width="stretch",
        )


def job_actions(j: jobs.Job, state: str, page: str, label: str, param: str) -> None:
    """Cancel while the job runs; once finished, a link to what it made on ``page``."""
    if state == "running":
        if st.button("Cancel", key=f"cancel_{j.name}"):
            jobs.cancel(j)
            st.rerun()
    elif state == "finished":
        widgets.page_link(
            page,
            label=label,
            icon=":material/open_in_new:",
            query_params={param: j.name},
        )


def log_view(j: jobs.Job, info: dict) -> None:
    """When and how the job started, and the end of its log (as text)."""
    st.caption(
        f"started {widgets.md_escape(info.get('started', '?'))} · pid {info.get('pid', '?')} · "
        f"log {widgets.md_escape(data.display_path(j.log_file))}"
    )
    st.code(jobs.tail(j.log_file) or "(no output yet)", language="text", height=360)


def sweep_status(cache, j: jobs.Job, state: str) -> None:
    """Live view of a sweep job: cells trained of all, cancel, link to the Noise sweep page."""
    prog = jobs.sweep_progress(cache / j.name)
    link = ("sweep", "Open the sweep", widgets.QP_SWEEP)
    with job_panel(cache / j.name, j, state, j.info(), prog, link):
        total = prog.get("cells_total") or 0
        if total:
            done = prog["cells_done"]
            st.progress(min(done / total, 1.0), text=f"cells trained: {done} of {total}")
