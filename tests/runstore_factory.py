"""The tests' one builder of runs: a small, internally consistent fake run store.

The app's tests need a run that looks exactly like what the pipeline writes
(docs/run-store.md) without training anything: :func:`make_run`, :func:`make_store` and the
rest are built with NumPy and pandas only. The engine, detector and cleaning tests need real
model files too: :func:`make_model_run` and :func:`make_checkpoint_run` add a tokenizer and tiny
BERT checkpoints (transformers is imported inside them). Scores are synthetic curves of
known shape (S, Z, backslash) with the flipped instances placed where the paper
finds them, so shape classes, end ratios and detector metrics are meaningful.
Everything is written with the atomic helpers of ``core.storage.store``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis import analyze as analysis
from core.analysis.metrics import FRACTIONS
from core.analysis.shapes import S_MIN, TRIM, Z_MAX
from core.cleaning.detectors import DETECTORS
from core.inputs.config import PRESETS, StudyConfig
from core.storage import store

SHAPE_CYCLE = ("S", "Z", "backslash")
# One source of truth for names and thresholds: the pure-NumPy core modules the app reads too.
DETECTOR_NAMES = DETECTORS
ALL_STAGES = ("data", "train", "tracin", "analyze", "detect")

_WORDS_POS = ["great", "lovely", "works well", "excellent", "とても良い", "happy with it"]
_WORDS_NEG = ["broken", "awful", "stopped working", "poor", "最悪です", "waste of money"]


def make_run(
    cache: str | Path,
    name: str = "tiny",
    *,
    n_train: int = 120,
    n_val: int = 15,
    n_test: int = 18,
    n_flips: int = 6,
    epochs: int = 3,
    hidden: int = 8,
    seed: int = 0,
    stages: Sequence[str] = ALL_STAGES,
    cleaning: bool = True,
    created: str | None = None,
    status: str = store.STATUS_COMPLETE,
    outliers: float | None = None,
) -> Path:
    """Write a fake run to ``cache/name`` and return its folder.

    ``stages`` chooses which stage outputs exist (e.g. ``("data", "train")`` for a
    run that has not reached TracIn yet); the manifest records the same. ``outliers`` gives
    every test row three clean training instances scored ``-outliers`` times the row's largest
    score (a few scores dwarfing the rest, as on the Japanese demo).
    """
    rng = np.random.default_rng(seed)
    run = Path(cache) / name
    run.mkdir(parents=True, exist_ok=True)
    n = n_train + n_val + n_test
    inst = _instances(rng, n_train, n_val, n_test, n_flips)
    store.write_parquet(run / store.INSTANCES, inst)
    train = inst[inst.split == "train"]
    test = inst[inst.split == "test"]
    flipped = train.flipped.to_numpy()

    # Final-epoch correctness: about a third of the test set misclassified.
    wrong = np.zeros(n_test, dtype=bool)
    wrong[rng.choice(n_test, size=max(3, n_test // 3), replace=False)] = True
    logits = _logits(rng, inst, wrong, epochs)
    epoch_rows = _epoch_rows(logits, inst, epochs)

    manifest: dict[str, Any] = {
        "kind": "run",
        "name": name,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": f"python -m core run --preset quick --name {name} --n-train {n_train}",
        "status": status,
        "config": PRESETS["quick"].replace(n_train=n_train, epochs=epochs, seed=seed).to_dict(),
        "versions": {"python": "3.11", "torch": "fake", "transformers": "fake"},
        "data": {
            "source": "amazon-reviews",
            "n_source_rows": n + 40,
            "n_kept": n,
            "dropped": {"|rating| < 0.5": 40},
            "label_names": ["negative", "positive"],
            "label_mapping": {"negative": 0, "positive": 1},
        },
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_flipped": int(flipped.sum()),
        "epochs": epoch_rows if "train" in stages else [],
        "checkpoints": [
            {"epoch": e + 1, "path": f"checkpoints/epoch-{e + 1:02d}", "lr": 1e-3}
            for e in range(epochs)
        ]
        if "train" in stages
        else [],
        "test_accuracy": epoch_rows[-1]["test_accuracy"] if "train" in stages else None,
        "stages": {s: {"status": "complete"} for s in stages},
        "timings_s": {s: 1.0 for s in stages},
        "tracin": {"params": "all", "project": None, "seed": 0, "n_params": 12345},
    }
    if "train" in stages:
        store.write_npy(run / store.LOGITS, logits)

    if "tracin" in stages:
        shapes_of = [SHAPE_CYCLE[i % 3] for i in range(n_test)]
        tracin = np.stack([_curve_row(rng, k, flipped) for k in shapes_of]).astype(np.float32)
        if outliers:  # own generator: the default runs keep the values the tests were written on
            clean = np.flatnonzero(~flipped)
            few = np.random.default_rng([seed, 11]).choice(clean, 3, replace=False)
            tracin[:, few] = -outliers * np.abs(tracin).max(axis=1, keepdims=True)
        store.write_npy(run / store.TRACIN, tracin)
        weights = np.linspace(1.0, 0.5, epochs)
        weights = weights / weights.sum()
        per = weights[:, None, None] * tracin[None] + rng.normal(0, 0.01, (epochs, *tracin.shape))
        per[-1] = tracin - per[:-1].sum(0)  # contributions sum to the matrix
        store.write_npy(run / store.TRACIN_PER_CHECKPOINT, per.astype(np.float32))
        # Own generator: the other arrays keep the values the tests were written against.
        norms = np.random.default_rng([seed, 7]).uniform(0.5, 2.0, (epochs, n_train + n_test))
        norms = norms.astype(np.float32)
        store.write_npy(run / store.GRAD_NORMS_TRAIN, norms[:, :n_train])
        store.write_npy(run / store.GRAD_NORMS_TEST, norms[:, n_train:])
        self_inf = rng.gamma(2.0, 1.0, n_train) + 4.0 * flipped
        store.write_npy(run / store.SELF_INFLUENCE, self_inf.astype(np.float32))

    if "analyze" in stages:
        emb = _embeddings(rng, inst, shapes_of, hidden)
        store.write_npy(run / store.EMBEDDINGS, emb)
        tr_idx, te_idx = train.id.to_numpy(), test.id.to_numpy()
        dist = np.linalg.norm(emb[te_idx][:, None, :] - emb[tr_idx][None, :, :], axis=2)
        store.write_npy(run / store.DISTANCES, dist.astype(np.float32))
        # Every score-derived output through the analyze stage's own function.
        nearest = np.argsort(dist, axis=1)[:, :10]
        out = analysis.score_outputs(
            {
                "tracin": tracin,
                "stack": np.load(run / store.TRACIN_PER_CHECKPOINT),
                "norms": (norms[:, :n_train], norms[:, n_train:]),
            },
            test.id.to_numpy(np.int64),
            train.id.to_numpy(np.int64),
            flipped,
            ~wrong,
            dist.mean(axis=1),
            flipped[nearest].mean(axis=1),
            {
                "s_min": S_MIN,
                "z_max": Z_MAX,
                "trim": TRIM,
                "k": 10,
                "max_points": 2000,
                "checkpoint_index": epochs - 1,
                "epoch": epochs,
                "checkpoint_path": f"checkpoints/epoch-{epochs:02d}",
            },
            seed,
        )
        store.write_parquet(run / store.SHAPES, out["shapes"])
        store.write_parquet(run / store.CURVES, out["curves"])
        store.write_parquet(run / store.SHAPES_BY_VIEW, out["views"])
        store.write_npy(run / store.FLIP_RANKS, out["flip_ranks"])
        centred = emb - emb.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pca = centred @ vt[:2].T
        coords = pd.DataFrame(
            {
                "id": inst.id,
                "umap_x": (pca[:, 0] + rng.normal(0, 0.1, n)).astype(np.float32),
                "umap_y": (pca[:, 1] + rng.normal(0, 0.1, n)).astype(np.float32),
                "pca_x": pca[:, 0].astype(np.float32),
                "pca_y": pca[:, 1].astype(np.float32),
            }
        )
        store.write_parquet(run / store.COORDS, coords)
        store.write_json(
            run / store.ANALYSIS,
            {**out["analysis"], "geometry": {"epoch": epochs, "source": "fake"}},
        )

    if "detect" in stages:
        det = _detectors(rng, train, flipped, self_inf if "tracin" in stages else None)
        store.write_parquet(run / store.DETECTORS, det)
        store.write_json(run / store.DETECTION, _detection(det, flipped))
        if cleaning:
            _cleaning(run, det, train, flipped)

    store.write_json(run / store.MANIFEST, manifest)
    return run


def make_sweep(
    cache: str | Path,
    name: str = "sweep-quick",
    *,
    flip_rates: Sequence[float] = (0.0, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4),
    seeds: Sequence[int] = (0, 1, 2),
    n_train: int = 1600,
    epochs: int = 4,
) -> Path:
    """Write a fake noise sweep (manifest, sweep.parquet, sweep_epochs.parquet, cells/)."""
    rng = np.random.default_rng(7)
    root = Path(cache) / name
    rows, epoch_rows = [], []
    for rate in flip_rates:
        for seed in seeds:
            # A threshold effect: flat until ~10 %, then a steep drop (paper Fig. 4-5).
            drop = 0.02 * rate + 0.9 * max(0.0, rate - 0.08) ** 1.2
            acc = 0.9 - drop + rng.normal(0, 0.006)
            loss_obs = 0.15 + 1.6 * rate + rng.normal(0, 0.01)
            rows.append(
                {
                    "flip_rate": float(rate),
                    "seed": int(seed),
                    "flip_count": int(round(rate * n_train)),
                    "final_test_accuracy": acc,
                    "best_test_accuracy": acc + 0.01,
                    "val_accuracy": acc + rng.normal(0, 0.005),
                    "train_loss_observed": loss_obs,
                    "train_loss_true": 0.15 + 0.6 * rate,
                }
            )
            for e in range(1, epochs + 1):
                epoch_rows.append(
                    {
                        "flip_rate": float(rate),
                        "seed": int(seed),
                        "epoch": e,
                        "train_loss": loss_obs + 0.5 / e,
                        "val_accuracy": acc - 0.1 / e,
                        "test_accuracy": acc - 0.1 / e,
                    }
                )
            (root / "cells" / f"rate-{rate}_seed-{seed}").mkdir(parents=True, exist_ok=True)
    store.write_parquet(root / "sweep.parquet", pd.DataFrame(rows))
    store.write_parquet(root / "sweep_epochs.parquet", pd.DataFrame(epoch_rows))
    store.write_json(
        root / store.MANIFEST,
        {
            "kind": "sweep",
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m core sweep --preset quick --seeds 3",
            "status": store.STATUS_COMPLETE,
            "config": PRESETS["quick"].replace(n_train=n_train, epochs=epochs).to_dict(),
            "flip_rates": list(flip_rates),
            "seeds": list(seeds),
            "threshold": {
                "rate": 0.1,
                "rule": "smallest flip rate whose mean accuracy drop exceeds 2x the "
                "seed-to-seed standard deviation at 0%",
                "spread_at_zero": 0.006,
            },
        },
    )
    return root


def make_store(cache: str | Path, *, demo: bool = True) -> Path:
    """A cache with a complete run (named ``demo`` when ``demo``), an older run and a sweep."""
    cache = Path(cache)
    make_run(cache, "older-run", n_train=60, n_test=9, n_flips=3, created="2020-01-01T00:00:00")
    run = make_run(cache, "demo" if demo else "tiny", created="2021-01-01T00:00:00")
    make_error_study(run)
    make_sweep(cache)
    return cache


def make_error_study(run: Path, seed: int = 0) -> Path:
    """A stored error study (core.analysis.error_study's files) of a fake run: two noisy 'methods'
    measured against the run's tracin.npy as if it were exact, on every test row."""
    from core.analysis.error_study import detector_metrics, row_metrics, summarize

    rng = np.random.default_rng(seed)
    inst = store.load_instances(run)
    train = inst[inst["split"] == "train"]
    test = inst[inst["split"] == "test"]
    flipped = train["flipped"].to_numpy(dtype=bool)
    exact = np.load(run / store.TRACIN).astype(np.float64)
    self_inf = np.load(run / store.SELF_INFLUENCE).astype(np.float64)
    tables, methods = [], {}
    for name, noise in (("head", 0.5), ("factorized:16", 0.05)):
        approx = exact + noise * exact.std() * rng.standard_normal(exact.shape)
        table = row_metrics(exact, approx, flipped)
        table.insert(0, "method", name)
        table.insert(1, "test_id", test["id"].to_numpy(dtype=np.int64))
        table.insert(2, "test_position", np.arange(len(test), dtype=np.int64))
        table.insert(3, "misclassified", False)
        tables.append(table)
        si = self_inf + noise * self_inf.std() * rng.standard_normal(self_inf.shape)
        methods[name] = {
            "params": "head" if name == "head" else "all",
            "project": None if name == "head" else name,
            "n_params": 130 if name == "head" else 5000,
            "seconds": 1.5,
            "seconds_per_checkpoint": 0.5,
            **summarize(table),
            "self_influence": detector_metrics(si, flipped),
        }
    store.write_parquet(run / store.ERROR_STUDY, pd.concat(tables, ignore_index=True))
    store.write_json(
        run / store.ERROR_STUDY_SUMMARY,
        {
            "command": f"python -m core error-study {run.name} --test-subset all",
            "methods": methods,
            "reference": {
                "params": "all",
                "n_params": 5000,
                "seconds": 3.0,
                "self_influence": detector_metrics(self_inf, flipped),
            },
            "test_subset": "all",
            "n_test_rows": len(test),
            "n_misclassified": 0,
            "n_train": len(train),
            "n_checkpoints": 3,
            "checkpoints_used": [1, 2, 3],
            "train_seconds": 4.0,
        },
    )
    return run


def corrupt_run(cache: str | Path, name: str = "broken", how: str = "instances") -> Path:
    """Make a run whose ``how`` file ("manifest", "instances", "tracin", "shapes") is garbage."""
    run = make_run(cache, name, n_train=30, n_test=6, n_flips=2, created="2019-01-01T00:00:00")
    target = {
        "manifest": store.MANIFEST,
        "instances": store.INSTANCES,
        "tracin": store.TRACIN,
        "shapes": store.SHAPES,
    }[how]
    (run / target).write_bytes(b"\x00garbage, not what this file should hold\xff")
    return run


# ---------------------------------------------------------------------------------------------
# runs with a real tokenizer and tiny BERT checkpoints (the engine, detector and cleaning tests);
# transformers is imported inside each, so the torch-free app tests can import this module


_MODEL_POSITIVE = ["good", "great", "nice", "love", "fine", "happy"]
_MODEL_NEGATIVE = ["bad", "awful", "poor", "hate", "sad", "broken"]
_MODEL_FILLER = ["the", "item", "was", "really", "this", "very", "product", "it"]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _model_sentence(rng: np.random.Generator, label: int) -> str:
    words = list(rng.choice(_MODEL_POSITIVE if label else _MODEL_NEGATIVE, size=2)) + list(
        rng.choice(_MODEL_FILLER, size=3)
    )
    rng.shuffle(words)
    return " ".join(words)


def make_model_run(
    root: Path, n_train: int = 48, n_val: int = 8, n_test: int = 12, flips: int = 4, epochs: int = 2
) -> Path:
    """A run at ``root/tiny-run`` with every file the detectors read, made of a toy two-word-class
    dataset, with a real tokenizer and random tiny BERT checkpoints.

    Texts are made of sentiment words plus filler, so a model learns them in a few
    steps; the influence files are synthetic but put the flips where real ones go
    (high self-influence, high final loss).
    """
    from transformers import BertTokenizer

    from tests.conftest import tiny_bert

    rng = np.random.default_rng(0)
    run = root / "tiny-run"
    run.mkdir(parents=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    labels = np.array([i % 2 for i in range(len(splits))])
    texts = [_model_sentence(rng, int(y)) for y in labels]
    flipped = np.zeros(len(splits), bool)
    flipped[rng.choice(n_train, size=flips, replace=False)] = True
    observed = np.where(flipped, 1 - labels, labels)
    instances = pd.DataFrame(
        {
            "id": np.arange(len(splits)),
            "split": splits,
            "text": texts,
            "label": labels,
            "observed_label": observed,
            "flipped": flipped,
            "source_row": np.arange(len(splits)) + 100,
        }
    )
    store.write_parquet(run / store.INSTANCES, instances)

    vocab = root / "vocab.txt"
    vocab.write_text(
        "\n".join(_SPECIALS + _MODEL_POSITIVE + _MODEL_NEGATIVE + _MODEL_FILLER) + "\n", "utf-8"
    )
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(str(run / store.TOKENIZER_DIR))
    config = StudyConfig(
        preset="test",
        n_train=n_train,
        flip_count=flips,
        model="tiny",
        epochs=epochs,
        lr=3e-3,
        batch_size=16,
        max_length=16,
        device="cpu",
    )
    checkpoints = []
    for epoch in range(1, epochs + 1):
        model = tiny_bert(len(tokenizer), seed=None, layers=1)
        path = run / store.CHECKPOINTS_DIR / f"epoch-{epoch:02d}"
        model.save_pretrained(str(path))
        checkpoints.append({"epoch": epoch, "path": str(path.relative_to(run)), "lr": config.lr})

    # Logits: confident on the observed label for clean instances, torn on flips.
    margin = np.where(flipped, -0.5, 2.0) + rng.normal(0, 0.3, len(splits))
    sign = np.where(observed == 1, 1.0, -1.0)
    final = np.stack([-sign * margin / 2, sign * margin / 2], axis=1)
    logits = np.stack([final * 0.5, final]).astype(np.float32)
    store.write_npy(run / store.LOGITS, logits)
    self_inf = rng.gamma(2.0, 1.0, n_train) + 4.0 * flipped[:n_train]
    store.write_npy(run / store.SELF_INFLUENCE, self_inf.astype(np.float32))
    tracin = rng.normal(0, 1, (n_test, n_train)).astype(np.float32)
    store.write_npy(run / store.TRACIN, tracin)
    test_ids = np.arange(n_train + n_val, len(splits))
    shapes_df = pd.DataFrame(
        {
            "id": test_ids,
            "correct": np.arange(n_test) % 3 != 0,
            "s": np.linspace(-0.4, 0.6, n_test),
            "shape": ["Z"] * 4 + ["backslash"] * 4 + ["S"] * 4,
        }
    )
    store.write_parquet(run / store.SHAPES, shapes_df)
    store.write_json(
        run / store.MANIFEST,
        {
            "kind": "run",
            "name": run.name,
            "status": "complete",
            "config": config.to_dict(),
            "data": {"source": str(root / "input.csv"), "label_names": ["negative", "positive"]},
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "n_flipped": flips,
            "checkpoints": checkpoints,
            "stages": {},
        },
    )
    return run


_CHECKPOINT_WORDS = [f"w{i}" for i in range(30)]


def make_checkpoint_run(
    root: Path,
    checkpoints: Sequence[tuple[Path, float]],
    n_train: int = 12,
    n_test: int = 5,
    complete: bool = True,
    max_words: int = 8,
    max_length: int = 16,
) -> Path:
    """A run ready for TracIn at ``root/run``: a word-level tokenizer, instances and copies of
    ``checkpoints`` ((saved model folder, learning rate) pairs), data and train marked complete.

    Texts have 2 to ``max_words`` words; the run encodes them to ``max_length`` tokens.
    """
    from transformers import BertForSequenceClassification, BertTokenizer

    run = root / "run"
    (run / store.TOKENIZER_DIR).mkdir(parents=True)
    vocab_file = root / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_file.write_text("\n".join(specials + _CHECKPOINT_WORDS) + "\n")
    BertTokenizer(str(vocab_file), do_lower_case=True).save_pretrained(run / store.TOKENIZER_DIR)
    rng = np.random.default_rng(0)
    n_val = 2
    n = n_train + n_val + n_test
    texts = [
        " ".join(rng.choice(_CHECKPOINT_WORDS, rng.integers(2, max_words + 1))) for _ in range(n)
    ]
    labels = rng.integers(0, 2, n)
    observed = labels.copy()
    observed[:2] = 1 - observed[:2]
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "split": split,
            "text": texts,
            "label": labels,
            "observed_label": observed,
            "flipped": observed != labels,
            "source_row": np.arange(n),
        }
    )
    store.write_parquet(run / store.INSTANCES, df)
    ckpts = []
    for i, (path, lr) in enumerate(checkpoints):
        dest = run / store.CHECKPOINTS_DIR / f"epoch-{i + 1:02d}"
        BertForSequenceClassification.from_pretrained(path).save_pretrained(dest)
        ckpts.append(
            {"epoch": i + 1, "path": f"{store.CHECKPOINTS_DIR}/epoch-{i + 1:02d}", "lr": lr}
        )
    config = PRESETS["quick"].replace(max_length=max_length).to_dict()
    store.write_json(
        run / store.MANIFEST,
        {"kind": "run", "name": "run", "status": "running", "config": config, "checkpoints": ckpts},
    )
    store.mark_stage(run, "data", store.STATUS_COMPLETE)
    if complete:
        store.mark_stage(run, "train", store.STATUS_COMPLETE)
    return run


