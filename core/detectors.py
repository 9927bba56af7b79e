"""Suspicion rankings of training instances, and the detect stage that scores them against the flips.

Every detector gives each training instance one float, higher = more suspicious,
computed without looking at the flipped mask (the mask only scores the ranking
afterwards, in :mod:`core.metrics`). The detect stage writes
``detectors.parquet`` (``id`` + one column per detector) and ``detection.json``
(metrics per detector beside the random baseline, and a note on how each was
computed), then marks the stage ``detect`` complete.

Detectors (names are the run-store contract):

``self_influence``
    TracIn self-influence Σ_i η_i ‖∇ℓ(w_i, z)‖² with the observed label
    (Pruthi et al.): a wrong label keeps the gradient large for longer.
``misclassified_influence``
    The COMPSAC 2024 method (Yamaguchi, Hirabayashi and Tamekuri; paper §II.C):
    split the training data again into train-in-train / val-in-train /
    test-in-train (80/10/10, stratified on the observed label, seeded), fine-tune
    a fresh model on train-in-train with the run's own configuration, find the
    test-in-train instances it misclassifies (prediction ≠ observed label), and
    rank *every* training instance by its TracIn influence on them, each instance's
    gradients taken at the train-in-train checkpoints with its observed label.
    Aggregation: see :func:`aggregate_influence`.
``shape_aware``
    The study's own idea (paper §III, §V.D): in the run's TracIn matrix, flipped
    instances sit at the ends of S-shaped sorted curves and near the centre of
    Z-shaped ones. For each misclassified test instance the detector takes suspects
    from where its shape says they are: far from the curve's centre value for an S,
    close to it for a Z, weighted by how clear the shape is. See
    :func:`shape_aware_scores`.
``loss``
    Cross-entropy on the observed label at the final checkpoint (``logits.npy``).
``aum``
    Area under the margin (Pleiss et al. 2020) over the saved checkpoints:
    the mean of logit[observed] − logit[other]; negated, since a low margin is suspicious.
``cleanlab``
    Confident learning (Northcutt et al.) on out-of-sample probabilities from a
    cheap, honest model: logistic regression, 5-fold stratified
    ``cross_val_predict`` on the training split with observed labels. Its features
    are the frozen *pretrained* encoder's mean-pooled embeddings when the run's
    model is pretrained (a fair opponent for detectors that see a fine-tuned
    encoder), else TF-IDF character 1–4-grams (no word splitter needed, so
    Japanese works too). The
    score is ``is_issue + (1 − label_quality)``: the instances
    ``cleanlab.filter.find_label_issues`` flags come first, each group ordered by
    ``cleanlab.rank.get_label_quality_scores`` (self-confidence).
``random``
    Uniform random scores from the run's seed: the baseline made concrete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import metrics, provenance, store
from core.config import StudyConfig, config_from_dict
from core.errors import AtlasError
from core.executors import LOCAL, ExecutorSpec, Resources, Work, run_tasks
from core.shapes import DEFAULT_RULE, ShapeRule, bulk_index

STAGE = "detect"
WORK_DIR = "detect_work"  # train-in-train checkpoints and the influence matrix of detector 2
INFLUENCE_CACHE = "misclassified_influence.npz"

# Nested split of the COMPSAC method: train-in-train / val-in-train / test-in-train.
NESTED_FRACTIONS = (0.8, 0.1, 0.1)


# --------------------------------------------------------------------------- cheap detectors


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
    import torch

    from core.models import build_model, encode, length_batches, load_tokenizer, resolve_device

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


# --------------------------------------------------------------------------- shape-aware


def rank_positions(rows: np.ndarray) -> np.ndarray:
    """Distance of every entry from the centre of its row's descending order: 0 centre, 1 either end.

    The same measure as the end ratio (docs/shapes.md), per entry and in [0, 1].
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    n = rows.shape[1]
    order = np.argsort(-rows, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[None, :].repeat(len(rows), 0), axis=1)
    centre = (n - 1) / 2.0
    return np.abs(ranks - centre) / centre if centre > 0 else np.zeros_like(rows)


