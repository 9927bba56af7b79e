"""The TracIn engine: :class:`TracInCP` computes the blocks of each checkpoint (see core.influence)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from core.influence.base import (
    CHUNK_SIZE,
    CheckpointJob,
    Checkpoints,
    Engine,
    check_sizes,
    checked_checkpoints,
    default_loader,
    resolve_dtype,
    resolve_engine_device,
)
from core.influence.gradients import CheckpointGrads
from core.influence.inputs import EncodedData, vocab_of
from core.influence.projection import Projector
from core.influence.scopes import select_parameters
from core.options.tracin_options import DENSE, parse_scope
from core.storage.errors import AtlasError

# Test gradients per checkpoint are held up to this many bytes; beyond, test is chunked.
MAX_TEST_BYTES = 4 << 30
# Per-example gradients of one vmap batch are kept under about this many bytes.
BATCH_BYTES = 384 << 20
MAX_BATCH = 64
SEQ_BUDGET = 64  # tokens assumed per instance when sizing batches
# Training feature rows are gathered up to this many bytes before one matrix product.
BUFFER_BYTES = 384 << 20
MAX_BUFFER_ROWS = 512


class _TestPart(NamedTuple):
    """One part of the test rows as the exact engine scores training chunks against it."""

    feats: torch.Tensor  # (width, n) gradient features, one column per test row
    vocab_pos: torch.Tensor | None  # vocabulary → feature row, for a word-embedding scope
    rows: np.ndarray  # the test row of each of the n columns


class TopK(NamedTuple):
    """Top-k proponents (largest scores) and opponents (most negative) per test instance."""

    proponents: torch.Tensor  # (n_test, k) training indices
    proponent_scores: torch.Tensor  # (n_test, k)
    opponents: torch.Tensor  # (n_test, k) training indices
    opponent_scores: torch.Tensor  # (n_test, k)


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
    dt = resolve_dtype(dtype)
    if dt == torch.bfloat16 and not bf16_native(device):
        raise AtlasError(
            f"--dtype bf16 needs native bfloat16 arithmetic, which {torch.device(device)} lacks "
            "(no AVX512-BF16/AMX on this CPU, or a GPU older than Ampere); use --dtype fp32."
        )
    if dt == torch.float16:
        raise AtlasError("float16 dot products are not offered; use --dtype fp32 or bf16.")


class TracInCP(Engine):
    """TracIn over saved checkpoints, in the spirit of captum's ``TracInCP``.

    ``checkpoints`` is a list of (path or model, learning rate). ``influence`` gives the
    self-influence vector, the test × train matrix, or top-k proponents and opponents.
    """

    def __init__(
        self,
        checkpoints: Checkpoints,
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
        self.checkpoints = checked_checkpoints(checkpoints)
        parse_scope(scope)
        if project is not None and (isinstance(project, bool) or int(project) <= 0):
            raise AtlasError(
                f"The projection dimension must be a positive integer (got {project})."
            )
        check_sizes(batch_size, chunk_size)
        self.scope = scope
        self.project = None if project is None else int(project)
        self.seed = int(seed)
        self.device = resolve_engine_device(device)
        self.batch_size = batch_size
        self.dtype = resolve_dtype(dtype)
        self.chunk_size = int(chunk_size)
        self.max_test_bytes = int(max_test_bytes)
        self.loader = loader or default_loader
        self._projector = Projector(self.project, self.seed, self.device) if self.project else None
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

    @classmethod
    def from_projection(
        cls, checkpoints: Checkpoints, scope: str, dim: int | None, seed: int, **options: Any
    ) -> TracInCP:
        """Exact gradients of ``scope`` (``dim`` None), or their dense projection to ``dim``."""
        return cls(checkpoints, scope=scope, project=dim, seed=seed, **options)

    def options(self) -> dict[str, Any]:
        """Scope, dense dimension (None: exact), seed (with a projection), dtype, chunk size."""
        return {
            "scope": self.scope,
            "project": None if self.project is None else DENSE.record(self.project),
            "seed": self.seed if self.project else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chunk_size": self.chunk_size,
        }

    def check(self) -> int:
        """Load the first checkpoint and check the scope selects parameters; return their count."""
        model = self.load(self.checkpoints[0][0])
        self.n_params = int(sum(p.numel() for _, p in select_parameters(model, self.scope)))
        return self.n_params

    # ---- internals

    def fill_checkpoint(self, model: nn.Module, job: CheckpointJob) -> None:
        """Blocks from the scope's (projected) per-example gradients; the test norms are a
        by-product of the test features, computed alone when no chunk was missing."""
        grads = CheckpointGrads(model, self.scope, self.device, self._projector, self.dtype)
        self.n_params = grads.n_params
        te = job.te
        test_sq = np.full(te.n if te is not None else 0, np.nan, dtype=np.float32)
        blocks = self._checkpoint_blocks(grads, job.tr, te, list(job.chunks), job.missing, test_sq)
        for c, block in blocks:
            job.put(c, block)
        if job.need_test:
            if np.isnan(test_sq).any():  # every training chunk was already there
                test_sq = self._test_sq_norms(grads, te)
            job.put_test(test_sq)

    def _batch_size(self, grads: CheckpointGrads) -> int:
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
        grads: CheckpointGrads,
        tr: EncodedData,
        te: EncodedData | None,
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
                self._score_chunk(grads, tr, chunks[c], None, block)
                yield c, block
            return
        if not missing:
            return
        test_parts = self._test_parts(grads, te)
        if len(test_parts) == 1:
            test = self._test_features(grads, te, test_parts[0], test_sq)
            for c in missing:
                block = empty(c)
                self._score_chunk(grads, tr, chunks[c], test, block)
                yield c, block
            return
        # Test gradients too big to hold at once: every test part revisits the training
        # chunks (recomputing their gradients), and blocks are yielded when complete.
        blocks = {c: empty(c) for c in missing}
        for part_no, part in enumerate(test_parts):
            test = self._test_features(grads, te, part, test_sq)
            for c in missing:
                self._score_chunk(grads, tr, chunks[c], test, blocks[c], part_no == 0)
            del test  # frees this part's features before the next part's are computed
        yield from blocks.items()

    def _test_parts(self, grads: CheckpointGrads, te: EncodedData) -> list[np.ndarray]:
        """Split test rows so that each part's gradient features fit ``max_test_bytes``."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        if self.project:
            per_row = self.project * elem
        else:
            per_row = sum(p.numel() for p in grads.params.values()) * elem
            if grads.word_in_scope:
                per_row += vocab_of(te, np.arange(te.n)).numel() * grads.hidden * elem
        n_parts = max(1, math.ceil(te.n * per_row / max(1, self.max_test_bytes)))
        return [a for a in np.array_split(np.arange(te.n), n_parts) if len(a)]

    def _test_sq_norms(self, grads: CheckpointGrads, te: EncodedData) -> np.ndarray:
        """Squared gradient norms of every test instance (no features kept)."""
        out = np.empty(te.n, dtype=np.float32)
        for rows in te.batches(np.arange(te.n), self._batch_size(grads)):
            out[rows] = grads.features(te.take(rows, self.device), None, None).float().cpu()
        return out

    def _test_features(
        self,
        grads: CheckpointGrads,
        te: EncodedData,
        part: np.ndarray,
        test_sq: np.ndarray | None = None,
    ) -> _TestPart:
        """The features of the test rows ``part`` (columns in length-sorted ``part`` order);
        squared norms go into ``test_sq`` when given."""
        vocab_pos = None
        if grads.word_in_scope and self.project is None:
            vocab = vocab_of(te, part).to(self.device)
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
        return _TestPart(feats.T, vocab_pos, np.concatenate(order))

    def _score_chunk(
        self,
        grads: CheckpointGrads,
        tr: EncodedData,
        chunk: tuple[int, int],
        test: _TestPart | None,
        block: np.ndarray,
        with_self: bool = True,
    ) -> None:
        """Fill ``block`` (rows: test, last row: self-influence) for one training chunk;
        without ``test`` only the self-influence row."""
        feats, vocab_pos, test_rows = test if test is not None else (None, None, None)
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