# Sizes of make_analysis_run: train, val and test instances, the flipped training rows, BERT width.
ANALYSIS_SIZES = (40, 4, 10)
ANALYSIS_FLIPPED = [3, 10, 25, 33]
ANALYSIS_HIDDEN = 16


def make_analysis_run(run: Path) -> None:
    """A complete pre-analyze run at ``run`` (the analyze stage's tests): a word tokenizer, two
    random one-layer checkpoints, TracIn whose row 0 is an S and row 1 a Z with the flips placed
    by hand, per-checkpoint parts that sum to it exactly, and logits; sizes :data:`ANALYSIS_SIZES`.
    """
    from scipy import stats
    from transformers import BertTokenizer

    from tests.conftest import tiny_bert

    n_train, n_val, n_test = ANALYSIS_SIZES
    flipped_rows, words, hidden = ANALYSIS_FLIPPED, _CHECKPOINT_WORDS, ANALYSIS_HIDDEN
    rng = np.random.default_rng(0)
    run.mkdir(parents=True)
    vocab = run / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(run / store.TOKENIZER_DIR))
    vocab.unlink()
    checkpoints = []
    for epoch in (1, 2):
        path = f"{store.CHECKPOINTS_DIR}/epoch-{epoch:02d}"
        tiny_bert(5 + len(words), seed=epoch, layers=1, hidden_size=hidden).save_pretrained(
            str(run / path)
        )
        checkpoints.append({"epoch": epoch, "path": path, "lr": 1e-3})

    n = n_train + n_val + n_test
    labels = rng.integers(0, 2, n)
    flipped = np.zeros(n, bool)
    flipped[flipped_rows] = True
    inst = pd.DataFrame(
        {
            "id": np.arange(n),
            "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test,
            "text": [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(n)],
            "label": labels,
            "observed_label": np.where(flipped, 1 - labels, labels),
            "flipped": flipped,
            "source_row": np.arange(n),
        }
    )
    store.write_parquet(run / store.INSTANCES, inst)

    tracin = rng.normal(size=(n_test, n_train))
    # Row 0: an S curve (heavy-tailed: most scores near 0) with the flips at both steep ends.
    others = [i for i in range(n_train) if i not in flipped_rows]
    heavy = stats.t.ppf(np.linspace(0.01, 0.99, n_train), 1.5)[::-1]  # descending
    tracin[0, flipped_rows] = heavy[[0, 1, n_train - 2, n_train - 1]]
    tracin[0, others] = heavy[2 : n_train - 2]
    # Row 1: a Z curve (two plateaus) with the flipped instances in the step.
    tracin[1] = np.where(np.arange(n_train) % 2 == 0, 1.0, -1.0) + rng.normal(
        scale=1e-3, size=n_train
    )
    tracin[1, flipped_rows] = [0.02, 0.01, -0.01, -0.02]
    # Two checkpoints' contributions whose float32 sum is exactly tracin.npy (as the engine sums).
    first = (tracin * rng.uniform(0.2, 0.8, tracin.shape)).astype(np.float32)
    second = (tracin - first).astype(np.float32)
    stack = np.stack([first, second])
    summed = np.zeros_like(first)
    for part in stack:
        summed += part
    store.write_npy(run / store.TRACIN, summed)
    store.write_npy(run / store.TRACIN_PER_CHECKPOINT, stack)
    store.write_npy(
        run / store.GRAD_NORMS_TRAIN, rng.uniform(0.5, 2.0, (2, n_train)).astype(np.float32)
    )
    store.write_npy(
        run / store.GRAD_NORMS_TEST, rng.uniform(0.5, 2.0, (2, n_test)).astype(np.float32)
    )

    logits = rng.normal(size=(2, n, 2)).astype(np.float32)
    # Final epoch: the first half of the test split right, the second half wrong.
    test_ids = np.arange(n_train + n_val, n)
    right = np.r_[np.ones(n_test // 2, bool), np.zeros(n_test - n_test // 2, bool)]
    pred = np.where(right, labels[test_ids], 1 - labels[test_ids])
    logits[-1, test_ids] = np.stack([1.0 - pred, pred.astype(float)], axis=1) * 3
    store.write_npy(run / store.LOGITS, logits)

    store.write_json(
        run / store.MANIFEST,
        {
            "kind": "run",
            "name": run.name,
            "status": "complete",
            "config": {"seed": 0, "max_length": 16, "device": "cpu"},
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "n_flipped": len(flipped_rows),
            "checkpoints": checkpoints,
            "stages": {s: {"status": "complete"} for s in ("data", "train", "tracin")},
        },
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _instances(rng: np.random.Generator, n_train: int, n_val: int, n_test: int, n_flips: int):
    """Rows ordered train, val, test; flips only in train."""
    n = n_train + n_val + n_test
    label = rng.integers(0, 2, n)
    split = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n_train, size=n_flips, replace=False)] = True
    texts = []
    for i, lab in enumerate(label):
        words = _WORDS_POS if lab == 1 else _WORDS_NEG
        texts.append(f"Review {i}: {words[i % len(words)]}, {rng.choice(words)}.")
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "split": split,
            "text": texts,
            "label": label.astype(np.int64),
            "observed_label": np.where(flipped, 1 - label, label).astype(np.int64),
            "flipped": flipped,
            "source_row": rng.permutation(n + 40)[:n].astype(np.int64),
        }
    )