def shape_preference(s: np.ndarray, rule: ShapeRule = DEFAULT_RULE) -> np.ndarray:
    """Where to look for flips in each curve: +1 at the ends (S), −1 at the centre (Z), linear between.

    ``s`` is the bulk S-shapedness (core.shapes.bulk_index); the ramp runs from the rule's
    ``z_max`` to its ``s_min``, so a clear S or Z gets full weight and an ambiguous
    backslash little.
    """
    s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=rule.middle)
    half = (rule.s_min - rule.z_max) / 2.0
    return np.clip((s - rule.middle) / half, -1.0, 1.0)


def centre_distances(rows: np.ndarray) -> np.ndarray:
    """Distance of every score from its curve's centre value (the median), in units of the row's mean.

    Each row of the result averages 1, so rows of different scales count alike. This
    reads the paper's "ends" and "centre" in score terms (large vs small deviation),
    which keeps how far out an instance lies; :func:`rank_positions` is the rank form.
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    dev = np.abs(rows - np.median(rows, axis=1, keepdims=True))
    scale = dev.mean(axis=1, keepdims=True)
    return dev / np.where(scale > 0, scale, 1.0)


def shape_aware_scores(
    tracin: np.ndarray,
    s: np.ndarray,
    correct: np.ndarray,
    rule: ShapeRule = DEFAULT_RULE,
    preference: np.ndarray | float | None = None,
    position: str = "value",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Suspicion from where each misclassified test instance's curve shape says flips sit.

    Rows of ``tracin`` are test instances; only misclassified ones are used (all of
    them if the model got every one right). For row j and training instance i,
    u_ij is i's distance from the centre of j's curve: with ``position='value'``
    (default) ``|T_ij − median_j|`` over its row mean (:func:`centre_distances`,
    mean 1), with ``'rank'`` the rank distance of the end ratio mapped to [0, 1]
    and centred at ½. With preference w_j (+1 ends, −1 centre, from
    :func:`shape_preference`) the contribution is w_j·(u_ij − mean): positive far out
    on an S, near the middle of a Z; the score is Σ_j w_j·(u_ij − mean) / Σ_j |w_j|.
    ``preference`` overrides w (the benchmark's shape-blind ablations use ±1).
    """
    if position not in ("value", "rank"):
        raise AtlasError(f"Unknown position measure '{position}'; choose value or rank.")
    tracin = np.asarray(tracin)
    correct = np.asarray(correct, dtype=bool)
    use = ~correct if (~correct).any() else np.ones_like(correct)
    w = shape_preference(s, rule) if preference is None else np.asarray(preference, float)
    w = np.broadcast_to(w, correct.shape)[use]
    rows = np.flatnonzero(use)
    total = np.zeros(tracin.shape[1])
    for start in range(0, len(rows), 64):  # blocks keep the work arrays small for big runs
        block = np.asarray(tracin[rows[start : start + 64]], dtype=np.float64)
        # Centred so that a row adds nothing on average: only where in the curve counts.
        centred = centre_distances(block) - 1.0 if position == "value" else None
        u = centred if centred is not None else rank_positions(block) - 0.5
        total += w[start : start + 64] @ u
    weight = np.abs(w).sum()
    info = {
        "n_test_used": int(len(rows)),
        "misclassified_only": bool((~correct).any()),
        "n_prefer_ends": int((w > 0).sum()),
        "n_prefer_centre": int((w < 0).sum()),
        "position": position,
    }
    return (total / weight if weight > 0 else total), info


# --------------------------------------------------------------------------- misclassified influence


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
    import torch

    from core.factorized import engine_for
    from core.models import encode, load_classifier, load_tokenizer, resolve_device
    from core.training import train_model

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


# --------------------------------------------------------------------------- the detect stage


