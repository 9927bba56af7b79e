"""The engine family: the :class:`Engine` protocol and what its members share.

An engine computes TracIn over saved checkpoints, one (checkpoint × training chunk) block at
a time. The stage (:mod:`core.influence.stage`), every executor (through the stage's tasks),
the approximation study and the error study call only what :class:`Engine` declares; which
class serves a ``--project`` spec is decided by :mod:`core.influence.registry`.

:class:`Engine` is a protocol with default implementations (PEP 544): what every member does
the same way lives there once (the checkpoint list and its identity by content, loading a
checkpoint, the skip-present-blocks loop of :meth:`~Engine.compute_checkpoint` on
:data:`THREADS` torch threads, the in-memory or sharded :meth:`~Engine.compute`, the shard
options). A member supplies its own settings (:meth:`~Engine.options`) and one checkpoint's
blocks (:meth:`~Engine.fill_checkpoint`, given a :class:`CheckpointJob`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.influence.inputs import EncodedData
from core.influence.shards import MemorySink, ShardSink, Sink, sum_blocks, unweighted_norms
from core.storage.errors import AtlasError
from core.storage.provenance import checkpoint_identity

CHUNK_SIZE = 512
# Every block is computed on this many torch threads, whatever the executor, the worker count
# or the machine's cores: some of ATen's CPU kernels cut their rows among the threads (measured:
# the softmax backward of attention, in both engines), so another thread count gives other last
# bits (~1e-9), and a near-tie could flip between a laptop and a cluster. More cores are used by
# running tasks side by side (``--executor processes`` or ``ray``), never inside one block.
# Not two: two threads is torch's default on a 2-core machine and reproduced the shipped runs'
# arrays, but under load its splits varied from run to run (the per-checkpoint stack of a quick
# run differed between two runs of the same command), and one thread has no split at all.
THREADS = 1

Checkpoints = Sequence[tuple[str | os.PathLike | nn.Module, float]]
Loader = Callable[[Any, torch.device], nn.Module]


@dataclass
class TracInResult:
    """Everything one pass computes: summed matrix, per-checkpoint stack, self-influence."""

    matrix: np.ndarray | None  # float32 (n_test, n_train); None without test data
    per_checkpoint: np.ndarray | None  # float32 (k, n_test, n_train) when asked for
    self_influence: np.ndarray  # float32 (n_train,)
    n_params: int
    seconds: float
    # Unweighted per-checkpoint gradient norms ‖∇ℓ(w_i, z)‖ in the scope (projected when
    # a projection is on): what relative-influence and cosine normalisations divide by.
    train_grad_norms: np.ndarray | None = None  # float32 (k, n_train)
    test_grad_norms: np.ndarray | None = None  # float32 (k, n_test); None without test


@contextmanager
def fixed_threads(n: int = THREADS) -> Iterator[None]:
    """Run the enclosed arithmetic on ``n`` torch threads; the caller's count is restored after."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype for dot products from a dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise AtlasError(f"dtype must be one of {', '.join(names)} (got '{dtype}').")
    return names[dtype]


def resolve_engine_device(device: str | torch.device) -> torch.device:
    """``auto`` as CUDA when there is a GPU, else the CPU; any other name as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def default_loader(path: str | os.PathLike, device: torch.device) -> nn.Module:
    """Load a saved Hugging Face classifier in eval mode."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise AtlasError(f"Could not load the checkpoint {path} ({exc}).") from None
    return model.to(device).eval()


def checked_checkpoints(checkpoints: Checkpoints) -> list[tuple[Any, float]]:
    """``checkpoints`` as (path or model, finite float lr) pairs, or :class:`AtlasError`."""
    if not checkpoints:
        raise AtlasError("TracIn needs at least one checkpoint.")
    out: list[tuple[Any, float]] = []
    for entry in checkpoints:
        try:
            where, lr = entry
            lr = float(lr)
        except (TypeError, ValueError):
            raise AtlasError(
                f"A checkpoint must be (path, learning rate), got {entry!r}."
            ) from None
        if not math.isfinite(lr):
            raise AtlasError(f"The learning rate of checkpoint {where} is not finite.")
        out.append((where, lr))
    return out


