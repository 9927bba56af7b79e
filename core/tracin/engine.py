"""The TracIn engine: :class:`TracInCP` computes the blocks of each checkpoint (see core.tracin)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.errors import AtlasError
from core.tracin.gradients import _CheckpointGrads
from core.tracin.inputs import _Data, _vocab_of
from core.tracin.projection import _Projector
from core.tracin.scopes import select_parameters
from core.tracin.shards import _aggregate, _MemorySink, _ShardSink, _Sink, _unweighted_norms
from core.tracin_options import parse_scope

# Test gradients per checkpoint are held up to this many bytes; beyond, test is chunked.
MAX_TEST_BYTES = 4 << 30
# Per-example gradients of one vmap batch are kept under about this many bytes.
BATCH_BYTES = 384 << 20
MAX_BATCH = 64
SEQ_BUDGET = 64  # tokens assumed per instance when sizing batches
# Training feature rows are gathered up to this many bytes before one matrix product.
BUFFER_BYTES = 384 << 20
MAX_BUFFER_ROWS = 512
CHUNK_SIZE = 512
# Every block is computed on this many torch threads, whatever the executor, the worker count
# or the machine's cores: some of ATen's CPU kernels cut their rows among the threads (measured:
# the softmax backward of attention, in both engines), so another thread count gives other last
# bits (~1e-9), and a near-tie could flip between a laptop and a cluster. More cores are used by
# running tasks side by side (``--executor processes`` or ``ray``), never inside one block.
THREADS = 1


class TopK(NamedTuple):
    """Top-k proponents (largest scores) and opponents (most negative) per test instance."""

    proponents: torch.Tensor  # (n_test, k) training indices
    proponent_scores: torch.Tensor  # (n_test, k)
    opponents: torch.Tensor  # (n_test, k) training indices
    opponent_scores: torch.Tensor  # (n_test, k)


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


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype for dot products from a dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise AtlasError(f"dtype must be one of {', '.join(names)} (got '{dtype}').")
    return names[dtype]


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` has native bfloat16 arithmetic for the dot products.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: the AVX512-BF16 or AMX
    instructions (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``).
    A CPU without them still runs bf16 matrix products, but emulated, slower than fp32 and
    no smaller in memory traffic than it saves, so that is counted as no support. Either way a
    trial product must run.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        native = bool(torch.cuda.is_bf16_supported())
    elif dev.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(
            bool(getattr(cpu, name, lambda: False)())
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    else:
        native = True  # other accelerators: the trial product decides
    if not native:
        return False
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16, device=dev)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def check_dtype(dtype: torch.dtype | str, device: torch.device | str) -> None:
    """Refuse a dot-product dtype the device cannot compute natively (one sentence)."""
    dt = _resolve_dtype(dtype)
    if dt == torch.bfloat16 and not bf16_native(device):
        raise AtlasError(
            f"--dtype bf16 needs native bfloat16 arithmetic, which {torch.device(device)} lacks "
            "(no AVX512-BF16/AMX on this CPU, or a GPU older than Ampere); use --dtype fp32."
        )
    if dt == torch.float16:
        raise AtlasError("float16 dot products are not offered; use --dtype fp32 or bf16.")


def _default_loader(path: str | os.PathLike, device: torch.device) -> nn.Module:
    """Load a saved Hugging Face classifier in eval mode."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise AtlasError(f"Could not load the checkpoint {path} ({exc}).") from None
    return model.to(device).eval()


