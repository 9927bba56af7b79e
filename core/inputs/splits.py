"""Seeded subsample, stratified 80/10/10 split and nested label flips.

One seed decides everything here: the same data, sizes and seed always give the
same instances frame. Each random step draws from its own stream of that seed
(``numpy.random.SeedSequence([seed, stream])``), so the flips do not depend on
how the subsample was drawn and a change to one step cannot shift another.
The output is the ``instances.parquet`` table of docs/run-store.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from core.inputs.config import MIN_PER_CLASS
from core.inputs.datasets import LoadedData
from core.storage import store
from core.storage.errors import AtlasError

SPLITS = ("train", "val", "test")
# The columns the data stage writes: the run store's required ones, then the input file's row.
INSTANCE_COLUMNS = [*store.INSTANCE_COLUMNS, "source_row"]

# Stream numbers: one independent random stream per step, derived from the seed.
_SUBSAMPLE_STREAM = 0
_FLIP_STREAM = 1


def split_instances(data: LoadedData, n_total: int, n_flips: int, seed: int) -> pd.DataFrame:
    """Subsample, split 80/10/10 (stratified) and flip ``n_flips`` training labels.

    Returns one row per instance, ordered train, val, test (each split in source
    order), with the columns of ``instances.parquet``: ``id`` (= row position),
    ``split``, ``text``, ``label`` (true), ``observed_label`` (after flipping),
    ``flipped`` and ``source_row``. When the data holds fewer than ``n_total``
    rows all of them are used; ``frame.attrs['sample']`` records requested,
    available and used sizes either way.
    """
    frame = data.frame
    _check_arguments(n_total, n_flips, seed)
    sample = _stratified_subsample(frame, n_total, seed)
    _check_class_sizes(sample, data.label_names, n_total)
    # The 80/10/10 fractions of the design; sklearn rounds the held-out part up,
    # so 2,000 instances give exactly 1,600 / 200 / 200.
    positions = np.arange(len(sample))
    labels = sample["label"].to_numpy()
    train_pos, held_pos = train_test_split(
        positions, test_size=0.2, stratify=labels, random_state=seed
    )
    val_pos, test_pos = train_test_split(
        held_pos, test_size=0.5, stratify=labels[held_pos], random_state=seed
    )
    if n_flips > len(train_pos):
        raise AtlasError(
            f"Cannot flip {n_flips} labels: the training split has only {len(train_pos)} instances."
        )
    parts = []
    for name, pos in zip(SPLITS, (train_pos, val_pos, test_pos), strict=True):
        # Source order inside a split keeps the table independent of sklearn's shuffling.
        part = sample.iloc[np.sort(pos)].copy()
        part["split"] = name
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    n_train = len(train_pos)
    flipped = np.zeros(len(out), dtype=bool)
    flipped[:n_train] = flip_mask(n_train, n_flips, seed)
    label = out["label"].to_numpy(dtype=np.int64)
    out["id"] = np.arange(len(out), dtype=np.int64)
    out["label"] = label
    out["observed_label"] = np.where(flipped, 1 - label, label).astype(np.int64)
    out["flipped"] = flipped
    out["source_row"] = out["source_row"].astype(np.int64)
    out["text"] = out["text"].astype(str)
    out = out[INSTANCE_COLUMNS]
    out.attrs["sample"] = {
        "n_requested": int(n_total),
        "n_available": int(len(frame)),
        "n_used": int(len(out)),
        "used_all": bool(len(frame) <= n_total),
    }
    return out


def flip_mask(n_train: int, n_flips: int, seed: int) -> np.ndarray:
    """Boolean mask of the training positions whose labels are flipped.

    The flipped set is the first ``n_flips`` entries of one seeded permutation,
    so for the same seed and training size the flips nest across counts (the 40
    flipped at 2.5 % are among the 80 flipped at 5 %), which makes noise sweeps
    compare like with like.
    """
    _check_arguments(max(n_train, 1), n_flips, seed)
    if n_flips > n_train:
        raise AtlasError(f"Cannot flip {n_flips} labels of {n_train} training instances.")
    order = _rng(seed, _FLIP_STREAM).permutation(n_train)
    mask = np.zeros(n_train, dtype=bool)
    mask[order[:n_flips]] = True
    return mask


def _check_arguments(n_total: int, n_flips: int, seed: int) -> None:
    """Reject sizes and seeds that cannot describe a split."""
    if int(n_total) < 1:
        raise AtlasError(f"The sample size must be positive, not {n_total}.")
    if int(n_flips) < 0:
        raise AtlasError(f"The number of label flips must be zero or more, not {n_flips}.")
    if int(seed) < 0:
        raise AtlasError(f"The seed must be zero or a positive integer, not {seed}.")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for one step (``stream``) of one seed."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _stratified_subsample(frame: pd.DataFrame, n_total: int, seed: int) -> pd.DataFrame:
    """Rows for a sample of ``n_total`` with the class shares of ``frame``, in source order.

    Class quotas use largest remainders so they sum to exactly ``n_total``; this
    avoids sklearn's restrictions near the edges (e.g. one row left out).
    """
    if len(frame) <= n_total:
        return frame.reset_index(drop=True)
    rng = _rng(seed, _SUBSAMPLE_STREAM)
    labels = frame["label"].to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_total / len(frame)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_total - quota.sum()]:
        quota[i] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return frame.iloc[np.sort(np.concatenate(chosen))].reset_index(drop=True)


def _check_class_sizes(sample: pd.DataFrame, label_names: list[str], n_total: int) -> None:
    """Raise if a class is too small for a stratified 80/10/10 split."""
    counts = sample["label"].value_counts()
    for label, name in enumerate(label_names):
        have = int(counts.get(label, 0))
        if have < MIN_PER_CLASS:
            raise AtlasError(
                f"The {len(sample)}-instance sample (asked for {n_total}) holds {have} "
                f"'{name}' instances, but a stratified 80/10/10 split needs at least "
                f"{MIN_PER_CLASS} per class; use a larger sample or more '{name}' rows."
            )
