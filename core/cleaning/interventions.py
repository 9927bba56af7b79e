"""Cleaning interventions on a detector's top suspects, retrained and compared, and the CSV exports.

An intervention takes the top-k training instances of a detector and

- ``exclude``: drops them from the training set;
- ``relabel``: gives them the other label;
- ``reweight``: scales their loss down by their suspicion. The most suspicious of the k
  gets weight 1/(k+1), the next 2/(k+1), …, the k-th k/(k+1); every other instance
  keeps 1. A rank ramp rather than the raw score, because scores of different
  detectors have no common scale; never 0, so reweighting stays softer than exclusion.

Each intervention is retrained from scratch with :func:`core.learning.training.train_model`
(the run's configuration, seed varied over ``seeds``) and its final test accuracy is
recorded beside three arms trained with the same seed: no change, the oracle
(exactly the true flips, all of them, given the same action; for reweighting its ramp
follows training order, since the oracle has no suspicion to rank by, which keeps it
the same arm for every detector) and a random choice of the same size. Rows go to ``cleaning/results.json``, merged by (detector, action,
k, seed); arms that do not depend on the detector are reused from stored rows.

Exports write CSV files, by default into ``<run>/cleaning/``, and refuse to
overwrite the run's own files or the study's input file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.cleaning.detectors import REASONS, load_scores
from core.execution.executors import LOCAL, ExecutorSpec, Resources, retraining_work, run_tasks
from core.inputs.config import config_from_dict
from core.options import commands
from core.storage import provenance, store
from core.storage.errors import AtlasError

ACTIONS: tuple[str, ...] = ("exclude", "relabel", "reweight")
RESULTS = store.CLEANING_RESULTS
ROW_KEYS = (
    "detector",
    "action",
    "k",
    "seed",
    "test_accuracy",
    "no_change_accuracy",
    "oracle_accuracy",
    "random_accuracy",
    "n_flips_caught",
)


# --------------------------------------------------------------------------- choices and actions


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, most suspicious first (ties: lower position first)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 1 <= k <= len(scores):
        raise AtlasError(
            f"k must lie between 1 and {len(scores)} (the training-set size), got {k}."
        )
    return np.argsort(-scores, kind="stable")[:k]


def oracle_choice(flipped: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Positions of exactly the flipped instances, ordered by ``scores`` (most suspicious first) if given."""
    flips = np.flatnonzero(np.asarray(flipped, dtype=bool))
    if scores is None or len(flips) == 0:
        return flips
    return flips[np.argsort(-np.asarray(scores, dtype=np.float64)[flips], kind="stable")]


