"""One study run, stage by stage: data → train → tracin → analyze, resumable at every stage.

A run folder is created only after the input has been validated (dataset, split,
tokenizer, model), so bad input leaves nothing behind. Its manifest says
``running`` until the last stage has finished, ``complete`` then, ``failed`` (with
the error) when a stage raised; a killed process leaves ``running`` and the same
command picks up from the last finished stage and checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.analysis.analyze import analyze_run
from core.execution.executors import LOCAL
from core.inputs.config import StudyConfig
from core.inputs.datasets import load_dataset
from core.options.run_options import STAGES
from core.options.validation import check_config, validate_study
from core.storage import locks, provenance, store
from core.storage.errors import AtlasError

# Fields that change where a computation runs, not what it computes.
_NAME_NEUTRAL = {"device"}


def run_name(config: StudyConfig) -> str:
    """Deterministic folder name: rerunning the same command finds (and resumes) the same run."""
    payload = {k: v for k, v in config.to_dict().items() if k not in _NAME_NEUTRAL}
    digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:6]
    source = Path(config.data_file).stem if config.data_file else config.dataset
    source = re.sub(r"[^A-Za-z0-9_.-]+", "-", source).strip("-") or "data"
    return f"{config.preset}-{source}-seed{config.seed}-{digest}"


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "transformers",
        "numpy",
        "pandas",
        "scikit-learn",
        "umap-learn",
        "fugashi",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def validate_config(config: StudyConfig) -> None:
    """Reject impossible settings with one sentence each, before anything is read or written."""
    check_config(config)


def prepare_run(config: StudyConfig, run_dir: Path, command: str, data_dir: Path | None) -> None:
    """Data stage: validate input, then write instances, tokenizer and a 'running' manifest."""
    # scikit-learn and SciPy: loaded by the commands that use them
    from core.inputs.splits import split_instances

    t0 = time.perf_counter()
    data = load_dataset(config, data_dir)  # before torch is imported: bad data fails fast
    # torch and transformers: loaded by the commands that compute
    from core.learning.models import build_model, build_tokenizer

    instances = split_instances(data, config.n_total, config.n_flips, config.seed)
    sample = dict(instances.attrs.get("sample", {}))
    if sample.get("used_all") and sample.get("n_available", 0) < sample.get("n_requested", 0):
        print(
            f"note: the data has {sample['n_available']} usable rows, fewer than the "
            f"{sample['n_requested']} requested; all of them are used.",
            file=sys.stderr,
        )
    train_texts = instances.loc[instances["split"] == "train", "text"].tolist()
    # Inside the locked run folder, named by our pid: the next writer removes it if we are killed.
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=locks.temp_prefix(), dir=run_dir) as tmp:
        tokenizer = build_tokenizer(config.model, train_texts, Path(tmp) / store.TOKENIZER_DIR)
        build_model(
            config.model, tokenizer, config.max_length, config.seed
        )  # fails early if unloadable
        if (run_dir / store.TOKENIZER_DIR).exists():
            shutil.rmtree(run_dir / store.TOKENIZER_DIR)
        shutil.move(str(Path(tmp) / store.TOKENIZER_DIR), str(run_dir / store.TOKENIZER_DIR))
    store.write_parquet(run_dir / store.INSTANCES, instances)
    counts = instances["split"].value_counts()
    store.write_json(
        run_dir / store.MANIFEST,
        {
            "kind": "run",
            "name": run_dir.name,
            "status": store.STATUS_RUNNING,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command,
            "config": config.to_dict(),
            "versions": package_versions(),
            "data": {
                **data.info,
                "sample": sample,
                "label_names": list(data.label_names),
                "label_mapping": dict(data.label_mapping),
            },
            "n_train": int(counts.get("train", 0)),
            "n_val": int(counts.get("val", 0)),
            "n_test": int(counts.get("test", 0)),
            "n_flipped": int(instances["flipped"].sum()),
            "epochs": [],
            "checkpoints": [],
            "stages": {},
            "timings_s": {},
        },
    )
    store.mark_stage(run_dir, "data", store.STATUS_COMPLETE, time.perf_counter() - t0)


def train_run(config: StudyConfig, run_dir: Path, progress: bool = True) -> None:
    """Train stage: fine-tune with per-epoch checkpoints, then store logits and metrics."""
    # torch and transformers: loaded by the commands that compute
    from core.learning.models import load_tokenizer
    from core.learning.training import train_model

    t0 = time.perf_counter()
    instances = store.load_instances(run_dir)
    tokenizer = load_tokenizer(run_dir)
    parts = {s: instances[instances["split"] == s] for s in ("train", "val", "test")}
    eval_sets = {
        "train": (parts["train"]["text"].tolist(), parts["train"]["observed_label"].to_numpy()),
        "val": (parts["val"]["text"].tolist(), parts["val"]["label"].to_numpy()),
        "test": (parts["test"]["text"].tolist(), parts["test"]["label"].to_numpy()),
    }

    def record(result) -> None:
        store.update_manifest(
            run_dir,
            epochs=[_epoch_row(h) for h in result.history],
            checkpoints=[
                {"epoch": i + 1, "path": str(Path(p).relative_to(run_dir)), "lr": lr}
                for i, (p, lr) in enumerate(result.checkpoints)
            ],
        )

    result = train_model(
        config,
        tokenizer,
        eval_sets["train"][0],
        eval_sets["train"][1],
        eval_sets=eval_sets,
        checkpoint_dir=run_dir / store.CHECKPOINTS_DIR,
        progress=progress,
        on_epoch=record,
        # Each checkpoint names the data it learned from: never resumed over other data.
        trained_on=provenance.training_data(run_dir),
    )
    record(result)
    logits = np.concatenate([result.eval_logits[s] for s in ("train", "val", "test")], axis=1)
    store.write_npy(run_dir / store.LOGITS, logits.astype(np.float32))
    last = result.history[-1]
    store.update_manifest(run_dir, test_accuracy=last["test_accuracy"])
    store.mark_stage(run_dir, "train", store.STATUS_COMPLETE, time.perf_counter() - t0)


def _epoch_row(h: dict) -> dict:
    """The manifest's per-epoch entry."""
    keys = ("epoch", "lr", "train_loss", "val_accuracy", "val_loss", "test_accuracy", "test_loss")
    row = {k: h[k] for k in keys if k in h}
    row["train_accuracy_observed"] = h.get("train_accuracy")
    row["seconds"] = h.get("seconds")
    return row