def check_sizes(batch_size: int | None, chunk_size: int) -> None:
    """Refuse a non-positive batch or chunk size (one sentence)."""
    if batch_size is not None and batch_size <= 0:
        raise AtlasError(f"batch_size must be positive (got {batch_size}).")
    if chunk_size <= 0:
        raise AtlasError(f"chunk_size must be positive (got {chunk_size}).")


@dataclass
class CheckpointJob:
    """One checkpoint's missing blocks, as :meth:`Engine.fill_checkpoint` computes them.

    ``chunks`` are every training chunk's [lo, hi) rows, ``missing`` the chunk numbers to
    compute; ``need_test``: the test instances' squared norms are to be stored too.
    """

    ci: int
    lr: float
    tr: EncodedData
    te: EncodedData | None
    chunks: Sequence[tuple[int, int]]
    missing: list[int]
    need_test: bool
    sink: Sink
    on_block: Callable[[], None] | None

    def put(self, chunk: int, block: np.ndarray) -> None:
        """Store ``η_ci`` × an unweighted (n_test + 1, chunk) block; count it for progress."""
        self.sink.put(self.ci, chunk, self.lr * block)
        if self.on_block is not None:
            self.on_block()

    def put_test(self, sq_norms: np.ndarray) -> None:
        """Store the test instances' (unweighted) squared gradient norms."""
        self.sink.put_test(self.ci, sq_norms)