def random_choice(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct positions out of n, seeded by (seed, k) so every arm of a seed sees the same draw."""
    if not 1 <= k <= n:
        raise AtlasError(f"k must lie between 1 and {n}, got {k}.")
    return np.random.default_rng([int(seed), int(k), 11]).choice(n, size=k, replace=False)


def reweight_weights(n: int, chosen: np.ndarray) -> np.ndarray:
    """Per-instance loss weights: 1 everywhere, (r+1)/(k+1) for the r-th chosen (0 = most suspicious)."""
    weights = np.ones(n)
    k = len(chosen)
    weights[np.asarray(chosen, dtype=np.int64)] = (np.arange(k) + 1.0) / (k + 1.0)
    return weights


def apply_action(
    texts: Sequence[str], labels: np.ndarray, chosen: np.ndarray, action: str
) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray]:
    """Apply ``action`` to the ``chosen`` positions (most suspicious first).

    Returns ``(texts, labels, weights or None, kept positions)`` of the training set to use.
    """
    _check_action(action)
    labels = np.asarray(labels, dtype=np.int64).copy()
    chosen = np.asarray(chosen, dtype=np.int64)
    n = len(labels)
    if len(np.unique(chosen)) != len(chosen):
        raise AtlasError("The chosen instances contain repeats.")
    keep = np.arange(n)
    weights = None
    if action == "exclude":
        keep = np.setdiff1d(keep, chosen)
    elif action == "relabel":
        labels[chosen] = 1 - labels[chosen]
    else:
        weights = reweight_weights(n, chosen)
    out_weights = None if weights is None else weights[keep]
    return [texts[i] for i in keep], labels[keep], out_weights, keep


# --------------------------------------------------------------------------- retraining


ARMS_DIR = "arms"  # cleaning/arms/<key>.json: one retraining's test accuracy (resumable units)


@dataclass(frozen=True)
class Arm:
    """One retraining of a cleaning comparison: the positions acted on, the action, the seed.

    An independent unit: :func:`compute_arm` trains it anywhere the run folder is reachable
    and stores its test accuracy under ``cleaning/arms/``, keyed by what it trains on (the
    same arm asked for by two detectors is trained once).
    """

    run: str
    kind: str  # "no_change" | "oracle" | "random" | "detector"
    action: str
    seed: int
    chosen: tuple[int, ...]  # training positions acted on, in order (empty: no change)

    @property
    def key(self) -> str:
        """File stem of the arm's result: seed plus a hash of what it trains on."""
        payload = {"action": self.action if self.chosen else None, "chosen": list(self.chosen)}
        digest = hashlib.sha1(json.dumps(payload).encode()).hexdigest()[:16]
        return f"seed-{self.seed}_{digest}"

    def path(self) -> Path:
        """Where the arm's result is stored."""
        return Path(self.run) / store.CLEANING_DIR / ARMS_DIR / f"{self.key}.json"


class _Plan:
    """A validated cleaning request: the run's data and the arms of each seed."""

    def __init__(
        self, run: Path, detector: str, action: str, k: int, seeds: int | Sequence[int]
    ) -> None:
        """Validate the request (raises :class:`AtlasError` before any training)."""
        manifest = store.load_manifest(run)
        _check_action(action)
        config = config_from_dict(manifest.get("config", {}))
        self.seeds = _seed_list(seeds, config.seed)
        instances = store.load_instances(run)
        train = instances[instances["split"] == "train"].reset_index(drop=True)
        if not (instances["split"] == "test").any():
            raise AtlasError(f"{run} has no test instances to measure accuracy on.")
        scores = _scores_in_train_order(run, detector, train)
        k = int(k)
        if not 1 <= k < len(train):
            raise AtlasError(f"--k must lie between 1 and {len(train) - 1}, got {k}.")
        self.run, self.detector, self.action, self.k = run, detector, action, k
        self.flipped = train["flipped"].to_numpy(bool)
        self.n_train = len(train)
        self.chosen = top_k(scores, k)
        self.results = run / store.CLEANING_DIR / RESULTS

    def arms(self, seed: int) -> dict[str, Arm]:
        """The four arms of one seed (the oracle only when there are flips to fix)."""

        def arm(kind: str, chosen: Sequence[int]) -> Arm:
            return Arm(str(self.run), kind, self.action, int(seed), tuple(int(c) for c in chosen))

        out = {"no_change": arm("no_change", ())}
        if self.flipped.any():
            out["oracle"] = arm("oracle", oracle_choice(self.flipped))
        out["random"] = arm("random", random_choice(self.n_train, self.k, seed))
        out["detector"] = arm("detector", self.chosen)
        return out

    def reused(self, seed: int) -> dict[str, float]:
        """Accuracies of detector-independent arms already in results.json (same seed, action, k)."""
        rows = _read_rows(self.results)
        found = {
            "no_change": _reuse(rows, "no_change_accuracy", seed=seed),
            "oracle": _reuse(rows, "oracle_accuracy", seed=seed, action=self.action),
            "random": _reuse(rows, "random_accuracy", seed=seed, action=self.action, k=self.k),
        }
        return {kind: acc for kind, acc in found.items() if acc is not None}


def plan_arms(
    run_dir: str | os.PathLike,
    detector: str,
    action: str,
    k: int,
    seeds: int | Sequence[int] = 3,
) -> list[Arm]:
    """The retrainings a :func:`run_clean` call with these arguments still needs, in order.

    Arms stored under ``cleaning/arms/`` or reusable from ``results.json`` are left out.
    Validates like :func:`run_clean`.
    """
    plan = _Plan(Path(run_dir), detector, action, k, seeds)
    out = []
    for seed in plan.seeds:
        reused = plan.reused(seed)
        out += [
            a for kind, a in plan.arms(seed).items() if kind not in reused and not a.path().exists()
        ]
    return out


class _TrainData:
    """The run's configuration, tokenizer, training texts/labels and test set."""

    def __init__(self, run: Path) -> None:
        """Load them (the tokenizer once per process and run)."""
        from core.learning.models import (
            load_tokenizer,  # transformers: loaded when a tokenizer is needed
        )

        self.config = config_from_dict(store.load_manifest(run).get("config", {}))
        instances = store.load_instances(run)
        train = instances[instances["split"] == "train"].reset_index(drop=True)
        test = instances[instances["split"] == "test"]
        self.tokenizer = load_tokenizer(run)
        self.texts = train["text"].tolist()
        self.observed = train["observed_label"].to_numpy(np.int64)
        self.test_set = (test["text"].tolist(), test["label"].to_numpy(np.int64))


_TRAIN_DATA: dict[str, _TrainData] = {}


def compute_arm(arm: Arm, progress: bool = False) -> float:
    """Train one arm (skipped when its result is stored) and return its final test accuracy.

    The result is written atomically to ``cleaning/arms/<key>.json``, so an arm can run in
    any process, be retried, or be killed and run again.
    """
    path = arm.path()
    if path.exists():
        return float(store.read_json(path)["test_accuracy"])
    from core.learning import training  # looked up at call time (tests count the trainings)

    run = Path(arm.run)
    key = str(run.resolve())
    if key not in _TRAIN_DATA:
        _TRAIN_DATA.clear()
        _TRAIN_DATA[key] = _TrainData(run)
    data = _TRAIN_DATA[key]
    t0 = time.perf_counter()
    if arm.chosen:
        texts, labels, weights, _ = apply_action(
            data.texts, data.observed, np.asarray(arm.chosen, dtype=np.int64), arm.action
        )
    else:
        texts, labels, weights = data.texts, data.observed, None
    result = training.train_model(
        data.config.replace(seed=arm.seed),
        data.tokenizer,
        texts,
        labels,
        weights=weights,
        eval_sets={"test": data.test_set},
        progress=False,
    )
    acc = float(result.history[-1]["test_accuracy"])
    store.write_json(
        path,
        {
            "kind": arm.kind,
            "action": arm.action,
            "seed": arm.seed,
            "n_chosen": len(arm.chosen),
            "test_accuracy": acc,
        },
    )
    _say(
        progress,
        f"clean: {arm.kind} {arm.action} seed {arm.seed}: test accuracy {acc:.4f} "
        f"({time.perf_counter() - t0:.0f} s)",
    )
    return acc


def _arm_name(arm: Arm) -> str:
    return f"{arm.kind}_{arm.action}_{arm.key}"


def _arm_outputs(arm: Arm) -> list[str]:
    return [f"{store.CLEANING_DIR}/{ARMS_DIR}/{arm.key}.json"]


# A retraining as every executor (core.execution.executors) runs it.
WORK = retraining_work("clean", compute_arm, _arm_name, _arm_outputs)
# Declared to Ray for scheduling (an upper estimate for one retraining, not a measurement).
ARM_MEMORY_MB = 4096


def run_clean(
    run_dir: str | os.PathLike,
    detector: str,
    action: str,
    k: int,
    seeds: int | Sequence[int] = 3,
    progress: bool = True,
    executor: ExecutorSpec = LOCAL,
) -> dict[str, Any]:
    """Retrain with the detector's top-k acted on, beside no change, oracle and random, over seeds.

    ``seeds`` is a count (the run's seed, seed+1, …) or explicit training seeds.
    Rows are merged into ``cleaning/results.json`` after every seed, so an
    interrupted call keeps what it finished. Each retraining is an :class:`Arm`
    (:func:`plan_arms` lists them, :func:`compute_arm` runs one); this is that loop in one
    process. Returns this call's rows and their means.

    The arms still needed run first, on ``executor`` (:mod:`core.execution.executors`); each stores
    its accuracy, so the rows below read them back.
    """
    run = Path(run_dir)
    plan = _Plan(run, detector, action, k, seeds)  # reads only
    todo: dict[str, Arm] = {}
    for seed in plan.seeds:
        reused = plan.reused(seed)
        for kind, arm in plan.arms(seed).items():
            if kind not in reused and not arm.path().exists():
                todo.setdefault(arm.key, arm)  # one training for arms that train the same
    if todo:
        # Only retraining needs the checkpoints and tokenizer: a shipped run asked for the
        # arms it ships is answered from its files. Checked before anything is written.
        commands.require_heavy_tier(run, "retraining")
    config = config_from_dict(store.load_manifest(run).get("config", {}))
    run_tasks(
        WORK,
        list(todo.values()),
        executor,
        kwargs={"progress": progress and executor.kind == "local"},
        resources=Resources(1.0, 1.0 if config.device == "cuda" else 0.0, ARM_MEMORY_MB),
        progress=progress and executor.kind != "local",
        folder=run,
    )
    new_rows = []
    for seed in plan.seeds:
        reused = plan.reused(seed)
        acc = {
            kind: reused[kind] if kind in reused else compute_arm(arm, progress)
            for kind, arm in plan.arms(seed).items()
        }
        if "oracle" not in acc:
            acc["oracle"] = acc["no_change"]  # nothing to fix: the oracle leaves the data as it is
        row = {
            "detector": detector,
            "action": action,
            "k": plan.k,
            "seed": int(seed),
            "test_accuracy": acc["detector"],
            "no_change_accuracy": acc["no_change"],
            "oracle_accuracy": acc["oracle"],
            "random_accuracy": acc["random"],
            "n_flips_caught": int(plan.flipped[plan.chosen].sum()),
        }
        new_rows.append(row)
        _merge_rows(plan.results, [row])
    summary = {
        key: float(np.mean([r[key] for r in new_rows]))
        for key in ("test_accuracy", "no_change_accuracy", "oracle_accuracy", "random_accuracy")
    }
    provenance.record_stage_inputs(
        run, "clean", {"detector": detector, "action": action, "k": plan.k, "seeds": plan.seeds}
    )
    return {
        "detector": detector,
        "action": action,
        "k": plan.k,
        "seeds": plan.seeds,
        "n_flips": int(plan.flipped.sum()),
        "n_flips_caught": int(plan.flipped[plan.chosen].sum()),
        "rows": new_rows,
        "mean": summary,
    }


def load_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The stored intervention rows of a run (empty if none)."""
    return _read_rows(Path(run_dir) / store.CLEANING_DIR / RESULTS)


# --------------------------------------------------------------------------- effects

# The reading of an intervention over seeds, written before any multi-seed result was seen:
# it helps (or hurts) only when it beats (or trails) no change on every seed, and even then
# the two-sided sign test says how often that happens by chance; fewer than this many seeds
# is read as "too few seeds to tell", since two coin flips agree half the time.
MIN_SEEDS_TO_READ = 3
REFERENCE_ARMS = (
    ("no change", "no_change_accuracy"),
    ("random", "random_accuracy"),
    ("oracle", "oracle_accuracy"),
)
MEAN_KEYS = tuple(key for _, key in REFERENCE_ARMS)


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided sign test: the chance of a split at least this lopsided if each seed were a coin.

    Ties are dropped (the usual convention); with no untied seed the answer is 1.
    """
    from scipy import stats

    n = better + worse
    if n == 0:
        return 1.0
    return float(stats.binomtest(better, n, 0.5).pvalue)


def intervention_effects(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (detector, action, k): means over its seeds, the paired gain, and a reading.

    Every arm of a seed is trained with the same seed, so the gain is paired: the mean over
    seeds of (detector arm − no change) and of (detector arm − random choice), in accuracy.
    ``seeds_better`` / ``seeds_equal`` / ``seeds_worse`` count seeds against no change,
    ``sign_test_p`` is :func:`sign_test_p` of that split, and ``reading`` is one sentence
    by the rule above (:data:`MIN_SEEDS_TO_READ`).
    """
    columns = [
        "detector", "action", "k", "seeds", "test_accuracy", "no_change_accuracy",
        "oracle_accuracy", "random_accuracy", "gain_vs_no_change", "gain_vs_random",
        "seeds_better", "seeds_equal", "seeds_worse", "sign_test_p", "reading",
    ]  # fmt: skip
    frame = _result_frame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (detector, action, k), g in frame.groupby(["detector", "action", "k"], sort=True):
        gain = (g["test_accuracy"] - g["no_change_accuracy"]).to_numpy(np.float64)
        # Accuracies are fractions of one test set: round away float noise before comparing.
        step = np.round(gain, 9)
        better, worse = int((step > 0).sum()), int((step < 0).sum())
        row = {
            "detector": detector,
            "action": action,
            "k": int(k),
            "seeds": len(g),
            **{key: float(g[key].mean()) for key in ("test_accuracy", *MEAN_KEYS)},
            "gain_vs_no_change": float(gain.mean()),
            "gain_vs_random": float((g["test_accuracy"] - g["random_accuracy"]).mean()),
            "seeds_better": better,
            "seeds_equal": len(g) - better - worse,
            "seeds_worse": worse,
            "sign_test_p": sign_test_p(better, worse),
        }
        row["reading"] = _effect_reading(row)
        out.append(row)
    return pd.DataFrame(out, columns=columns)


def intervention_arms(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long form for a chart: per action and k, each arm's mean, min and max test accuracy.

    ``arm`` is "no change", "random", "oracle" or the detector's name; the three reference
    arms depend only on (action, k, seed), so each seed counts once however many detectors
    share it.
    """
    frame = _result_frame(rows)
    columns = ["action", "k", "arm", "seeds", "mean", "min", "max"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    parts = [
        frame.assign(arm=frame["detector"], accuracy=frame["test_accuracy"])[
            ["action", "k", "seed", "arm", "accuracy"]
        ]
    ]
    for arm, key in REFERENCE_ARMS:
        ref = frame.drop_duplicates(["action", "k", "seed"])
        parts.append(
            ref.assign(arm=arm, accuracy=ref[key])[["action", "k", "seed", "arm", "accuracy"]]
        )
    long = pd.concat(parts, ignore_index=True)
    g = long.groupby(["action", "k", "arm"], sort=False)["accuracy"]
    out = g.agg(seeds="count", mean="mean", min="min", max="max").reset_index()
    return out[columns]


def _result_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """The well-formed rows of results.json as a frame: a hand-edited or damaged row is left out
    rather than breaking the summary of the others."""

    def ok(row: Any) -> bool:
        if not isinstance(row, dict) or not all(key in row for key in ROW_KEYS[:8]):
            return False
        numbers = [row[key] for key in ROW_KEYS[2:8]]
        return (
            isinstance(row["detector"], str)
            and isinstance(row["action"], str)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)
            and all(math.isfinite(v) for v in numbers)
        )

    return pd.DataFrame([row for row in rows if ok(row)], columns=list(ROW_KEYS))


def _effect_reading(row: dict[str, Any]) -> str:
    """One sentence for a row of :func:`intervention_effects`."""
    n, better, worse = row["seeds"], row["seeds_better"], row["seeds_worse"]
    what = f"{row['action'].capitalize()} on the top {row['k']} of {row['detector']}"
    gain = 100 * row["gain_vs_no_change"]
    split = f"better on {better}, equal on {row['seeds_equal']}, worse on {worse} of {n} seed{'s' * (n != 1)}"
    head = (
        f"{what} moved test accuracy by {gain:+.1f} points on average against no change ({split})"
    )
    if n < MIN_SEEDS_TO_READ:
        return f"{head}: too few seeds to tell (the reading needs {MIN_SEEDS_TO_READ})."
    p = row["sign_test_p"]
    if better == n:
        verdict = "it helped on every seed"
    elif worse == n:
        verdict = "it hurt on every seed"
    else:
        return f"{head}: no consistent effect."
    return f"{head}: {verdict}, a split that chance alone gives with p = {p:.2g} (sign test)."


# --------------------------------------------------------------------------- exports


# Columns of the exported review queue CSV, in order (the page shows them with label names).
REVIEW_COLUMNS = ("id", "source_row", "text", "label", "suggested_label", "score", "rank", "reason")


def review_queue(train: pd.DataFrame, scores: np.ndarray, detector: str, top: int) -> pd.DataFrame:
    """A detector's ``top`` suspects, most suspect first: the one review queue of the CLI and app.

    ``train`` holds the training rows of instances.parquet and ``scores`` the detector's
    score of each, in the same order. Columns: :data:`REVIEW_COLUMNS` (``label`` is the
    observed label, ``suggested_label`` the other one), then ``flipped``, the study's known
    answer, which the export leaves out and the page reveals on request.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(train):
        raise AtlasError(f"{len(scores)} scores for {len(train)} training instances.")
    chosen = top_k(scores, top)
    rows = train.iloc[chosen]
    n = len(train)
    why = REASONS.get(detector, f"high {detector.replace('_', ' ')} score")
    observed = rows["observed_label"].to_numpy(np.int64)
    return pd.DataFrame(
        {
            "id": rows["id"].to_numpy(np.int64),
            "source_row": rows["source_row"].to_numpy(np.int64) if "source_row" in rows else -1,
            "text": rows["text"].to_numpy(),
            "label": observed,
            "suggested_label": 1 - observed,
            "score": scores[chosen],
            "rank": np.arange(1, len(chosen) + 1),
            "reason": [
                f"{why} (rank {r} of {n}, top {100 * r / n:.1f} %)"
                for r in range(1, len(chosen) + 1)
            ],
            "flipped": rows["flipped"].to_numpy(bool) if "flipped" in rows else False,
        }
    )


def export_review_queue(
    run_dir: str | os.PathLike,
    detector: str,
    path: str | os.PathLike | None = None,
    top: int | None = None,
) -> Path:
    """Write the detector's :func:`review_queue` as CSV (its :data:`REVIEW_COLUMNS`).

    ``top`` defaults to the number of flips (2.5 % of the training set when there are none).
    Returns the path written (default ``cleaning/review_queue_<detector>.csv``).
    """
    run = Path(run_dir)
    instances = store.load_instances(run)
    train = instances[instances["split"] == "train"].reset_index(drop=True)
    scores = _scores_in_train_order(run, detector, train)
    top = _default_k(train) if top is None else int(top)
    if not 1 <= top <= len(train):
        raise AtlasError(f"--top must lie between 1 and {len(train)}, got {top}.")
    out = _output_path(run, path, f"review_queue_{detector}.csv")
    queue = review_queue(train, scores, detector, top)
    _write_csv(out, queue[list(REVIEW_COLUMNS)])
    return out


def export_cleaned(
    run_dir: str | os.PathLike,
    detector: str,
    action: str,
    k: int | None = None,
    path: str | os.PathLike | None = None,
) -> Path:
    """Write every instance as CSV with the action taken on it and its detector score.

    Columns: id, source_row, split, text, label (the observed label, as in the
    input), new_label (after the action), action (keep / exclude / relabel /
    reweight), weight (the loss weight: 0 for excluded rows), score and rank (the
    detector's, training rows only). To train on the cleaned data, drop the rows
    whose action is 'exclude' and use new_label and weight. ``k`` defaults as
    ``top`` does in :func:`export_review_queue`. Returns the path written.
    """
    _check_action(action)
    run = Path(run_dir)
    instances = store.load_instances(run)
    train_mask = (instances["split"] == "train").to_numpy()
    train = instances[train_mask].reset_index(drop=True)
    scores = _scores_in_train_order(run, detector, train)
    k = _default_k(train) if k is None else int(k)
    out = _output_path(run, path, f"cleaned_{detector}_{action}.csv")
    chosen = top_k(scores, k)
    n = len(train)
    train_action = np.full(n, "keep", dtype=object)
    train_action[chosen] = action
    new_label = train["observed_label"].to_numpy(np.int64).copy()
    weight = np.ones(n)
    if action == "relabel":
        new_label[chosen] = 1 - new_label[chosen]
    elif action == "exclude":
        weight[chosen] = 0.0
    else:
        weight = reweight_weights(n, chosen)
    ranks = np.empty(n)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, n + 1)

    table = pd.DataFrame(
        {
            "id": instances["id"].to_numpy(np.int64),
            "source_row": instances["source_row"].to_numpy(np.int64)
            if "source_row" in instances
            else -1,
            "split": instances["split"].to_numpy(),
            "text": instances["text"].to_numpy(),
            "label": instances["observed_label"].to_numpy(np.int64),
        }
    )
    table["new_label"] = table["label"].to_numpy()
    table["action"] = "keep"
    table["weight"] = 1.0
    table["score"] = np.nan
    table["rank"] = pd.array([pd.NA] * len(table), dtype="Int64")
    idx = np.flatnonzero(train_mask)
    table.loc[idx, "new_label"] = new_label
    table.loc[idx, "action"] = train_action
    table.loc[idx, "weight"] = weight
    table.loc[idx, "score"] = scores
    table.loc[idx, "rank"] = ranks.astype(np.int64)
    _write_csv(out, table)
    return out


# --------------------------------------------------------------------------- helpers


def _scores_in_train_order(run: Path, detector: str, train: pd.DataFrame) -> np.ndarray:
    """The detector's scores aligned with the training rows of instances.parquet."""
    table = load_scores(run, detector)
    ids = train["id"].to_numpy(np.int64)
    if len(table) != len(ids) or not (table["id"].to_numpy() == ids).all():
        raise AtlasError(
            f"{run / store.DETECTORS} does not match the run's training instances; rerun detect with --force."
        )
    return table["score"].to_numpy(np.float64)


def _default_k(train: pd.DataFrame) -> int:
    """The number of flips, or 2.5 % of the training set (at least 1) when nothing is flipped."""
    k = int(train["flipped"].sum()) if "flipped" in train else 0
    return k if k > 0 else max(1, math.ceil(0.025 * len(train)))


def _output_path(run: Path, path: str | os.PathLike | None, default_name: str) -> Path:
    """Where an export goes; never onto the run's own files or the study's input file."""
    if path is None:
        return run / store.CLEANING_DIR / default_name
    out = Path(path)
    resolved = out.resolve()
    run_resolved = run.resolve()
    protected = {(run_resolved / name).resolve() for name in (store.INSTANCES, store.MANIFEST)}
    try:
        manifest = store.load_manifest(run)
    except AtlasError:
        manifest = {}
    for candidate in (
        manifest.get("config", {}).get("data_file"),
        manifest.get("data", {}).get("source"),
    ):
        if candidate:
            protected.add(Path(candidate).resolve())
    inside_run = run_resolved in resolved.parents
    inside_cleaning = (run_resolved / store.CLEANING_DIR) in resolved.parents
    if resolved in protected or (inside_run and not inside_cleaning):
        raise AtlasError(
            f"Refusing to write {out}: exports never overwrite the input or the run's own files "
            f"(inside the run, write under {store.CLEANING_DIR}/)."
        )
    if out.is_dir():
        raise AtlasError(f"{out} is a folder; give a file name for the CSV.")
    return out


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically (UTF-8 with BOM, so Excel shows Japanese text correctly)."""
    with store.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, encoding="utf-8-sig")


def _check_action(action: str) -> None:
    """Raise :class:`AtlasError` unless ``action`` is one of ACTIONS."""
    if action not in ACTIONS:
        raise AtlasError(f"Unknown action '{action}'; choose one of: {', '.join(ACTIONS)}.")


def _seed_list(seeds: int | Sequence[int], base: int) -> list[int]:
    """Training seeds from a count (base, base+1, …) or an explicit list."""
    if isinstance(seeds, int | np.integer):
        if seeds < 1:
            raise AtlasError(f"--seeds must be at least 1, got {seeds}.")
        return [int(base) + i for i in range(int(seeds))]
    out = [int(s) for s in seeds]
    if not out:
        raise AtlasError("Give at least one training seed.")
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of results.json, or [] when it does not exist yet."""
    if not path.exists():
        return []
    data = store.read_json(path)
    return list(data.get("rows", [])) if isinstance(data, dict) else []


def _reuse(rows: list[dict[str, Any]], key: str, **match: Any) -> float | None:
    """A stored accuracy of an arm that does not depend on the detector (same seed, action, k)."""
    for row in rows:
        if (
            all(row.get(name) == value for name, value in match.items())
            and row.get(key) is not None
        ):
            return float(row[key])
    return None


def _merge_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace rows with the same (detector, action, k, seed) and write results.json atomically."""
    existing = _read_rows(path)
    key = lambda r: (r["detector"], r["action"], int(r["k"]), int(r["seed"]))  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in existing if key(r) not in new_keys] + rows
    merged.sort(key=key)
    store.write_json(path, {"rows": merged})


def _say(progress: bool, message: str) -> None:
    """A progress line on stderr."""
    if progress:
        print(message, file=sys.stderr, flush=True)