def run_study(
    config: StudyConfig,
    cache_dir: str | Path = "cache",
    name: str | None = None,
    command: str = "",
    until: str = "analyze",
    progress: bool = True,
    data_dir: Path | None = None,
    executor: Any = None,
) -> Path:
    """Run (or resume) a study up to stage ``until`` and return its folder.

    ``executor`` (a :class:`core.execution.executors.ExecutorSpec`; default local) runs the tracin
    stage's tasks; training and analytics run in this process.
    """
    if until not in STAGES:
        raise AtlasError(f"--until must be one of {', '.join(STAGES)} (got '{until}').")
    validate_study(config, cache_dir, name)
    run_dir = Path(cache_dir) / (name or run_name(config))
    locks.clean_litter(cache_dir)  # temporary folders of killed writers of older versions
    with locks.hold(run_dir):
        return _run_locked(config, run_dir, command, until, progress, data_dir, executor)


def check_same_config(run_dir: Path, config: StudyConfig) -> None:
    """Refuse to resume a run folder that holds a study of another configuration."""
    if not (run_dir / store.MANIFEST).exists():
        return
    manifest = store.load_manifest(run_dir)
    if manifest.get("config") != config.to_dict():
        stored = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        old = {k: v for k, v in stored.items() if k not in _NAME_NEUTRAL}
        new = {k: v for k, v in config.to_dict().items() if k not in _NAME_NEUTRAL}
        if old != new:
            raise AtlasError(
                f"{run_dir} already holds a run with a different configuration; "
                "choose another --name or delete that folder."
            )


def plan_study(
    config: StudyConfig,
    cache_dir: str | Path = "cache",
    name: str | None = None,
    until: str = "analyze",
    detect: bool = False,
    data_dir: Path | None = None,
) -> list[str]:
    """What ``run`` would do, as lines to print, after every check it makes first; writes nothing.

    The data are read, labelled, sampled and split exactly as the data stage would (so a
    wrong column or too few rows is reported now), and the model is resolved (a model folder
    must hold a readable config); no tokenizer is built and no weights are loaded.
    """
    # scikit-learn; torch and transformers: loaded by the commands that use them
    from core.inputs.splits import split_instances
    from core.learning.models import model_source

    if until not in STAGES:
        raise AtlasError(f"--until must be one of {', '.join(STAGES)} (got '{until}').")
    validate_study(config, cache_dir, name)
    run_dir = Path(cache_dir) / (name or run_name(config))
    check_same_config(run_dir, config)
    data = load_dataset(config, data_dir)
    instances = split_instances(data, config.n_total, config.n_flips, config.seed)
    counts = instances["split"].value_counts()
    source = model_source(config.model) or "a BERT from scratch"
    if Path(source).is_dir():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtlasError(
                f"Model directory {source} has no readable config ({first})."
            ) from None
    wanted = list(STAGES[: STAGES.index(until) + 1]) + (["detect"] if detect else [])
    todo = [s for s in wanted if not store.stage_complete(run_dir, s)]
    state = "new" if not (run_dir / store.MANIFEST).exists() else "exists; finished stages kept"
    return [
        "dry run: everything was checked and nothing was written",
        f"run folder  {run_dir} ({state})",
        f"data        {data.info.get('source', config.dataset)}: {len(data.frame):,} usable rows → "
        f"{counts.get('train', 0):,} train / {counts.get('val', 0):,} val / "
        f"{counts.get('test', 0):,} test, {int(instances['flipped'].sum())} training labels flipped",
        f"model       {config.model} ({source}), {config.epochs} epochs, lr {config.lr:g}, "
        f"TracIn over {config.tracin_params}"
        + (f", projection {config.tracin_project}" if config.tracin_project else ""),
        f"stages      {', '.join(todo) if todo else 'none'} to do"
        + (
            f" ({', '.join(s for s in wanted if s not in todo)} done)"
            if len(todo) < len(wanted)
            else ""
        ),
    ]


