"""Shards: where (checkpoint × training chunk) blocks go, in memory or as ``.npy`` files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.storage import store
from core.storage.errors import AtlasError

SHARD_OPTIONS = "options.json"


class Sink:
    """Where (checkpoint, chunk) blocks go: memory or shard files."""

    def has(self, ckpt: int, chunk: int) -> bool:
        """Whether the block is already there."""
        raise NotImplementedError

    def put(self, ckpt: int, chunk: int, block: np.ndarray) -> None:
        """Store a finished block."""
        raise NotImplementedError

    def get(self, ckpt: int, chunk: int) -> np.ndarray:
        """Return a stored block."""
        raise NotImplementedError

    def has_test(self, ckpt: int) -> bool:
        """Whether the test instances' squared gradient norms of ``ckpt`` are there."""
        raise NotImplementedError

    def put_test(self, ckpt: int, sq_norms: np.ndarray) -> None:
        """Store the test instances' squared gradient norms of ``ckpt``."""
        raise NotImplementedError

    def get_test(self, ckpt: int) -> np.ndarray:
        """Return the test instances' squared gradient norms of ``ckpt``."""
        raise NotImplementedError


class MemorySink(Sink):
    """Blocks kept in a dict (the in-memory API)."""

    def __init__(self) -> None:
        """Start empty."""
        self.blocks: dict[tuple[Any, int], np.ndarray] = {}

    def has(self, ckpt: int, chunk: int) -> bool:
        """Whether the block was computed."""
        return (ckpt, chunk) in self.blocks

    def put(self, ckpt: int, chunk: int, block: np.ndarray) -> None:
        """Keep the block."""
        self.blocks[(ckpt, chunk)] = block

    def get(self, ckpt: int, chunk: int) -> np.ndarray:
        """Return the block."""
        return self.blocks[(ckpt, chunk)]

    def has_test(self, ckpt: int) -> bool:
        """Whether the test norms were computed."""
        return ("test", ckpt) in self.blocks

    def put_test(self, ckpt: int, sq_norms: np.ndarray) -> None:
        """Keep the test norms."""
        self.blocks[("test", ckpt)] = sq_norms

    def get_test(self, ckpt: int) -> np.ndarray:
        """Return the test norms."""
        return self.blocks[("test", ckpt)]


def shard_name(ckpt: int, chunk: int) -> str:
    """File name of the shard of checkpoint ``ckpt`` (0-based) and training chunk ``chunk``."""
    return f"ckpt-{ckpt:02d}_chunk-{chunk:04d}.npy"


def norm_shard_name(ckpt: int) -> str:
    """File name of checkpoint ``ckpt``'s test squared gradient norms, float32 (n_test,)."""
    return f"ckpt-{ckpt:02d}_test-norms.npy"