class TracInCP:
    """TracIn over saved checkpoints, in the spirit of captum's ``TracInCP``.

    ``checkpoints`` is a list of (path or model, learning rate). ``influence`` gives the
    self-influence vector, the test × train matrix, or top-k proponents and opponents.
    """

    def __init__(
        self,
        checkpoints: Sequence[tuple[str | os.PathLike | nn.Module, float]],
        scope: str = "all",
        project: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        dtype: torch.dtype | str = torch.float32,
        chunk_size: int = CHUNK_SIZE,
        max_test_bytes: int = MAX_TEST_BYTES,
        loader: Callable[[Any, torch.device], nn.Module] | None = None,
    ) -> None:
        """Validate the options; checkpoints are loaded one at a time when needed."""
        if not checkpoints:
            raise AtlasError("TracIn needs at least one checkpoint.")
        self.checkpoints = []
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
            self.checkpoints.append((where, lr))
        parse_scope(scope)
        if project is not None and (isinstance(project, bool) or int(project) <= 0):
            raise AtlasError(
                f"The projection dimension must be a positive integer (got {project})."
            )
        if batch_size is not None and batch_size <= 0:
            raise AtlasError(f"batch_size must be positive (got {batch_size}).")
        if chunk_size <= 0:
            raise AtlasError(f"chunk_size must be positive (got {chunk_size}).")
        self.scope = scope
        self.project = None if project is None else int(project)
        self.seed = int(seed)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = _resolve_dtype(dtype)
        self.chunk_size = int(chunk_size)
        self.max_test_bytes = int(max_test_bytes)
        self.loader = loader or _default_loader
        self._projector = _Projector(self.project, self.seed, self.device) if self.project else None
        self.n_params: int | None = None

    # ---- public API

    def influence(
        self,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor] | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor | TopK:
        """Self-influence (test None), the (n_test, n_train) matrix, or top-k per test row."""
        if test is None:
            return torch.from_numpy(self.compute(train).self_influence)
        matrix = torch.from_numpy(self.compute(train, test).matrix)
        if top_k is None:
            return matrix
        k = int(top_k)
        if not 1 <= k <= matrix.shape[1]:
            raise AtlasError(f"top_k must be between 1 and {matrix.shape[1]} (got {top_k}).")
        pro = torch.topk(matrix, k, dim=1)
        opp = torch.topk(-matrix, k, dim=1)
        return TopK(pro.indices, pro.values, opp.indices, -opp.values)

    def influence_per_checkpoint(
        self, train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """η_i-weighted contribution of each checkpoint: (k, n_test, n_train)."""
        return torch.from_numpy(self.compute(train, test, per_checkpoint=True).per_checkpoint)

    def self_influence(self, train: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_i η_i ‖∇ℓ(w_i, z)‖² for every training instance."""
        return torch.from_numpy(self.compute(train).self_influence)

    def check(self) -> int:
        """Load the first checkpoint and check the scope selects parameters; return their count."""
        model = self._load(self.checkpoints[0][0])
        self.n_params = int(sum(p.numel() for _, p in select_parameters(model, self.scope)))
        return self.n_params

    def compute(
        self,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor] | None = None,
        *,
        per_checkpoint: bool = False,
        shard_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> TracInResult:
        """Compute the matrix (if ``test``), self-influence and optionally the per-checkpoint stack.

        With ``shard_dir`` every (checkpoint × train chunk) result is written there and
        skipped on a rerun; the result is aggregated from the shards at the end.
        """
        return compute_all(
            self, train, test, per_checkpoint=per_checkpoint, shard_dir=shard_dir, progress=progress
        )

    def compute_checkpoint(
        self,
        ci: int,
        tr: _Data,
        te: _Data | None,
        chunks: Sequence[tuple[int, int]],
        wanted: Iterable[int],
        sink: _Sink,
        on_block: Callable[[], None] | None = None,
    ) -> int:
        """Put checkpoint ``ci``'s blocks of the ``wanted`` chunks (and its test norms) in ``sink``.

        The one unit of work every executor runs (:meth:`compute` and
        :func:`core.tracin.compute` both come here): blocks already in ``sink`` are skipped,
        each block is ``η_ci`` × the (n_test + 1, chunk) dot products, and a block depends only
        on its checkpoint and chunk, never on which other chunks are computed with it.
        ``on_block`` is called once per chunk (present or computed). Returns the number of
        blocks computed.
        """
        where, lr = self.checkpoints[ci]
        wanted = list(wanted)
        missing = [c for c in wanted if not sink.has(ci, c)]
        need_test_norms = te is not None and not sink.has_test(ci)
        for _ in range(len(wanted) - len(missing)):
            if on_block is not None:
                on_block()
        if not missing and not need_test_norms:
            return 0
        with fixed_threads():  # the bits must not depend on where the block runs
            model = self._load(where)
            grads = _CheckpointGrads(model, self.scope, self.device, self._projector, self.dtype)
            self.n_params = grads.n_params
            n_test = te.n if te is not None else 0
            test_sq = np.full(n_test, np.nan, dtype=np.float32)
            blocks = self._checkpoint_blocks(grads, tr, te, list(chunks), missing, test_sq)
            for c, block in blocks:
                sink.put(ci, c, lr * block)
                if on_block is not None:
                    on_block()
            if need_test_norms:
                if np.isnan(test_sq).any():  # every training chunk was already there
                    test_sq = self._test_sq_norms(grads, te)
                sink.put_test(ci, test_sq)
            del grads, model
        return len(missing)

    def identity(self) -> list[dict[str, Any] | str]:
        """Each checkpoint by content (learning rate and SHA-1), never by path string."""
        from core.provenance import checkpoint_identity

        return [
            "<module>" if isinstance(w, nn.Module) else checkpoint_identity(w, lr)
            for w, lr in self.checkpoints
        ]

    # ---- internals

    def _load(self, where: Any) -> nn.Module:
        """A checkpoint's model on the engine's device, in eval mode."""
        if isinstance(where, nn.Module):
            return where.to(self.device).eval()
        if not Path(where).exists():
            raise AtlasError(f"The checkpoint {where} does not exist.")
        return self.loader(where, self.device)

    def _options(self, tr: _Data, te: _Data | None, n_chunks: int) -> dict[str, Any]:
        """What a shard depends on; shards computed with other options are not reused."""
        return {
            "scope": self.scope,
            "project": self.project,
            "seed": self.seed if self.project else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chunk_size": self.chunk_size,
            "n_chunks": n_chunks,
            "n_train": tr.n,
            "n_test": te.n if te is not None else 0,
            # By content: an absolute and a relative path to one checkpoint are the same.
            "checkpoints": self.identity(),
            "train_data": tr.fingerprint(),
            "test_data": te.fingerprint() if te is not None else None,
        }

    def _batch_size(self, grads: _CheckpointGrads) -> int:
        """Rows per vmap batch: bounded by the bytes of per-example gradients."""
        if self.batch_size is not None:
            return self.batch_size
        per_example = 4 * sum(p.numel() for p in grads.params.values())
        if grads.word_in_scope:
            per_example += 4 * SEQ_BUDGET * grads.hidden
        # vmap's output plus the copies made while flattening and casting.
        return int(max(1, min(MAX_BATCH, BATCH_BYTES // max(1, 2 * per_example))))

    def _buffer_rows(self, width: int, batch_size: int) -> int:
        """Training rows gathered before one matrix product (larger products run faster)."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return int(max(batch_size, min(MAX_BUFFER_ROWS, BUFFER_BYTES // max(1, width * elem))))

    def _checkpoint_blocks(
        self,
        grads: _CheckpointGrads,
        tr: _Data,
        te: _Data | None,
        chunks: list[tuple[int, int]],
        missing: list[int],
        test_sq: np.ndarray | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (chunk, float32 (n_test + 1, chunk) unweighted block) for the missing chunks.

        The test instances' squared gradient norms, a by-product of their features, are
        written into ``test_sq`` (n_test,) when given and some chunk is missing.
        """
        n_test = te.n if te is not None else 0

        def empty(c: int) -> np.ndarray:
            return np.zeros((n_test + 1, chunks[c][1] - chunks[c][0]), dtype=np.float32)

        if te is None:
            for c in missing:
                block = empty(c)
                self._score_chunk(grads, tr, chunks[c], None, None, block, None)
                yield c, block
            return
        if not missing:
            return
        test_parts = self._test_parts(grads, te)
        if len(test_parts) == 1:
            feats, vocab_pos, test_rows = self._test_features(grads, te, test_parts[0], test_sq)
            for c in missing:
                block = empty(c)
                self._score_chunk(grads, tr, chunks[c], feats, vocab_pos, block, test_rows)
                yield c, block
            return
        # Test gradients too big to hold at once: every test part revisits the training
        # chunks (recomputing their gradients), and blocks are yielded when complete.
        blocks = {c: empty(c) for c in missing}
        for part_no, part in enumerate(test_parts):
            feats, vocab_pos, test_rows = self._test_features(grads, te, part, test_sq)
            for c in missing:
                self._score_chunk(
                    grads, tr, chunks[c], feats, vocab_pos, blocks[c], test_rows, part_no == 0
                )
            del feats
        yield from blocks.items()

    def _test_parts(self, grads: _CheckpointGrads, te: _Data) -> list[np.ndarray]:
        """Split test rows so that each part's gradient features fit ``max_test_bytes``."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        if self.project:
            per_row = self.project * elem
        else:
            per_row = sum(p.numel() for p in grads.params.values()) * elem
            if grads.word_in_scope:
                per_row += _vocab_of(te, np.arange(te.n)).numel() * grads.hidden * elem
        n_parts = max(1, math.ceil(te.n * per_row / max(1, self.max_test_bytes)))
        return [a for a in np.array_split(np.arange(te.n), n_parts) if len(a)]

    def _test_sq_norms(self, grads: _CheckpointGrads, te: _Data) -> np.ndarray:
        """Squared gradient norms of every test instance (no features kept)."""
        out = np.empty(te.n, dtype=np.float32)
        for rows in te.batches(np.arange(te.n), self._batch_size(grads)):
            out[rows] = grads.features(te.take(rows, self.device), None, None).float().cpu()
        return out

    def _test_features(
        self,
        grads: _CheckpointGrads,
        te: _Data,
        part: np.ndarray,
        test_sq: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Features of the test rows ``part`` as (width, n), the vocabulary map, and the
        test indices of the n feature columns (length-sorted ``part``); squared norms go
        into ``test_sq`` when given."""
        vocab_pos = None
        if grads.word_in_scope and self.project is None:
            vocab = _vocab_of(te, part).to(self.device)
            vocab_pos = torch.full(
                (grads.word_weight.shape[0],), -1, dtype=torch.long, device=self.device
            )
            vocab_pos[vocab] = torch.arange(vocab.numel(), device=self.device)
        width = grads.width(vocab_pos)
        # Rows are filled in length order (contiguous slices); the permutation to ``part``
        # order is applied to the scores instead of to this big tensor.
        feats = torch.empty(len(part), width, dtype=self.dtype, device=self.device)
        order = []
        filled = 0
        for rows in te.batches(part, self._batch_size(grads)):
            sq = grads.features(
                te.take(rows, self.device), vocab_pos, feats[filled : filled + len(rows)]
            )
            if test_sq is not None:
                test_sq[rows] = sq.float().cpu().numpy()
            order.append(rows)
            filled += len(rows)
        # Returned transposed (a view): the products below are (rows × width) @ (width × n).
        return feats.T, vocab_pos, np.concatenate(order)

    def _score_chunk(
        self,
        grads: _CheckpointGrads,
        tr: _Data,
        chunk: tuple[int, int],
        feats: torch.Tensor | None,
        vocab_pos: torch.Tensor | None,
        block: np.ndarray,
        test_rows: np.ndarray | None,
        with_self: bool = True,
    ) -> None:
        """Fill ``block`` (rows: test, last row: self-influence) for one training chunk."""
        lo, hi = chunk
        bs = self._batch_size(grads)
        buf = None
        if feats is not None:
            n_rows = self._buffer_rows(feats.shape[0], bs)
            buf = torch.empty(n_rows, feats.shape[0], dtype=self.dtype, device=self.device)
        pending: list[np.ndarray] = []
        filled = 0

        def flush() -> None:
            nonlocal filled
            if buf is None or not filled:
                return
            cols = np.concatenate(pending) - lo
            scores = (buf[:filled] @ feats).float().cpu().numpy()  # (filled, n_test)
            block[np.ix_(test_rows, cols)] = scores.T
            pending.clear()
            filled = 0

        for rows in tr.batches(np.arange(lo, hi), bs):
            if buf is not None and filled + len(rows) > buf.shape[0]:
                flush()
            out = buf[filled : filled + len(rows)] if buf is not None else None
            sq = grads.features(tr.take(rows, self.device), vocab_pos, out)
            if with_self:
                block[-1, rows - lo] = sq.float().cpu().numpy()
            pending.append(rows)
            filled += len(rows)
        flush()


def compute_all(
    engine: Any,
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor] | None,
    *,
    per_checkpoint: bool,
    shard_dir: str | os.PathLike | None,
    progress: bool,
    desc: str = "tracin",
) -> TracInResult:
    """Every checkpoint × chunk through ``engine.compute_checkpoint``, then the aggregate.

    The one loop behind :meth:`TracInCP.compute` and the factorized engine's ``compute``:
    ``engine`` supplies ``checkpoints``, ``chunk_size``, ``_options``, ``compute_checkpoint``,
    ``check`` and ``n_params``. With ``shard_dir`` every block is a shard skipped on a rerun.
    """
    start = time.perf_counter()
    tr = _Data(train, "training")
    te = _Data(test, "test") if test is not None else None
    n_test = te.n if te is not None else 0
    size = engine.chunk_size
    chunks = [(s, min(s + size, tr.n)) for s in range(0, tr.n, size)]
    sink: _Sink
    if shard_dir is not None:
        sink = _ShardSink(Path(shard_dir), engine._options(tr, te, len(chunks)))
    else:
        sink = _MemorySink()
    k = len(engine.checkpoints)
    bar = tqdm(total=k * len(chunks), desc=desc, unit="shard", disable=not progress, leave=False)
    try:
        for ci in range(k):
            engine.compute_checkpoint(
                ci, tr, te, chunks, range(len(chunks)), sink, lambda: bar.update(1)
            )
    finally:
        bar.close()
    if engine.n_params is None:  # every shard was on disk
        engine.check()
    matrix, stack, self_inf, train_sq = _aggregate(sink, k, chunks, n_test, tr.n, per_checkpoint)
    lrs = np.array([lr for _, lr in engine.checkpoints], dtype=np.float64)
    test_norms = None
    if te is not None:
        test_sq = np.stack([sink.get_test(ci) for ci in range(k)])
        test_norms = np.sqrt(np.maximum(test_sq, 0.0)).astype(np.float32)
    return TracInResult(
        matrix=matrix if te is not None else None,
        per_checkpoint=stack,
        self_influence=self_inf,
        n_params=int(engine.n_params or 0),
        seconds=time.perf_counter() - start,
        train_grad_norms=_unweighted_norms(train_sq, lrs),
        test_grad_norms=test_norms,
    )