def _logits(rng: np.random.Generator, inst: pd.DataFrame, wrong_test: np.ndarray, epochs: int):
    """Eval-mode logits whose final-epoch test predictions are wrong exactly at ``wrong_test``."""
    n = len(inst)
    label = inst.label.to_numpy()
    out = np.zeros((epochs, n, 2), dtype=np.float32)
    test_pos = np.flatnonzero(inst.split.to_numpy() == "test")
    for e in range(epochs):
        correct = rng.random(n) < 0.6 + 0.3 * (e + 1) / epochs
        if e == epochs - 1:
            correct[test_pos] = ~wrong_test
        pred = np.where(correct, label, 1 - label)
        margin = rng.uniform(0.2, 2.0, n) * (e + 1)
        out[e, np.arange(n), pred] = margin / 2
        out[e, np.arange(n), 1 - pred] = -margin / 2
    return out


def _epoch_rows(logits: np.ndarray, inst: pd.DataFrame, epochs: int) -> list[dict[str, Any]]:
    """Per-epoch metrics as the train stage records them."""
    rows = []
    label = inst.label.to_numpy()
    for e in range(epochs):
        pred = logits[e].argmax(1)
        acc = {s: float((pred == label)[inst.split == s].mean()) for s in ("val", "test")}
        rows.append(
            {
                "epoch": e + 1,
                "lr": 1e-3,
                "train_loss": 0.7 / (e + 1),
                "val_accuracy": acc["val"],
                "val_loss": 0.6 / (e + 1),
                "test_accuracy": acc["test"],
                "test_loss": 0.6 / (e + 1),
            }
        )
    return rows


