"""The detector registry: every detector's entry, and how each reads the run's files.

Adding a detector = its scoring function (a family module beside this one) and one entry in
:data:`REGISTRY`; the detect stage, the CLI, the app and the tests read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.shapes import ShapeRule, bulk_index
from core.cleaning.detectors.cheap import (
    aum_scores,
    cleanlab_scores,
    loss_scores,
    pretrained_features,
    random_scores,
)
from core.cleaning.detectors.retraining import (
    Retraining,
    aggregate_influence,
    cache_key,
    compute_retraining,
)
from core.cleaning.detectors.shape_aware import shape_aware_scores
from core.inputs.config import StudyConfig
from core.storage import store
from core.storage.errors import AtlasError


class Skip(Exception):
    """A detector's inputs are missing; the message says which."""


class Inputs:
    """Lazy access to the run files the detectors read."""

    def __init__(self, run: Path, instances: pd.DataFrame, train: pd.DataFrame) -> None:
        self.run = run
        self.instances = instances
        self.train = train
        self.train_ids = train["id"].to_numpy(np.int64)
        self.observed = train["observed_label"].to_numpy(np.int64)

    def require(self, name: str) -> Path:
        """Path of a run file, or skip the detector that needs it."""
        path = self.run / name
        if not path.exists():
            raise Skip(f"{name} is missing")
        return path

    def logits(self) -> np.ndarray:
        """``logits.npy`` (n_epochs, n_instances, 2), checked against instances.parquet."""
        logits = store.read_npy(self.require(store.LOGITS))
        if logits.ndim != 3 or logits.shape[1] != len(self.instances):
            raise Skip(
                f"{store.LOGITS} has shape {logits.shape}, not (epochs, {len(self.instances)}, 2)"
            )
        return logits