class ShardSink(Sink):
    """Blocks as ``.npy`` shards in a folder, with the options they were computed with."""

    def __init__(self, folder: Path, options: dict[str, Any]) -> None:
        """Use ``folder``; refuse it if its shards were computed with other options.

        Shards are never deleted here: other options raise :class:`AtlasError` with one
        sentence naming the option that differs, and the user decides.
        """
        self.folder = folder
        opt_path = folder / SHARD_OPTIONS
        wanted = json.loads(json.dumps(options))
        if opt_path.exists():
            try:
                old = json.loads(opt_path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if old != wanted:
                raise AtlasError(
                    f"{folder} holds TracIn shards computed with {options_difference(old, wanted)}; "
                    "rerun with the options they were made with to finish them, or move that "
                    "folder away to start over."
                )
        elif folder.is_dir() and any(folder.glob("ckpt-*.npy")):
            raise AtlasError(
                f"{folder} holds TracIn shards without a record of their options "
                f"({SHARD_OPTIONS}); move that folder away to start over."
            )
        else:
            store.write_json(opt_path, options)
        self.options = wanted

    def path(self, ckpt: int, chunk: int) -> Path:
        """Shard file path."""
        return self.folder / shard_name(ckpt, chunk)

    def has(self, ckpt: int, chunk: int) -> bool:
        """Whether the shard file exists (writes are atomic, so it is complete)."""
        return self.path(ckpt, chunk).exists()

    def put(self, ckpt: int, chunk: int, block: np.ndarray) -> None:
        """Write the shard atomically."""
        store.write_npy(self.path(ckpt, chunk), block.astype(np.float32, copy=False))

    def get(self, ckpt: int, chunk: int) -> np.ndarray:
        """Read a shard."""
        return np.load(self.path(ckpt, chunk))

    def has_test(self, ckpt: int) -> bool:
        """Whether the test-norm shard exists."""
        return (self.folder / norm_shard_name(ckpt)).exists()

    def put_test(self, ckpt: int, sq_norms: np.ndarray) -> None:
        """Write the test-norm shard atomically."""
        store.write_npy(self.folder / norm_shard_name(ckpt), sq_norms.astype(np.float32))

    def get_test(self, ckpt: int) -> np.ndarray:
        """Read the test-norm shard."""
        return np.load(self.folder / norm_shard_name(ckpt))


# Shard options a user sets, by the command-line option that sets them: a refusal names the
# option to give, never an internal field (the factorized engine's ``identity`` flag, say).
_OPTION_FLAGS = {"project": "--project", "scope": "--params", "seed": "--seed", "dtype": "--dtype"}
# Fields that follow from the run's data or its training, in words.
_FIELD_WORDS = {
    "train_data": "other training instances",
    "test_data": "other test instances",
    "n_train": "another number of training instances",
    "n_test": "another number of test instances",
    "chunk_size": "another chunk size",
    "n_chunks": "another chunk size",
    "identity": "identity projections (a setting of the tests)",
}


def options_difference(old: Any, new: dict[str, Any]) -> str:
    """The first option in which ``old`` differs from ``new``, as a phrase for a sentence.

    Options a user sets come first and are named by their flag (``--project factorized:64
    (this request: no --project)``); the rest in words.
    """
    if not isinstance(old, dict):
        return "options that cannot be read"
    for key, flag in _OPTION_FLAGS.items():
        if old.get(key) != new.get(key):
            was, now = _flag_text(flag, old.get(key)), _flag_text(flag, new.get(key))
            return f"{was} (this request: {now})"
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in _FIELD_WORDS:
            return _FIELD_WORDS[key]
        if key == "checkpoints" and isinstance(old.get(key), list):
            olds, news = old[key], new.get(key) or []
            if len(olds) != len(news):
                return f"{len(olds)} checkpoints (this request has {len(news)})"
            for i, (a, b) in enumerate(zip(olds, news, strict=True)):
                if a != b:
                    return f"another checkpoint {i + 1} ({_describe(a)}; now {_describe(b)})"
        return f"{key} {old.get(key)!r} (this request: {new.get(key)!r})"
    return "other options"


def _flag_text(flag: str, value: Any) -> str:
    """An option as typed (``--project 64``), or ``no --project`` when it was not given."""
    return f"no {flag}" if value is None else f"{flag} {value}"


def _describe(ckpt: Any) -> str:
    """A checkpoint identity in words."""
    if isinstance(ckpt, dict):
        return f"lr {ckpt.get('lr')}, content {str(ckpt.get('sha1'))[:10]}"
    return f"recorded as {ckpt!r}"


def sum_blocks(
    sink: Sink,
    k: int,
    chunks: list[tuple[int, int]],
    n_test: int,
    n_train: int,
    per_checkpoint: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Sum the blocks over checkpoints into the matrix and self-influence (and the stack);
    also return the per-checkpoint self-influence terms η_i‖g_i‖², float32 (k, n_train)."""
    matrix = np.zeros((n_test, n_train), dtype=np.float32)
    self_inf = np.zeros(n_train, dtype=np.float32)
    self_per = np.zeros((k, n_train), dtype=np.float32)
    stack = np.zeros((k, n_test, n_train), dtype=np.float32) if per_checkpoint else None
    for ci in range(k):
        for c, (lo, hi) in enumerate(chunks):
            block = sink.get(ci, c)
            if block.shape != (n_test + 1, hi - lo):
                raise AtlasError(f"TracIn shard {shard_name(ci, c)} has an unexpected shape.")
            matrix[:, lo:hi] += block[:n_test]
            self_inf[lo:hi] += block[n_test]
            self_per[ci, lo:hi] = block[n_test]
            if stack is not None:
                stack[ci, :, lo:hi] = block[:n_test]
    return matrix, stack, self_inf, self_per


def unweighted_norms(weighted_sq: np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """‖g_i‖ from the η_i-weighted squared norms (k, n) and the learning rates (k,)."""
    lr = np.where(lrs != 0, lrs, 1.0)[:, None]
    return np.sqrt(np.maximum(weighted_sq / lr, 0.0)).astype(np.float32)


def write_per_checkpoint(
    shard_dir: str | os.PathLike,
    k: int,
    n_train: int,
    n_test: int,
    chunk_size: int,
    path: str | os.PathLike,
) -> None:
    """Write the float32 (k, n_test, n_train) stack from shards, one shard in memory at a time."""
    folder = Path(shard_dir)
    with store.atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(k, n_test, n_train)
        )
        for ci in range(k):
            for c, lo in enumerate(range(0, n_train, chunk_size)):
                hi = min(lo + chunk_size, n_train)
                out[ci, :, lo:hi] = np.load(folder / shard_name(ci, c))[:n_test].astype(np.float32)
        out.flush()
        del out