def run_detect(
    run_dir: str | os.PathLike,
    detectors: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    executor: ExecutorSpec = LOCAL,
) -> dict[str, Any]:
    """Compute the detectors (all available, or ``detectors``), score them and store the results.

    Detector 2's retraining (the one heavy unit) runs on ``executor`` (:mod:`core.executors`)
    when it is not the local one; the other detectors are quick and run here.

    Without ``force`` only detectors not yet stored are computed and the stored
    columns are kept, so a rerun after a missing input has appeared fills the gap
    and a complete stage returns at once. ``force`` recomputes the requested
    detectors (all: detector 2's train-in-train model too). Detectors whose inputs
    are missing are skipped, with the reason in the notes. Returns the content of
    ``detection.json``.
    """
    run = Path(run_dir)
    manifest = store.load_manifest(run)
    wanted = _check_names(detectors)
    instances = store.load_instances(run)
    train = instances[instances["split"] == "train"].reset_index(drop=True)
    if len(train) < 2:
        raise AtlasError(
            f"{run} has {len(train)} training instances; detection needs at least two."
        )
    table = pd.DataFrame({"id": train["id"].to_numpy(np.int64)})
    old = pd.read_parquet(run / store.DETECTORS) if (run / store.DETECTORS).exists() else None
    old_json = store.read_json(run / store.DETECTION) if (run / store.DETECTION).exists() else {}
    stored = [c for c in DETECTORS if _same_rows(old, table) and c in old.columns]
    # Inputs changed since the stage ran (tracin.npy rewritten, ...): stored columns are stale.
    stale = store.stage_done(run, STAGE) and provenance.stale_reason(run, STAGE) is not None
    todo = wanted if force or stale else [name for name in wanted if name not in stored]
    if not todo and old_json and store.stage_done(run, STAGE):
        return old_json
    if force and detectors is None:
        shutil.rmtree(run / WORK_DIR, ignore_errors=True)

    t0 = time.perf_counter()
    config = config_from_dict(manifest.get("config", {}))
    inputs = _Inputs(run, instances, train)
    scores: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    info: dict[str, Any] = dict(old_json.get("info", {}))
    timings: dict[str, float] = {}
    remote = _retrain_elsewhere(run, todo, executor, config, force, progress)
    for name in todo:
        t = time.perf_counter()
        _say(progress, f"detect: {name}")
        try:
            again = force and not (remote and name == "misclassified_influence")
            values, note, extra = _compute(name, inputs, config, again, progress)
        except _Skip as skip:
            notes[name] = f"skipped: {skip}"
            _say(progress, f"detect: {name} skipped ({skip})")
            continue
        scores[name] = np.asarray(values, dtype=np.float64)
        notes[name] = note
        info.pop(name, None)
        if extra:
            info[name] = extra
        timings[name] = round(time.perf_counter() - t, 3)

    for name in DETECTORS:
        if name in scores:
            table[name] = scores[name]
        elif name in stored:
            # Not recomputed this time: keep the stored column and its note.
            table[name] = old[name].to_numpy(np.float64)
            notes[name] = old_json.get("notes", {}).get(name, "")
        elif name not in notes and str(old_json.get("notes", {}).get(name, "")).startswith(
            "skipped"
        ):
            notes[name] = old_json["notes"][name]  # still missing: keep saying why
    result = detection_summary(table, train["flipped"].to_numpy(bool), notes)
    result["info"] = info
    store.write_parquet(run / store.DETECTORS, table)
    store.write_json(run / store.DETECTION, result)
    seconds = time.perf_counter() - t0
    store.mark_stage(
        run,
        STAGE,
        store.STATUS_COMPLETE,
        seconds,
        detectors=[c for c in table.columns if c != "id"],
        skipped={k: v for k, v in notes.items() if v.startswith("skipped")},
        timings_s=timings,
    )
    return result


def detection_summary(
    table: pd.DataFrame, flipped: np.ndarray, notes: dict[str, str]
) -> dict[str, Any]:
    """detection.json's content for a detectors table and the flipped mask (train order)."""
    flipped = np.asarray(flipped, dtype=bool)
    n, k = len(flipped), int(flipped.sum())
    out: dict[str, Any] = {
        "k": k,
        "n_train": n,
        "flip_rate": k / n if n else 0.0,
        "fractions": list(metrics.FRACTIONS),
        "detectors": {},
        "random": None,
        "notes": dict(notes),
    }
    if 0 < k < n:
        out["random"] = metrics.random_baseline(n, k)
        for name in DETECTORS:
            if name in table.columns:
                out["detectors"][name] = metrics.detection_metrics(table[name].to_numpy(), flipped)
    else:
        out["notes"]["metrics"] = (
            "no metrics: the run has no flipped training instances to score against"
            if k == 0
            else "no metrics: every training instance is flipped"
        )
    return out