def _self_influence(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Detector: TracIn self-influence from the tracin stage."""
    n = len(inputs.train)
    values = np.asarray(store.read_npy(inputs.require(store.SELF_INFLUENCE)), dtype=np.float64)
    if values.shape != (n,):
        raise Skip(f"{store.SELF_INFLUENCE} has shape {values.shape}, not ({n},)")
    return (
        values,
        "TracIn self-influence Σ η_i‖∇ℓ(w_i, z)‖² with the observed label (tracin stage).",
        None,
    )


def _loss(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Detector: loss on the observed label at the final checkpoint."""
    logits = inputs.logits()
    values = loss_scores(logits[-1][inputs.train_ids], inputs.observed)
    return (
        values,
        f"cross-entropy on the observed label at the final checkpoint (epoch {logits.shape[0]}).",
        None,
    )


def _aum(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Detector: negated area under the margin over the checkpoints."""
    logits = inputs.logits()
    values = aum_scores(np.asarray(logits[:, inputs.train_ids]), inputs.observed)
    return (
        values,
        (
            f"negated area under the margin: −mean over {logits.shape[0]} checkpoints of "
            "logit[observed] − logit[other] (eval-mode logits after each epoch)."
        ),
        None,
    )


def _random(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Baseline: uniform random scores."""
    n = len(inputs.train)
    return random_scores(n, config.seed), f"uniform random scores (seed {config.seed}).", None


def _cleanlab(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector: confident learning on out-of-sample probabilities."""
    texts = inputs.train["text"].tolist()
    features, why = None, ""
    try:
        features = pretrained_features(inputs.run, config, texts)
    except (AtlasError, ImportError, OSError) as exc:
        why = f" (pretrained encoder unavailable: {exc})"
    try:
        values, extra = cleanlab_scores(texts, inputs.observed, config.seed, features=features)
    except ImportError as exc:
        raise Skip(f"cleanlab or scikit-learn is not installed ({exc})") from None
    model = (
        f"mean-pooled embeddings of the pretrained {config.model} encoder (frozen, never "
        "fine-tuned on these labels) + standardised logistic regression (C by inner CV)"
        if features is not None
        else "TF-IDF char 1–4-grams + logistic regression (C by inner CV)" + why
    )
    return (
        values,
        (
            "confident learning: find_label_issues flags first, then 1 − label quality "
            f"(self-confidence) on out-of-sample probabilities of {model}, "
            f"{extra['folds']}-fold cross_val_predict on the training split "
            f"({extra['n_issues']} flagged, CV accuracy {extra['cv_accuracy']:.3f})."
        ),
        extra,
    )


def _shape_aware(inputs: Inputs) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector 3 from the run's tracin.npy and shapes.parquet (or curve fits computed here)."""
    tracin = store.read_npy(inputs.require(store.TRACIN))
    n_test = int((inputs.instances["split"] == "test").sum())
    if tracin.shape != (n_test, len(inputs.train)):
        raise Skip(f"{store.TRACIN} has shape {tracin.shape}, not ({n_test}, {len(inputs.train)})")
    if n_test == 0:
        raise Skip("the run has no test instances")
    analysis = inputs.run / store.ANALYSIS
    rule = ShapeRule.of_analysis(store.read_json(analysis) if analysis.exists() else None)
    shapes_path = inputs.run / store.SHAPES
    columns = set(pd.read_parquet(shapes_path).columns) if shapes_path.exists() else set()
    if "s_bulk" in columns:
        shapes_df = pd.read_parquet(shapes_path, columns=["id", "correct", "s_bulk"])
        s = shapes_df["s_bulk"].to_numpy(np.float64)
        correct = shapes_df["correct"].to_numpy(bool)
        source = store.SHAPES
    else:
        # No current analyze output: classify the curves here with core's rule.
        logits = inputs.logits()
        test = inputs.instances[inputs.instances["split"] == "test"]
        correct = (
            np.asarray(logits[-1][test["id"].to_numpy()]).argmax(1) == test["label"].to_numpy()
        )
        s = np.concatenate(
            [
                np.atleast_1d(bulk_index(np.asarray(tracin[i : i + 256], np.float64), rule.trim))
                for i in range(0, n_test, 256)
            ]
        )
        source = "bulk indices of tracin.npy (no current shapes.parquet)"
    values, extra = shape_aware_scores(tracin, s, correct, rule)
    note = (
        f"for each of {extra['n_test_used']}{' misclassified' if extra['misclassified_only'] else ''} "
        "test instances of tracin.npy, w·(|score − curve median| / row mean − 1) with w = +1 "
        f"(suspects far out: S, bulk S ≥ {rule.s_min}), −1 (suspects near the centre: Z, bulk S ≤ {rule.z_max}), "
        f"linear between; averaged over test instances weighted by |w| ({extra['n_prefer_ends']} "
        f"prefer the ends, {extra['n_prefer_centre']} the centre; shapes from {source}). "
        "Uses the test labels to find misclassified test instances."
    )
    return values, note, extra


def _misclassified_influence(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector 2, cached in detect_work/ so a rerun only rescores."""
    try:
        import core.influence  # noqa: F401  (torch and the TracIn engine)
        import core.learning.training  # noqa: F401  (torch and transformers)
    except ImportError as exc:
        raise Skip(f"the TracIn engine is not available ({exc})") from None
    if not (inputs.run / store.TOKENIZER_DIR).is_dir():
        raise Skip("the run has no tokenizer")
    unit = Retraining(str(inputs.run), cache_key(config, inputs.observed))
    cache = compute_retraining(unit, progress=progress, force=force)
    with np.load(cache, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    values = aggregate_influence(data["matrix"], "abs")
    extra = {
        "n_misclassified": int(len(data["misclassified"])),
        "n_test_in_train": int(len(data["test_in_train"])),
        "test_in_train_accuracy": float(data.get("test_in_train_accuracy", np.nan)),
        "fallback": bool(data["fallback"]),
    }
    note = (
        f"COMPSAC 2024: nested 80/10/10 split of the training data (seed {config.seed}); a model "
        f"trained on train-in-train misclassifies {extra['n_misclassified']} of "
        f"{extra['n_test_in_train']} test-in-train instances; every training instance is scored by "
        "Σ over them of |TracIn| / (that instance's mean |TracIn|) at the train-in-train checkpoints "
        "(observed labels on both sides)."
    )
    return values, note, extra


@dataclass(frozen=True)
class Detector:
    """One detector: everything the detect stage, the review queue and the CLI know of it.

    ``function(inputs, config, force, progress)`` returns (scores in training order, higher
    = more suspicious; a note saying how they were computed; extra info or None), or raises
    ``Skip`` with the reason it cannot run. ``needs`` are run files it reads: when one is
    missing the detector is skipped with that reason, without being called.
    """

    name: str
    reason: str  # one sentence, the 'reason' column of the review queue
    function: Callable[[Inputs, StudyConfig, bool, bool], tuple[np.ndarray, str, Any]]
    needs: tuple[str, ...] = ()


def _shape_aware_detector(
    inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector 3 (its computation, :func:`_shape_aware`, keeps its own signature)."""
    return _shape_aware(inputs)


# The detectors, in the order tables and charts list them. Adding one = one entry here
# (and its function above); the CLI, the app and the tests read this table.
REGISTRY: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "self_influence",
            "high TracIn self-influence: fitting its label took unusually large updates",
            _self_influence,
            (store.SELF_INFLUENCE,),
        ),
        Detector(
            "misclassified_influence",
            "strong TracIn influence on held-out training instances the model gets wrong",
            _misclassified_influence,
            (store.TOKENIZER_DIR,),
        ),
        Detector(
            "shape_aware",
            "sits where flipped labels land in misclassified test instances' influence curves",
            _shape_aware_detector,
            (store.TRACIN,),
        ),
        Detector(
            "loss",
            "high training loss on its label at the final checkpoint",
            _loss,
            (store.LOGITS,),
        ),
        Detector(
            "aum",
            "low margin for its label across training (area under the margin)",
            _aum,
            (store.LOGITS,),
        ),
        Detector(
            "cleanlab",
            "an out-of-sample text classifier disagrees with its label (confident learning)",
            _cleanlab,
        ),
        Detector("random", "random choice (baseline)", _random),
    )
}


DETECTORS: tuple[str, ...] = tuple(REGISTRY)


REASONS: dict[str, str] = {name: d.reason for name, d in REGISTRY.items()}