def _template(kind: str, n: int) -> np.ndarray:
    """A descending curve of the named shape over n ranks."""
    u = np.linspace(1.0, -1.0, n)
    if kind == "S":
        return u**5  # flat middle, steep ends
    if kind == "Z":
        return np.tanh(6 * u)  # plateaus at both ends, steep middle
    return u.copy()  # backslash: a straight line


def _curve_row(rng: np.random.Generator, kind: str, flipped: np.ndarray) -> np.ndarray:
    """Scores of all training instances for one test instance, flips placed by shape."""
    n = len(flipped)
    values = _template(kind, n) * rng.uniform(0.5, 2.0) + rng.normal(0, 0.002, n)
    values = np.sort(values)[::-1]
    k = int(flipped.sum())
    if kind == "S":  # flipped at both ends
        ends = np.r_[np.arange(0, n // 10), np.arange(n - n // 10, n)]
        ranks = rng.choice(ends, size=k, replace=False)
    elif kind == "Z":  # flipped near the centre
        mid = np.arange(int(n * 0.42), int(n * 0.58))
        ranks = rng.choice(mid, size=k, replace=False)
    else:  # backslash: around the centre, more widely spread
        mid = np.arange(int(n * 0.2), int(n * 0.8))
        ranks = rng.choice(mid, size=k, replace=False)
    rest = rng.permutation(np.setdiff1d(np.arange(n), ranks))
    order = np.empty(n, dtype=np.int64)  # order[j] = rank of training instance j
    order[np.flatnonzero(flipped)] = ranks
    order[np.flatnonzero(~flipped)] = rest
    return values[order]


def _embeddings(rng, inst: pd.DataFrame, shapes_of: list[str], hidden: int) -> np.ndarray:
    """Label clusters; Z-shaped test instances sit close to the training data, S far."""
    label = inst.label.to_numpy()
    centres = rng.normal(0, 3, (2, hidden))
    emb = centres[label] + rng.normal(0, 1, (len(inst), hidden))
    test_pos = np.flatnonzero(inst.split.to_numpy() == "test")
    scale = {"Z": 0.3, "backslash": 1.0, "S": 2.5}
    for pos, kind in zip(test_pos, shapes_of, strict=True):
        emb[pos] = centres[label[pos]] + rng.normal(0, 1, hidden) * scale[kind]
    return emb.astype(np.float32)


def _detectors(rng, train: pd.DataFrame, flipped: np.ndarray, self_inf) -> pd.DataFrame:
    """One suspicion column per detector, with different (known) quality."""
    n = len(train)
    base = flipped.astype(float)
    cols = {"id": train.id.to_numpy()}
    noise = {"misclassified_influence": 0.4, "shape_aware": 0.3, "loss": 0.6, "aum": 0.7}
    for name in DETECTOR_NAMES:
        if name == "self_influence" and self_inf is not None:
            cols[name] = np.asarray(self_inf, dtype=np.float64)
        elif name == "random":
            cols[name] = rng.random(n)
        else:
            cols[name] = base + rng.normal(0, noise.get(name, 0.8), n)
    return pd.DataFrame(cols)


def _metrics(score: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Recall at fractions, precision@k, AP and AUROC of one ranking."""
    n, k = len(score), int(flipped.sum())
    order = np.argsort(-score, kind="stable")
    hits = flipped[order]
    out = {}
    for q, key in zip(FRACTIONS, ("1", "2_5", "5", "10", "20"), strict=True):
        out[f"recall_at_{key}pct"] = float(hits[: max(1, int(round(q * n)))].sum() / k)
    out["precision_at_k"] = float(hits[:k].mean())
    cum = np.cumsum(hits)
    out["average_precision"] = float((cum / np.arange(1, n + 1))[hits].mean())
    ranks = np.empty(n)
    ranks[np.argsort(score, kind="stable")] = np.arange(1, n + 1)
    out["auroc"] = float((ranks[flipped].sum() - k * (k + 1) / 2) / (k * (n - k)))
    return out


def _detection(det: pd.DataFrame, flipped: np.ndarray) -> dict[str, Any]:
    """detection.json as docs/run-store.md documents it."""
    n, k = len(flipped), int(flipped.sum())
    rate = k / n
    random = {
        f"recall_at_{key}pct": q
        for q, key in zip(FRACTIONS, ("1", "2_5", "5", "10", "20"), strict=True)
    }
    random.update(precision_at_k=rate, average_precision=rate, auroc=0.5)
    return {
        "k": k,
        "n_train": n,
        "flip_rate": rate,
        "fractions": list(FRACTIONS),
        "detectors": {d: _metrics(det[d].to_numpy(), flipped) for d in DETECTOR_NAMES},
        "random": random,
        "notes": {d: f"fake {d} scores made by the test factory" for d in DETECTOR_NAMES},
    }


def _cleaning(run: Path, det: pd.DataFrame, train: pd.DataFrame, flipped: np.ndarray) -> None:
    """cleaning/results.json plus one review queue and one cleaned export."""
    folder = run / store.CLEANING_DIR
    rows = []
    k = int(flipped.sum())
    for d in ("self_influence", "loss"):
        for action in ("exclude", "relabel"):
            for seed in (0, 1):
                rows.append(
                    {
                        "detector": d,
                        "action": action,
                        "k": k,
                        "seed": seed,
                        "test_accuracy": 0.8 + 0.01 * seed + (0.02 if action == "relabel" else 0),
                        "no_change_accuracy": 0.79,
                        "oracle_accuracy": 0.84,
                        "random_accuracy": 0.785,
                        "n_flips_caught": k // 2,
                    }
                )
    store.write_json(folder / "results.json", {"rows": rows})
    top = det.sort_values("self_influence", ascending=False).head(k)
    queue = train.set_index("id").loc[top.id]
    q = pd.DataFrame(
        {
            "id": top.id.to_numpy(),
            "text": queue.text.to_numpy(),
            "observed_label": queue.observed_label.to_numpy(),
            "suggested_label": 1 - queue.observed_label.to_numpy(),
            "score": top.self_influence.to_numpy(),
            "reason": "high self-influence",
        }
    )
    with store.atomic_path(folder / "review_queue_self_influence.csv") as tmp:
        q.to_csv(tmp, index=False)
    with store.atomic_path(folder / "cleaned_self_influence_exclude.csv") as tmp:
        train.assign(action="keep").to_csv(tmp, index=False)