def detection_table(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per detector (then the random baseline) for ``show --json`` and the app."""
    run = Path(run_dir)
    data = store.read_json(run / store.DETECTION)
    rows = []
    for name, values in data.get("detectors", {}).items():
        rows.append({"detector": name, **values, "note": data.get("notes", {}).get(name, "")})
    for name, note in data.get("notes", {}).items():
        if name in DETECTORS and name not in data.get("detectors", {}):
            rows.append({"detector": name, "note": note})
    if data.get("random"):
        rows.append({"detector": "random_baseline", **data["random"], "note": "expected value"})
    return rows


def load_scores(run_dir: str | os.PathLike, detector: str) -> pd.DataFrame:
    """Return ``id`` and ``score`` of one detector (train order), or raise :class:`AtlasError`."""
    run = Path(run_dir)
    path = run / store.DETECTORS
    if detector not in DETECTORS:
        raise AtlasError(f"Unknown detector '{detector}'; choose one of: {', '.join(DETECTORS)}.")
    if not path.exists():
        raise AtlasError(
            f"{run} has no detector scores yet; run `python -m core detect {run}` first."
        )
    table = pd.read_parquet(path)
    if detector not in table.columns:
        raise AtlasError(
            f"The detector '{detector}' was not computed for {run} "
            f"(available: {', '.join(c for c in table.columns if c != 'id')})."
        )
    return pd.DataFrame({"id": table["id"].to_numpy(np.int64), "score": table[detector].to_numpy()})


# --------------------------------------------------------------------------- helpers


class _Skip(Exception):
    """A detector's inputs are missing; the message says which."""


class _Inputs:
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
            raise _Skip(f"{name} is missing")
        return path

    def logits(self) -> np.ndarray:
        """``logits.npy`` (n_epochs, n_instances, 2), checked against instances.parquet."""
        logits = store.read_npy(self.require(store.LOGITS))
        if logits.ndim != 3 or logits.shape[1] != len(self.instances):
            raise _Skip(
                f"{store.LOGITS} has shape {logits.shape}, not (epochs, {len(self.instances)}, 2)"
            )
        return logits


def _compute(
    name: str, inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any] | None]:
    """Return (scores in train order, note, extra info) of one detector, or raise _Skip."""
    detector = REGISTRY[name]
    for needed in detector.needs:
        inputs.require(needed)
    return detector.function(inputs, config, force, progress)


