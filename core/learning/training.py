"""Fine-tuning with a checkpoint after every epoch, resumable after a kill.

AdamW at a constant learning rate (no scheduler, as in the paper). After each epoch the
model is saved with ``save_pretrained`` (safetensors) into ``epoch-NN/`` together with
that epoch's metrics and the eval-mode logits of every evaluation set, so TracIn,
analytics and detectors never need to rerun inference.

Resume is exact: the batch order and dropout of epoch e are seeded by (seed, e), and the
optimizer state of the newest checkpoint is kept beside it, so a run killed after epoch
3 and restarted ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.inputs.config import StudyConfig
from core.learning.models import (
    build_model,
    collate,
    folder_into_place,
    length_batches,
    load_classifier,
    predict_logits,
    resolve_device,
    save_pretrained_atomically,
    token_ids,
)
from core.storage import store

EPOCH_STATE = "epoch_state.json"
EPOCH_LOGITS = "eval_logits.npz"
OPTIMIZER_STATE = "optimizer.pt"


@dataclass
class TrainResult:
    """What a training run leaves: per-epoch history, logits per eval set, checkpoints, model."""

    history: list[dict] = field(default_factory=list)
    eval_logits: dict[str, np.ndarray] = field(default_factory=dict)
    checkpoints: list[tuple[Path, float]] = field(default_factory=list)
    model: torch.nn.Module | None = None


def checkpoint_name(epoch: int) -> str:
    """Folder name of the checkpoint saved after ``epoch`` (1-based)."""
    return f"epoch-{epoch:02d}"


def completed_epochs(checkpoint_dir: Path, trained_on: Mapping | None = None) -> list[int]:
    """Epochs 1..j whose checkpoint folders are complete (renamed into place with their state
    file), up to the first one missing.

    Training resumes after the last of them. Epochs after a gap (``epoch-01`` deleted,
    ``epoch-02`` kept) are not counted: resuming from them would record ``epoch-02`` as the
    first checkpoint, so training starts again at the gap and rewrites the later ones. With
    ``trained_on`` (the fingerprint of the data being trained on), a checkpoint whose state
    names other data, or none, is not counted either: resuming from it would mix two
    datasets in one model. Nor is one whose files are not whole (:func:`store.checkpoint_problem`).
    """
    if not checkpoint_dir.is_dir():
        return []
    found = set()
    for child in checkpoint_dir.iterdir():
        complete = re.fullmatch(r"epoch-\d+", child.name) and (child / EPOCH_STATE).exists()
        # A file cut short (a full disk, a bad copy) is no checkpoint: trained again.
        complete = complete and store.checkpoint_problem(child) is None
        if complete and (trained_on is None or _trained_on(child) == dict(trained_on)):
            found.add(int(child.name.split("-")[1]))
    done = []
    while len(done) + 1 in found:
        done.append(len(done) + 1)
    return done


def _trained_on(folder: Path) -> dict | None:
    """The data fingerprint a checkpoint's state file records (None if absent or unreadable)."""
    try:
        state = json.loads((folder / EPOCH_STATE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return state.get("trained_on") if isinstance(state, dict) else None


def clean_partial(checkpoint_dir: Path) -> list[Path]:
    """Remove the half-written checkpoint folders a killed or failed save left; return them.

    ``epoch-NN.partial`` (a save not yet renamed into place) and ``.epoch-NN…`` (the
    temporary folder of its weights) are never read, but a full disk would keep them
    forever. The caller holds the run's lock, so no live writer owns them.
    """
    removed = []
    if not checkpoint_dir.is_dir():
        return removed
    for child in checkpoint_dir.iterdir():
        name = child.name
        partial = name.startswith("epoch-") and name.endswith(".partial")
        if child.is_dir() and (partial or name.startswith(".epoch-")):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def train_model(
    config: StudyConfig,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    eval_sets: dict[str, tuple[Sequence[str], Sequence[int]]] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[TrainResult], None] | None = None,
    trained_on: Mapping | None = None,
) -> TrainResult:
    """Fine-tune a fresh model on ``train_texts`` and return its history and checkpoints.

    ``weights`` scale each training instance's loss (reweighting interventions);
    ``eval_sets`` maps a name to (texts, labels) evaluated after every epoch; with
    ``checkpoint_dir`` each epoch is saved there and completed epochs are skipped.
    ``on_epoch`` is called with the result so far after every saved epoch (live progress).
    ``trained_on`` (a fingerprint of the data) is stored in every checkpoint, and only
    checkpoints that store the same one are resumed from (:func:`completed_epochs`).
    """
    device = resolve_device(config.device)
    eval_sets = eval_sets or {}
    labels = torch.as_tensor(np.array(train_labels), dtype=torch.long)
    w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    ids = token_ids(tokenizer, train_texts, config.max_length)
    eval_ids = {
        name: (token_ids(tokenizer, t, config.max_length), np.asarray(y))
        for name, (t, y) in eval_sets.items()
    }
    pad_id = tokenizer.pad_token_id
    lengths = [len(x) for x in ids]

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        clean_partial(ckpt_dir)
    done = completed_epochs(ckpt_dir, trained_on) if ckpt_dir is not None else []
    if ckpt_dir is not None and trained_on is not None and done != completed_epochs(ckpt_dir):
        # Checkpoints of other data are overwritten, never resumed from: say so.
        print(
            f"note: {ckpt_dir / checkpoint_name(len(done) + 1)} was trained on other data; "
            f"training again from epoch {len(done) + 1}.",
            file=sys.stderr,
        )
    # Resuming is exact only with the optimizer state of the epoch resumed from (older ones
    # are deleted as training goes): without it, AdamW's moments would start again at zero.
    kept = len(done)
    while done and done[-1] < config.epochs:
        if (ckpt_dir / checkpoint_name(done[-1]) / OPTIMIZER_STATE).exists():
            break
        done.pop()
    if len(done) < kept:
        print(
            f"note: {ckpt_dir / checkpoint_name(kept)} has no optimizer state to resume from "
            f"exactly; training again from epoch {len(done) + 1}.",
            file=sys.stderr,
        )
    result = TrainResult()
    start_epoch = 1
    if done:
        last = done[-1]
        model = load_classifier(ckpt_dir / checkpoint_name(last), device)
        for epoch in done:
            folder = ckpt_dir / checkpoint_name(epoch)
            _collect_epoch(result, folder, epoch, config.lr)
        start_epoch = last + 1
    else:
        model = build_model(config.model, tokenizer, config.max_length, config.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    if done and (ckpt_dir / checkpoint_name(done[-1]) / OPTIMIZER_STATE).exists():
        state = torch.load(
            ckpt_dir / checkpoint_name(done[-1]) / OPTIMIZER_STATE, map_location=device
        )
        optimizer.load_state_dict(state)

    epochs = range(start_epoch, config.epochs + 1)
    bar = tqdm(epochs, desc=desc, disable=not progress, unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout of this epoch
        model.train()
        total, count = 0.0, 0
        for batch in length_batches(lengths, config.batch_size, rng):
            enc = {k: v.to(device) for k, v in collate([ids[i] for i in batch], pad_id).items()}
            logits = model(**enc).logits
            loss_each = F.cross_entropy(logits, labels[batch].to(device), reduction="none")
            loss = (loss_each * w[batch].to(device)).mean() if w is not None else loss_each.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss_each.detach().sum())
            count += len(batch)
        entry = {"epoch": epoch, "lr": config.lr, "train_loss": total / max(count, 1)}
        logits_now = {}
        for name, (e_ids, e_y) in eval_ids.items():
            lg = predict_logits(model, e_ids, pad_id, device)
            logits_now[name] = lg
            entry[f"{name}_accuracy"] = float((lg.argmax(1) == e_y).mean())
            entry[f"{name}_loss"] = float(
                F.cross_entropy(
                    torch.from_numpy(lg), torch.as_tensor(np.array(e_y), dtype=torch.long)
                )
            )
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        bar.set_postfix(loss=f"{entry['train_loss']:.3f}", **_short(entry))
        if ckpt_dir is not None:
            folder = ckpt_dir / checkpoint_name(epoch)
            _save_epoch(model, optimizer, folder, entry, logits_now, trained_on)
            # Only the newest optimizer state is needed to resume; older ones would
            # triple the heavy tier for pretrained models.
            prev = ckpt_dir / checkpoint_name(epoch - 1) / OPTIMIZER_STATE
            prev.unlink(missing_ok=True)
            result.checkpoints.append((folder, config.lr))
        result.history.append(entry)
        for name, lg in logits_now.items():
            result.eval_logits.setdefault(name, []).append(lg)
        if on_epoch is not None:
            on_epoch(result)
    result.eval_logits = {k: np.stack(v) for k, v in result.eval_logits.items()}
    result.model = model.eval()
    return result


def _short(entry: dict) -> dict:
    """Accuracy figures for the progress bar."""
    return {
        k.replace("_accuracy", ""): f"{v:.3f}" for k, v in entry.items() if k.endswith("_accuracy")
    }


def _save_epoch(
    model,
    optimizer,
    folder: Path,
    entry: dict,
    logits: dict[str, np.ndarray],
    trained_on: Mapping | None = None,
) -> None:
    """Write one checkpoint folder atomically: weights, optimizer, metrics, logits, state last.

    The state names the data trained on (``trained_on``), so the checkpoint says it itself.
    A write that fails (a full disk) removes the half-written folder and is raised as an
    :class:`OSError` naming ``folder`` (:func:`core.learning.models.folder_into_place`): the CLI says it in
    one sentence, and the rerun resumes after the last whole epoch.
    """
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    with folder_into_place(tmp, folder):
        save_pretrained_atomically(model, tmp)
        # Through a Python file: torch's own writer reports a full disk as an opaque
        # RuntimeError, a file object's OSError stays in its context.
        with open(tmp / OPTIMIZER_STATE, "wb") as f:
            torch.save(optimizer.state_dict(), f)
        np.savez(tmp / EPOCH_LOGITS, **logits)
        state = entry if trained_on is None else {**entry, "trained_on": dict(trained_on)}
        (tmp / EPOCH_STATE).write_text(json.dumps(state, indent=2), "utf-8")


def _collect_epoch(result: TrainResult, folder: Path, epoch: int, lr: float) -> None:
    """Load a finished epoch's metrics and logits into ``result`` (for resume)."""
    entry = json.loads((folder / EPOCH_STATE).read_text("utf-8"))
    entry.pop("trained_on", None)  # provenance, not a metric
    result.history.append(entry)
    result.checkpoints.append((folder, entry.get("lr", lr)))
    with np.load(folder / EPOCH_LOGITS) as data:
        for name in data.files:
            result.eval_logits.setdefault(name, []).append(data[name])