def _run_locked(
    config: StudyConfig,
    run_dir: Path,
    command: str,
    until: str,
    progress: bool,
    data_dir: Path | None,
    executor: Any = None,
) -> Path:
    """:func:`run_study` once the run folder's lock is held."""
    check_same_config(run_dir, config)
    check_same_source(run_dir)
    if not _stage_ready(run_dir, "data", progress):
        # New, or its instances were lost: the seeded data stage makes the same ones again.
        prepare_run(config, run_dir, command, data_dir)

    wanted = STAGES[: STAGES.index(until) + 1]
    manifest = store.load_manifest(run_dir)
    if manifest.get("status") == store.STATUS_COMPLETE and all(
        _stage_ready(run_dir, s) for s in wanted
    ):
        # Nothing to do: nothing is written, so a shipped run stays as committed when the
        # command its manifest records is typed again.
        return run_dir
    try:
        if any(not _stage_ready(run_dir, s) for s in wanted):
            # Work to do: a run that failed before is running again, its old error gone.
            store.update_manifest(run_dir, status=store.STATUS_RUNNING, error=None)
        if "train" in wanted and not _stage_ready(run_dir, "train", progress):
            train_run(config, run_dir, progress)
        if "tracin" in wanted and not _stage_ready(run_dir, "tracin", progress, damage=False):
            # torch and transformers: loaded by the commands that compute
            from core.influence import run_tracin

            # run_tracin says on stderr when it remakes a damaged file.
            run_tracin(run_dir, device=config.device, progress=progress, executor=executor or LOCAL)
        if "analyze" in wanted and not _stage_ready(run_dir, "analyze", progress):
            analyze_run(run_dir, progress=progress)
    except BaseException as exc:
        # KeyboardInterrupt and kill leave 'running' (resumable); real failures say why.
        if isinstance(exc, Exception):
            store.update_manifest(
                run_dir, status=store.STATUS_FAILED, error=str(exc) or type(exc).__name__
            )
        raise
    complete = all(_stage_ready(run_dir, s) for s in wanted)
    store.update_manifest(
        run_dir,
        status=store.STATUS_COMPLETE if complete else store.STATUS_RUNNING,
        completed_stages=list(wanted),
        error=None,
    )
    return run_dir


def _stage_ready(run_dir: Path, stage: str, say: bool = False, damage: bool = True) -> bool:
    """Whether ``stage`` is complete with whole files made from its inputs as they are now.

    A truncated or wrongly shaped file (``store.stage_problem``) or a changed input
    (``core.storage.provenance``: a retrained checkpoint, new instances) makes the stage due again,
    so ``run`` never reports a damaged stage or a mix of inputs complete; the stages after
    it follow, as their own inputs change when it is remade. With ``say`` the reason is
    announced on stderr (the damage one only with ``damage``: the tracin stage says it).
    """
    if not store.stage_complete(run_dir, stage):
        return False
    problem = store.stage_problem(run_dir, stage)
    if problem is not None:
        if say and damage:
            print(
                f"note: {problem.split('; ')[0]}; making the {stage} stage again.", file=sys.stderr
            )
        return False
    stale = provenance.stale_reason(run_dir, stage)
    if stale is not None and say:
        print(f"note: {stale}; making the {stage} stage again.", file=sys.stderr)
    return stale is None


def check_same_source(run_dir: Path) -> None:
    """Refuse to go on with a run whose data file changed since its data stage read it.

    Its checkpoints and results were made from the old content; going on would either
    keep them under the new file's name or mix the two. The user chooses: the old file
    back, or a new run for the new one.
    """
    record = provenance.read_record(run_dir, "data")
    if record is None or not isinstance(record.get("inputs"), dict):
        return
    for name, recorded in record["inputs"].items():
        if recorded is not None and provenance.same_content(recorded, name) is False:
            raise AtlasError(
                f"{name} changed since the run {run_dir} was made from it; restore the "
                f"file to use this run, or study the edited file in a new run (give "
                f"another --name, or delete {run_dir})."
            )