def _self_influence(
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Detector: TracIn self-influence from the tracin stage."""
    n = len(inputs.train)
    values = np.asarray(store.read_npy(inputs.require(store.SELF_INFLUENCE)), dtype=np.float64)
    if values.shape != (n,):
        raise _Skip(f"{store.SELF_INFLUENCE} has shape {values.shape}, not ({n},)")
    return (
        values,
        "TracIn self-influence Σ η_i‖∇ℓ(w_i, z)‖² with the observed label (tracin stage).",
        None,
    )


def _loss(
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
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
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
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
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, None]:
    """Baseline: uniform random scores."""
    n = len(inputs.train)
    return random_scores(n, config.seed), f"uniform random scores (seed {config.seed}).", None


def _cleanlab(
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
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
        raise _Skip(f"cleanlab or scikit-learn is not installed ({exc})") from None
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


def _shape_aware(inputs: _Inputs) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector 3 from the run's tracin.npy and shapes.parquet (or curve fits computed here)."""
    tracin = store.read_npy(inputs.require(store.TRACIN))
    n_test = int((inputs.instances["split"] == "test").sum())
    if tracin.shape != (n_test, len(inputs.train)):
        raise _Skip(f"{store.TRACIN} has shape {tracin.shape}, not ({n_test}, {len(inputs.train)})")
    if n_test == 0:
        raise _Skip("the run has no test instances")
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
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Detector 2, cached in detect_work/ so a rerun only rescores."""
    try:
        import core.tracin  # noqa: F401  (torch and the TracIn engine)
        import core.training  # noqa: F401
    except ImportError as exc:
        raise _Skip(f"the TracIn engine is not available ({exc})") from None
    if not (inputs.run / store.TOKENIZER_DIR).is_dir():
        raise _Skip("the run has no tokenizer")
    unit = Retraining(str(inputs.run), _cache_key(config, inputs))
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


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Detector:
    """One detector: everything the detect stage, the review queue and the CLI know of it.

    ``function(inputs, config, force, progress)`` returns (scores in training order, higher
    = more suspicious; a note saying how they were computed; extra info or None), or raises
    ``_Skip`` with the reason it cannot run. ``needs`` are run files it reads: when one is
    missing the detector is skipped with that reason, without being called.
    """

    name: str
    reason: str  # one sentence, the 'reason' column of the review queue
    function: Callable[[_Inputs, StudyConfig, bool, bool], tuple[np.ndarray, str, Any]]
    needs: tuple[str, ...] = ()


def _shape_aware_detector(
    inputs: _Inputs, config: StudyConfig, force: bool, progress: bool
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
    instances = store.load_instances(run)
    train = instances[instances["split"] == "train"].reset_index(drop=True)
    unit = Retraining(str(run), _cache_key(config, _Inputs(run, instances, train)))
    return [] if _cached_key(run / WORK_DIR / INFLUENCE_CACHE) == unit.key else [unit]


def compute_retraining(unit: Retraining, progress: bool = False, force: bool = False) -> Path:
    """Run one retraining (skipped when its result is cached, unless ``force``); the cache path."""
    run = Path(unit.run)
    cache = run / WORK_DIR / INFLUENCE_CACHE
    if not force and _cached_key(cache) == unit.key:
        return cache
    config = config_from_dict(store.load_manifest(run).get("config", {}))
    instances = store.load_instances(run)
    train = instances[instances["split"] == "train"].reset_index(drop=True)
    data = misclassified_influence_matrix(
        run,
        config,
        train["text"].tolist(),
        train["observed_label"].to_numpy(np.int64),
        progress,
    )
    payload = {k: np.asarray(v) for k, v in data.items() if v is not None}
    payload["key"] = np.asarray(unit.key)
    with store.atomic_path(cache) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **payload)
    return cache


def _retrain_elsewhere(
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
        instances = store.load_instances(run)
        train = instances[instances["split"] == "train"].reset_index(drop=True)
        units = [Retraining(str(run), _cache_key(config, _Inputs(run, instances, train)))]
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


def _retraining_root(unit: Retraining) -> str:
    return unit.run


def _retraining_retarget(unit: Retraining, run: str) -> Retraining:
    return dataclasses.replace(unit, run=run)


def _retraining_inputs(unit: Retraining) -> list[str]:
    return [store.MANIFEST, store.INSTANCES, store.TOKENIZER_DIR]


def _retraining_outputs(unit: Retraining) -> list[str]:
    return [f"{WORK_DIR}/{INFLUENCE_CACHE}"]


def _compute_retraining(unit: Retraining, force: bool = False) -> None:
    """:func:`compute_retraining` as an executor runs it (quiet; the path stays in the worker)."""
    compute_retraining(unit, progress=False, force=force)


# Detector 2's retraining as every executor (core.executors) runs it.
WORK = Work(
    stage="detect",
    compute=_compute_retraining,
    name=_retraining_name,
    root=_retraining_root,
    retarget=_retraining_retarget,
    inputs=_retraining_inputs,
    outputs=_retraining_outputs,
    overwrite=True,
)
# Declared to Ray for scheduling (an upper estimate, not a measurement).
RETRAIN_MEMORY_MB = 4096


def _cache_key(config: StudyConfig, inputs: _Inputs) -> str:
    """What detector 2's cached matrix depends on: the config and the training labels."""
    import hashlib
    import json

    payload = {
        "config": {k: v for k, v in config.to_dict().items() if k != "device"},
        "labels": inputs.observed.tolist(),
        "fractions": NESTED_FRACTIONS,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _same_rows(old: pd.DataFrame | None, table: pd.DataFrame) -> bool:
    """Whether a stored detectors table covers the same training ids in the same order."""
    return (
        old is not None
        and len(old) == len(table)
        and bool((old["id"].to_numpy() == table["id"].to_numpy()).all())
    )


def _check_names(detectors: Sequence[str] | None) -> list[str]:
    """The detectors to compute, in canonical order; unknown names raise :class:`AtlasError`."""
    if not detectors:
        return list(DETECTORS)
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise AtlasError(f"Unknown detector '{unknown[0]}'; choose from: {', '.join(DETECTORS)}.")
    return [d for d in DETECTORS if d in detectors]


def _say(progress: bool, message: str) -> None:
    """A progress line on stderr."""
    if progress:
        print(message, file=sys.stderr, flush=True)