class Engine(Protocol):
    """A TracIn engine: what the stage, the executors' tasks and the studies call.

    A member subclasses this protocol explicitly and inherits the shared implementations
    below (PEP 544: a protocol's methods are defaults for its explicit subclasses); it sets the
    attributes in its ``__init__`` and supplies :meth:`from_projection`, :meth:`options`,
    :meth:`check` and :meth:`fill_checkpoint`.
    """

    checkpoints: list[tuple[Any, float]]  # (path or model, learning rate)
    chunk_size: int  # training instances per block
    device: torch.device
    dtype: torch.dtype  # of the dot products
    loader: Loader
    n_params: int | None  # parameters covered; None until a checkpoint was loaded
    progress_label: str = "tracin"  # the progress bar's name

    # ---- what a member supplies

    @classmethod
    def from_projection(
        cls, checkpoints: Checkpoints, scope: str, dim: int | None, seed: int, **options: Any
    ) -> Engine:
        """The engine of a parsed ``--project`` spec (``dim`` None: no projection)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """What the scores depend on besides data and checkpoints: ``scope``, ``project`` (as
        the manifest records it), ``seed``, ``dtype``, ``chunk_size`` (and any setting of the
        member's own), in the order ``tracin_shards/options.json`` records them."""
        raise NotImplementedError

    def check(self) -> int:
        """Load the first checkpoint and check the engine covers it; return its parameter count."""
        raise NotImplementedError

    def fill_checkpoint(self, model: nn.Module, job: CheckpointJob) -> None:
        """Put the blocks of ``job.missing`` (:meth:`CheckpointJob.put`) and, when
        ``job.need_test``, the test norms (:meth:`CheckpointJob.put_test`) of ``model``."""
        raise NotImplementedError

    # ---- shared

    def shard_options(
        self, tr: EncodedData, te: EncodedData | None, n_chunks: int
    ) -> dict[str, Any]:
        """What a shard depends on; shards computed with other options are not reused."""
        return {
            **self.options(),
            "n_chunks": n_chunks,
            "n_train": tr.n,
            "n_test": te.n if te is not None else 0,
            # By content: an absolute and a relative path to one checkpoint are the same (the
            # run stage's plan reads lr and sha1).
            "checkpoints": self.identity(),
            "train_data": tr.fingerprint(),
            "test_data": te.fingerprint() if te is not None else None,
        }

    def identity(self) -> list[dict[str, Any] | str]:
        """Each checkpoint by content (learning rate and SHA-1), never by path string."""
        return [
            "<module>" if isinstance(w, nn.Module) else checkpoint_identity(w, lr)
            for w, lr in self.checkpoints
        ]

    def load(self, where: Any) -> nn.Module:
        """A checkpoint's model on the engine's device, in eval mode."""
        if isinstance(where, nn.Module):
            return where.to(self.device).eval()
        if not Path(where).exists():
            raise AtlasError(f"The checkpoint {where} does not exist.")
        return self.loader(where, self.device)

    def compute_checkpoint(
        self,
        ci: int,
        tr: EncodedData,
        te: EncodedData | None,
        chunks: Sequence[tuple[int, int]],
        wanted: Iterable[int],
        sink: Sink,
        on_block: Callable[[], None] | None = None,
    ) -> int:
        """Put checkpoint ``ci``'s blocks of the ``wanted`` chunks (and its test norms) in ``sink``.

        The one unit of work every executor runs (:meth:`compute` and
        :func:`core.influence.compute` both come here): blocks already in ``sink`` are skipped,
        each block is ``η_ci`` × the (n_test + 1, chunk) dot products, and a block depends only
        on its checkpoint and chunk, never on which other chunks are computed with it.
        ``on_block`` is called once per chunk (present or computed). Returns the number of
        blocks computed.
        """
        where, lr = self.checkpoints[ci]
        wanted = list(wanted)
        missing = [c for c in wanted if not sink.has(ci, c)]
        need_test = te is not None and not sink.has_test(ci)
        for _ in range(len(wanted) - len(missing)):
            if on_block is not None:
                on_block()
        if not missing and not need_test:
            return 0
        job = CheckpointJob(ci, lr, tr, te, chunks, missing, need_test, sink, on_block)
        with fixed_threads():  # the bits must not depend on where the block runs
            self.fill_checkpoint(self.load(where), job)
        return len(missing)

    def compute(
        self,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor] | None = None,
        *,
        per_checkpoint: bool = False,
        shard_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> TracInResult:
        """Compute the matrix (if ``test``), self-influence, the unweighted gradient norms and
        optionally the per-checkpoint stack: every checkpoint × chunk through
        :meth:`compute_checkpoint`, then the aggregate.

        With ``shard_dir`` every (checkpoint × train chunk) result is written there and
        skipped on a rerun; the result is aggregated from the shards at the end.
        """
        start = time.perf_counter()
        tr = EncodedData(train, "training")
        te = EncodedData(test, "test") if test is not None else None
        n_test = te.n if te is not None else 0
        size = self.chunk_size
        chunks = [(s, min(s + size, tr.n)) for s in range(0, tr.n, size)]
        sink: Sink
        if shard_dir is not None:
            sink = ShardSink(Path(shard_dir), self.shard_options(tr, te, len(chunks)))
        else:
            sink = MemorySink()
        k = len(self.checkpoints)
        bar = tqdm(
            total=k * len(chunks),
            desc=self.progress_label,
            unit="shard",
            disable=not progress,
            leave=False,
        )
        try:
            for ci in range(k):
                self.compute_checkpoint(
                    ci, tr, te, chunks, range(len(chunks)), sink, lambda: bar.update(1)
                )
        finally:
            bar.close()
        if self.n_params is None:  # every shard was on disk
            self.check()
        matrix, stack, self_inf, train_sq = sum_blocks(
            sink, k, chunks, n_test, tr.n, per_checkpoint
        )
        lrs = np.array([lr for _, lr in self.checkpoints], dtype=np.float64)
        test_norms = None
        if te is not None:
            test_sq = np.stack([sink.get_test(ci) for ci in range(k)])
            test_norms = np.sqrt(np.maximum(test_sq, 0.0)).astype(np.float32)
        return TracInResult(
            matrix=matrix if te is not None else None,
            per_checkpoint=stack,
            self_influence=self_inf,
            n_params=int(self.n_params or 0),
            seconds=time.perf_counter() - start,
            train_grad_norms=unweighted_norms(train_sq, lrs),
            test_grad_norms=test_norms,
        )
