"""The inner-split retraining method (COMPSAC 2024, detector ``misclassified_influence``).

Split the training data again (80/10/10), fine-tune a fresh model on train-in-train, and
score every training instance by its TracIn influence on the test-in-train instances that
model misclassifies. The retraining is the detect stage's one heavy unit: it is cached in
``<run>/detect_work/`` under a key of what it depends on, and any executor
(:mod:`core.execution.executors`) can run it as :data:`WORK`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.cleaning.detectors.cheap import loss_scores
from core.execution.executors import ExecutorSpec, Resources, retraining_work, run_tasks
from core.inputs.config import StudyConfig, config_from_dict
from core.storage import store
from core.storage.errors import AtlasError

WORK_DIR = "detect_work"  # train-in-train checkpoints and the influence matrix of detector 2
INFLUENCE_CACHE = "misclassified_influence.npz"

# Nested split of the COMPSAC method: train-in-train / val-in-train / test-in-train.
NESTED_FRACTIONS = (0.8, 0.1, 0.1)


def nested_split(observed: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of train-in-train, val-in-train and test-in-train (80/10/10, stratified, seeded)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(observed)
    pos = np.arange(len(y))
    held = NESTED_FRACTIONS[1] + NESTED_FRACTIONS[2]
    # Stratify when every observed class can reach both held-out parts; tiny runs cannot.
    strat = y if np.bincount(y, minlength=2).min() >= 10 else None
    tit, rest = train_test_split(pos, test_size=held, stratify=strat, random_state=seed)
    strat_rest = y[rest] if strat is not None else None
    vit, teit = train_test_split(
        rest, test_size=NESTED_FRACTIONS[2] / held, stratify=strat_rest, random_state=seed
    )
    return np.sort(tit), np.sort(vit), np.sort(teit)


def aggregate_influence(matrix: np.ndarray, how: str = "abs") -> np.ndarray:
    """Combine a (n_misclassified, n_train) TracIn matrix into one suspicion per training instance.

    Each row is first divided by its own scale (the mean absolute score), so a test
    instance with large gradients does not drown the others. Then, per column:
    ``abs`` sums |influence| (the default), ``opponent`` sums max(0, −influence)
    (instances whose training step raises the misclassified instance's loss),
    ``proponent`` sums max(0, influence).

    Why ``abs``: for a two-class softmax the loss gradient is ``e·∇m`` with
    ``m = logit₁ − logit₀`` and ``e = p₁ − y`` (the binary-head identity 2·e·e'·(h·h') is the
    head's part of this), so ``TracIn(z, z') = Σ_i η_i e_i e'_i K_i(z, z')`` with K the
    margin's gradient kernel. The sign of ``e`` is fixed by the *observed* label
    (negative for 1, positive for 0), so on a misclassified instance the sign of a
    score mostly says whether the training label agrees with the test label, not
    whether it is wrong: a flip whose true class is the test's class lands among the
    opponents, a flip of the other class among the proponents. What sets flips apart
    is size: their ``|e|`` stays large until they are memorised. Measured on a quick
    preset run (1,600 train, 40 flips): on its 58 misclassified test instances 98 %
    of the scores have the sign of label agreement and flips average twice the clean
    |influence| (1.8–2.1 vs 0.9–1.0 after row scaling); on the COMPSAC matrix (50
    misclassified test-in-train instances) 93 % and 1.6×. There ``opponent`` and
    ``proponent`` rank no better than ``abs`` (``benchmarks/bench_detect.py`` prints all three).
    """
    m = np.asarray(matrix, dtype=np.float64)
    scale = np.abs(m).mean(axis=1, keepdims=True)
    m = m / np.where(scale > 0, scale, 1.0)
    if how == "abs":
        return np.abs(m).sum(axis=0)
    if how == "opponent":
        return np.clip(-m, 0, None).sum(axis=0)
    if how == "proponent":
        return np.clip(m, 0, None).sum(axis=0)
    raise AtlasError(f"Unknown aggregation '{how}'; choose abs, opponent or proponent.")


def misclassified_influence_matrix(
    run_dir: str | os.PathLike,
    config: StudyConfig,
    texts: Sequence[str],
    observed: np.ndarray,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the COMPSAC procedure and return the TracIn matrix on misclassified test-in-train.

    Returns a dict with ``matrix`` (n_misclassified, n_train), ``misclassified``
    (positions in the training split), the nested split positions and the
    train-in-train accuracies. Checkpoints live in ``<run>/detect_work/`` so an
    interrupted run resumes; the result is cached there too.
    """
    import torch  # heavy: detector 2 alone retrains

    from core.influence.registry import engine_for
    from core.learning.models import encode, load_classifier, load_tokenizer, resolve_device
    from core.learning.training import train_model

    run = Path(run_dir)
    work = run / WORK_DIR
    texts = list(texts)
    y = np.array(observed, dtype=np.int64)  # a writable copy: torch wraps it below
    tit, vit, teit = nested_split(y, config.seed)
    tokenizer = load_tokenizer(run)
    result = train_model(
        config,
        tokenizer,
        [texts[i] for i in tit],
        y[tit],
        eval_sets={
            "val_in_train": ([texts[i] for i in vit], y[vit]),
            "test_in_train": ([texts[i] for i in teit], y[teit]),
        },
        checkpoint_dir=work / "checkpoints",
        progress=progress,
        desc="detect: train-in-train",
    )
    pred = result.eval_logits["test_in_train"][-1].argmax(axis=1)
    wrong = teit[pred != y[teit]]
    fallback = False
    if len(wrong) == 0:
        # Nothing misclassified: use the test-in-train instances the model is least sure of.
        loss = loss_scores(result.eval_logits["test_in_train"][-1], y[teit])
        wrong = teit[np.argsort(-loss)[: max(1, len(teit) // 10)]]
        fallback = True
    engine = engine_for(  # TracInCP, or the factorized engine for factorized:K
        result.checkpoints,
        scope=config.tracin_params,
        project=config.tracin_project,
        seed=config.tracin_seed,
        device=resolve_device(config.device),
        loader=load_classifier,
    )
    train_data = encode(tokenizer, texts, config.max_length)
    train_data["labels"] = torch.as_tensor(y, dtype=torch.long)
    test_data = encode(tokenizer, [texts[i] for i in wrong], config.max_length)
    test_data["labels"] = torch.as_tensor(y[wrong], dtype=torch.long)
    # Shards make the TracIn pass resumable; they are removed once the result is cached.
    tracin = engine.compute(
        train_data, test_data, shard_dir=work / "tracin_shards", progress=progress
    )
    matrix = tracin.matrix
    shutil.rmtree(work / "tracin_shards", ignore_errors=True)
    return {
        "matrix": np.asarray(matrix, dtype=np.float32),
        "self_influence": np.asarray(tracin.self_influence, dtype=np.float32),
        "misclassified": wrong,
        "train_in_train": tit,
        "val_in_train": vit,
        "test_in_train": teit,
        "fallback": fallback,
        "val_in_train_accuracy": result.history[-1].get("val_in_train_accuracy"),
        "test_in_train_accuracy": result.history[-1].get("test_in_train_accuracy"),
    }


@dataclass(frozen=True)
class Retraining:
    """Detector 2's retraining (train-in-train model and its influence matrix) as one unit.

    ``key`` hashes what the result depends on (the run's config and training labels); the
    result is cached in ``detect_work/`` and reused while the key matches.
    """

    run: str
    key: str


def _cached_key(cache: Path) -> str | None:
    """The key a cached influence matrix was made for (None: absent or unreadable)."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            return str(z["key"])
    except (OSError, ValueError, KeyError):
        return None


def plan_retraining(run_dir: str | os.PathLike) -> list[Retraining]:
    """The retraining the detect stage still needs: [] when its cached result is current."""
    run = Path(run_dir)
    config = config_from_dict(store.load_manifest(run).get("config", {}))
    unit = Retraining(str(run), cache_key(config, _observed(_train_rows(run))))
    return [] if _cached_key(run / WORK_DIR / INFLUENCE_CACHE) == unit.key else [unit]


def compute_retraining(unit: Retraining, progress: bool = False, force: bool = False) -> Path:
    """Run one retraining (skipped when its result is cached, unless ``force``); the cache path."""
    run = Path(unit.run)
    cache = run / WORK_DIR / INFLUENCE_CACHE
    if not force and _cached_key(cache) == unit.key:
        return cache
    config = config_from_dict(store.load_manifest(run).get("config", {}))
    train = _train_rows(run)
    data = misclassified_influence_matrix(
        run, config, train["text"].tolist(), _observed(train), progress
    )
    payload = {k: np.asarray(v) for k, v in data.items() if v is not None}
    payload["key"] = np.asarray(unit.key)
    with store.atomic_path(cache) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **payload)
    return cache


def retrain_elsewhere(
    run: Path,
    todo: Sequence[str],
    executor: ExecutorSpec,
    config: StudyConfig,
    force: bool,
    progress: bool,
) -> bool:
    """Run detector 2's retraining on a non-local executor first; True when it did."""
    if executor.kind == "local" or "misclassified_influence" not in todo:
        return False
    if not (run / store.TOKENIZER_DIR).is_dir():
        return False  # the detector reports why it is skipped
    units = plan_retraining(run)
    if force and not units:
        units = [Retraining(str(run), cache_key(config, _observed(_train_rows(run))))]
    run_tasks(
        WORK,
        units,
        executor,
        kwargs={"force": force},
        resources=Resources(1.0, 1.0 if config.device == "cuda" else 0.0, RETRAIN_MEMORY_MB),
        progress=progress,
        folder=run,
    )
    return True


def _retraining_name(unit: Retraining) -> str:
    return f"retraining-{unit.key[:10]}"


def _retraining_outputs(unit: Retraining) -> list[str]:
    return [f"{WORK_DIR}/{INFLUENCE_CACHE}"]


def _compute_retraining(unit: Retraining, force: bool = False) -> None:
    """:func:`compute_retraining` as an executor runs it (quiet; the path stays in the worker)."""
    compute_retraining(unit, progress=False, force=force)


# Detector 2's retraining as every executor (core.execution.executors) runs it.
WORK = retraining_work("detect", _compute_retraining, _retraining_name, _retraining_outputs)


# Declared to Ray for scheduling (an upper estimate, not a measurement).
RETRAIN_MEMORY_MB = 4096


def cache_key(config: StudyConfig, observed: np.ndarray) -> str:
    """What detector 2's cached matrix depends on: the config and the observed training labels."""
    payload = {
        "config": {k: v for k, v in config.to_dict().items() if k != "device"},
        "labels": np.asarray(observed, dtype=np.int64).tolist(),
        "fractions": NESTED_FRACTIONS,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _train_rows(run: Path) -> pd.DataFrame:
    """The run's training split, in instances.parquet order (the detectors' order)."""
    instances = store.load_instances(run)
    return instances[instances["split"] == "train"].reset_index(drop=True)


def _observed(train: pd.DataFrame) -> np.ndarray:
    """The observed (possibly flipped) labels of the training rows."""
    return train["observed_label"].to_numpy(np.int64)
