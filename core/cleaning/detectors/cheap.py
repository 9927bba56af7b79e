"""The cheap detectors: loss, area under the margin, confident learning and the random baseline.

Each reads what the run already holds (its logits, its texts) and ranks every training
instance in seconds; none retrains a model or computes gradients.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.inputs.config import StudyConfig
from core.storage.errors import AtlasError


def loss_scores(final_logits: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Cross-entropy of each instance's observed label under ``final_logits`` (n, 2)."""
    z = np.asarray(final_logits, dtype=np.float64)
    y = np.asarray(observed, dtype=np.int64)
    top = z.max(axis=1)
    logsumexp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return logsumexp - z[np.arange(len(y)), y]


def aum_scores(logits: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Negated area under the margin: −mean over checkpoints of logit[observed] − max other logit.

    ``logits`` is (n_epochs, n, n_classes) for the instances scored.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(observed, dtype=np.int64)
    rows = np.arange(z.shape[1])
    assigned = z[:, rows, y]
    other = z.copy()
    other[:, rows, y] = -np.inf
    return -(assigned - other.max(axis=2)).mean(axis=0)


def random_scores(n: int, seed: int) -> np.ndarray:
    """Uniform random suspicion scores from their own stream of ``seed``."""
    return np.random.default_rng([int(seed), 7]).random(n)


def cleanlab_scores(
    texts: Sequence[str],
    observed: np.ndarray,
    seed: int,
    n_folds: int = 5,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Confident-learning suspicion from out-of-sample logistic-regression probabilities.

    The classifier sees ``features`` (e.g. frozen pretrained sentence embeddings) when
    given, else TF-IDF character 1–4-grams of ``texts``. Returns ``(scores, info)``
    where info counts the flagged issues and folds.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(observed, dtype=np.int64)
    smallest = int(np.bincount(y, minlength=2).min())
    folds = min(n_folds, smallest)
    if folds < 2:
        raise AtlasError("cleanlab needs at least two training instances of each observed label.")
    # Every fitted step sits inside the pipeline, so each fold's vocabulary, idf, scaling
    # and regularisation strength (chosen by inner 3-fold log loss on observed labels)
    # come from its own training part only: the probabilities are out of sample.
    classifier = LogisticRegressionCV(
        Cs=[0.001, 0.01, 0.1, 1.0, 10.0], cv=3, scoring="neg_log_loss", max_iter=3000
    )
    if features is None:
        model = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=2, sublinear_tf=True),
            classifier,
        )
        x: Any = list(texts)
    else:
        model = make_pipeline(StandardScaler(), classifier)
        x = np.asarray(features, dtype=np.float64)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        # scikit-learn 1.9 announces a change of LogisticRegressionCV's fitted attributes,
        # which this code never reads.
        warnings.simplefilter("ignore", FutureWarning)
        probs = cross_val_predict(model, x, y, cv=cv, method="predict_proba")
    issues = find_label_issues(labels=y, pred_probs=probs, n_jobs=1)
    quality = get_label_quality_scores(labels=y, pred_probs=probs)
    info = {
        "folds": folds,
        "features": "tfidf" if features is None else "pretrained",
        "n_issues": int(issues.sum()),
        "cv_accuracy": float((probs.argmax(1) == y).mean()),
    }
    return issues.astype(np.float64) + (1.0 - quality), info


def pretrained_features(
    run_dir: str | os.PathLike, config: StudyConfig, texts: Sequence[str]
) -> np.ndarray | None:
    """Mean-pooled last hidden states of the run's *pretrained* encoder (before fine-tuning).

    None for models trained from scratch ('tiny'), which have no label-free encoder.
    The weights never saw a label of this data, so a classifier on these features
    cross-validated on the training split stays out of sample.
    """
    if config.model == "tiny":
        return None
    import torch  # torch and transformers: loaded when a detector computes

    from core.learning.models import (
        build_model,
        encode,
        length_batches,
        load_tokenizer,
        resolve_device,
    )

    tokenizer = load_tokenizer(run_dir)
    device = resolve_device(config.device)
    encoder = build_model(config.model, tokenizer, config.max_length, config.seed).base_model
    encoder.to(device).eval()
    texts = list(texts)
    lengths = [len(t) for t in texts]
    out: np.ndarray | None = None
    with torch.no_grad():
        for batch in length_batches(lengths, 64):
            enc = encode(tokenizer, [texts[i] for i in batch], config.max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[batch] = pooled
    return out
