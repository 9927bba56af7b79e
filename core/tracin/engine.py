"""TracIn engine: influence matrices, self-influence and top-k over saved checkpoints.

``TracIn(z, z') = Σ_i η_i ∇ℓ(w_i, z) · ∇ℓ(w_i, z')`` (Pruthi et al. 2020, TracInCP), with ℓ
the per-instance cross-entropy in eval mode (no dropout). See ../shared/DESIGN.md.

How it is computed, per checkpoint:

- Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``)
  over length-sorted mini-batches. The model receives ``inputs_embeds`` and a precomputed
  4-D additive attention mask, because transformers' 2-D mask helper has data-dependent
  control flow that ``vmap`` cannot trace. Padding columns are masked as keys and cut off
  per batch, so an instance scores the same alone or inside a padded batch.
- The word-embedding matrix is never differentiated densely: the gradient with respect
  to the looked-up embeddings (L × H per instance) is the whole story, because row ``v``
  of the matrix gradient is the sum over the instance's tokens with id ``v``. For the
  test × train matrix only rows that occur in the test instances can contribute, so the
  word part is a dense block over that vocabulary subset; self-influence uses the exact
  same-token identity ``Σ_{t,t'} [id_t = id_t'] e_t·e_t'``. Both are exact.
- Test gradients are held once per checkpoint (split into test chunks only if they would
  exceed ``max_test_bytes``); training instances stream through in chunks, so memory never
  holds n_train × parameters. Scores are matrix products per parameter.
- An optional random projection (Gaussian / sqrt(dim)) replaces each gradient by a
  ``dim``-vector. Each parameter's projection matrix is generated in row blocks, each from
  its own ``torch.Generator`` seeded by (seed, parameter name, block), so memory stays
  bounded and every checkpoint, device and run sees the same projection for a seed.
  Projection costs ``dim`` multiply-adds per gradient entry, so it saves time only when
  ``dim`` is below the number of test instances; its purpose is bounded memory for models
  whose test gradients do not fit.

Work is split into shards (checkpoint × chunk of training instances), each written to
``tracin_shards/ckpt-XX_chunk-YYYY.npy`` as float32 ``(n_test + 1, chunk)``: rows 0..n_test-1
hold ``η_i`` × the gradient dot products, the last row ``η_i`` × the squared gradient norms
(self-influence). Present shards are skipped, so a killed run resumes, and the result is
aggregated only when all exist. ``tracin_shards/options.json`` records what the shards were
computed with; shards of other options are discarded.

Parameter scopes (``select_parameters``):

- ``all``: every parameter (the definition).
- ``no-word-embeddings``: all but the word-embedding matrix.
- ``last-N``: the last N encoder layers, the pooler and the classifier.
- ``head``: the classifier only (the linear layer on the pooled feature). The pooler is left
  out so that ``head`` is exactly the linear head of DESIGN.md's binary identity
  ``2·e·e'·(h·h' + 1)``; ``last-N`` is the scope that adds the pooler.

Default scope per preset (core/config.py): ``quick`` uses ``all`` (exact; the tiny model's
word part is small because only test-vocabulary rows count); ``paper`` uses
``no-word-embeddings`` (MiniLM's word matrix is half its parameters; its error is measured
by :func:`compare_to_exact`).

The engine assumes BERT-like Hugging Face classifiers: ``get_input_embeddings()``, an
``inputs_embeds`` argument, right padding, and no weight tying of the word embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core import store
from core.errors import AtlasError
from core.tracin_options import parse_scope

# Elements of one generated projection block (16 MiB in float32): bounds generation memory.
PROJECTION_BLOCK_ELEMS = 1 << 22
# Projection blocks are cached across batches and checkpoints up to this many bytes.
PROJECTION_CACHE_BYTES = 1 << 30
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
SHARD_OPTIONS = "options.json"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


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


# --------------------------------------------------------------------------- scopes


def _word_embedding_name(model: nn.Module) -> str | None:
    """Name of the word-embedding matrix parameter (None if the model has none)."""
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    for name, param in model.named_parameters():
        if param is weight:
            return name
    return None


def select_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """Return the (name, parameter) pairs of ``scope``, in the model's order.

    Raises :class:`AtlasError` for an unknown scope or one that selects nothing.
    """
    kind, n_last = parse_scope(scope)
    named = [(n, p) for n, p in model.named_parameters()]
    word = _word_embedding_name(model)
    embed_prefix = word.rsplit(".", 2)[0] + "." if word and word.count(".") >= 2 else None
    base = getattr(model, "base_model_prefix", "") or ""
    if kind == "all":
        chosen = named
    elif kind == "no-word-embeddings":
        chosen = [(n, p) for n, p in named if n != word]
    elif kind == "head":
        # Parameters outside the base encoder: the classification layer.
        chosen = [(n, p) for n, p in named if not (base and n.startswith(base + "."))]
    else:
        layers = {int(m.group(1)) for n, _ in named if (m := _LAYER_RE.search(n))}
        if not layers:
            raise AtlasError(f"Scope '{scope}' needs encoder layers, but the model has none.")
        if n_last > len(layers):
            raise AtlasError(
                f"Scope '{scope}' asks for {n_last} layers but the model has {len(layers)}."
            )
        keep = set(sorted(layers)[-n_last:])
        chosen = []
        for n, p in named:
            m = _LAYER_RE.search(n)
            if m:
                if int(m.group(1)) in keep:
                    chosen.append((n, p))
            elif not (n == word or (embed_prefix and n.startswith(embed_prefix))):
                chosen.append((n, p))  # pooler and classifier
    if not chosen:
        raise AtlasError(f"Scope '{scope}' selects no parameters of this model.")
    return chosen


# ----------------------------------------------------------------------- projection


class _Projector:
    """Seeded Gaussian projection to ``dim``, generated in row blocks per parameter."""

    def __init__(self, dim: int, seed: int, device: torch.device) -> None:
        """Remember the dimension, seed and device; blocks are made on first use."""
        self.dim = dim
        self.seed = seed
        self.device = device
        self.scale = 1.0 / math.sqrt(dim)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0

    def _layout(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(rows, row size, rows per block) of a parameter of ``shape``."""
        rows = int(shape[0]) if len(shape) else 1
        row_size = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        per_block = max(1, PROJECTION_BLOCK_ELEMS // (row_size * self.dim))
        return rows, row_size, per_block

    def _block(self, name: str, shape: Sequence[int], b: int) -> torch.Tensor:
        """Projection block ``b`` of parameter ``name``: (dim, rows_in_block × row size)."""
        key = (name, b)
        if key in self._cache:
            return self._cache[key]
        rows, row_size, per_block = self._layout(shape)
        n_rows = min(per_block, rows - b * per_block)
        # A generator per block, seeded from (seed, name, block), makes the projection
        # independent of the order in which blocks are needed.
        crc = zlib.crc32(name.encode("utf-8"))
        block_seed = ((self.seed * 1_000_003 + crc) * 1_000_033 + b) % (2**63 - 1)
        gen = torch.Generator(device="cpu").manual_seed(block_seed)
        block = torch.randn(self.dim, n_rows * row_size, generator=gen).mul_(self.scale)
        block = block.to(self.device)
        nbytes = block.numel() * block.element_size()
        if self._cached_bytes + nbytes <= PROJECTION_CACHE_BYTES:
            self._cache[key] = block
            self._cached_bytes += nbytes
        return block

    def project(self, name: str, shape: Sequence[int], grads: torch.Tensor) -> torch.Tensor:
        """Project dense per-example gradients (B, numel) to (B, dim)."""
        rows, row_size, per_block = self._layout(shape)
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device)
        for b in range(math.ceil(rows / per_block)):
            lo = b * per_block * row_size
            hi = min(rows, (b + 1) * per_block) * row_size
            out.addmm_(grads[:, lo:hi], self._block(name, shape, b).T)
        return out

    def project_rows(
        self, name: str, shape: Sequence[int], rows_idx: torch.Tensor, grads: torch.Tensor
    ) -> torch.Tensor:
        """Project gradients nonzero only on sorted rows ``rows_idx``: (B, k, row size) → (B, dim).

        Equals :meth:`project` of the dense gradient, without materialising it.
        """
        _, row_size, per_block = self._layout(shape)
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device)
        block_of = rows_idx // per_block
        for b in torch.unique(block_of).tolist():
            sel = (block_of == b).nonzero().squeeze(1)
            local = rows_idx[sel] - b * per_block
            block = self._block(name, shape, b).view(self.dim, -1, row_size)
            r = block.index_select(1, local).reshape(self.dim, -1)
            out.addmm_(grads.index_select(1, sel).reshape(grads.shape[0], -1), r.T)
        return out


# -------------------------------------------------------------------------- inputs


class _Data:
    """Encoded instances on the CPU, handed out as trimmed, length-sorted device batches."""

    def __init__(self, data: dict[str, torch.Tensor], what: str) -> None:
        """Validate the tensors of ``data`` ('input_ids', 'attention_mask', 'labels', ...)."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in data:
                raise AtlasError(f"The {what} data has no '{key}' tensor.")
        ids = torch.as_tensor(data["input_ids"]).long().cpu()
        mask = torch.as_tensor(data["attention_mask"]).long().cpu()
        labels = torch.as_tensor(data["labels"]).long().cpu().reshape(-1)
        if ids.ndim != 2 or mask.shape != ids.shape or labels.shape[0] != ids.shape[0]:
            raise AtlasError(
                f"The {what} data must hold input_ids and attention_mask of one shape (n, L) "
                "and n labels."
            )
        if ids.shape[0] == 0:
            raise AtlasError(f"The {what} data holds no instances.")
        self.ids = ids
        self.mask = mask
        self.labels = labels
        tt = data.get("token_type_ids")
        self.token_types = None if tt is None else torch.as_tensor(tt).long().cpu()
        # Right padding: the used width of a row is one past its last real token.
        idx = torch.arange(ids.shape[1]).expand_as(mask)
        self.widths = ((idx + 1) * (mask > 0)).max(dim=1).values.numpy()
        self.n = ids.shape[0]

    def batches(self, index: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Yield sub-arrays of ``index``, sorted by width so little padding is computed."""
        order = index[np.argsort(self.widths[index], kind="stable")]
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def take(self, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors of ``rows`` cut to their widest row and moved to ``device``."""
        width = max(1, int(self.widths[rows].max()))
        sel = torch.as_tensor(rows, dtype=torch.long)
        out = {
            "input_ids": self.ids[sel, :width].to(device),
            "attention_mask": self.mask[sel, :width].to(device),
            "labels": self.labels[sel].to(device),
        }
        if self.token_types is not None:
            out["token_type_ids"] = self.token_types[sel, :width].to(device)
        return out

    def fingerprint(self) -> str:
        """Short hash of the tensors, so shards of other data are never reused."""
        h = hashlib.sha1()
        for t in (self.ids, self.mask, self.labels, self.token_types):
            if t is not None:
                h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


# ------------------------------------------------------------ per-checkpoint gradients


class _Features(NamedTuple):
    """Gradient features of a set of instances at one checkpoint, one tensor per slot."""

    slots: list[torch.Tensor]  # each (n, d_slot), in the engine's dot-product dtype


class _CheckpointGrads:
    """Per-example gradients of one checkpoint's scope, as dot-product features."""

    def __init__(
        self,
        model: nn.Module,
        scope: str,
        device: torch.device,
        projector: _Projector | None,
        dtype: torch.dtype,
    ) -> None:
        """Select the scope's parameters and build the vmapped gradient function."""
        from torch.func import functional_call, grad, vmap

        if hasattr(model, "set_attn_implementation"):
            # SDPA kernels have no vmap batching rule (they fall back to a slow loop).
            # Models without the eager switch keep their default.
            with contextlib.suppress(Exception):
                model.set_attn_implementation("eager")
        model.eval()
        self.model = model
        self.device = device
        self.projector = projector
        self.dtype = dtype
        chosen = select_parameters(model, scope)
        self.n_params = int(sum(p.numel() for _, p in chosen))
        self.word_name = _word_embedding_name(model)
        names = [n for n, _ in chosen]
        self.word_in_scope = self.word_name in names
        self.dense_names = [n for n in names if n != self.word_name]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        all_params = dict(model.named_parameters())
        self.params = {n: all_params[n].detach() for n in self.dense_names}
        consts = {n: p.detach() for n, p in all_params.items() if n not in self.params}
        consts.update({n: b.detach() for n, b in model.named_buffers()})
        self.word_weight = model.get_input_embeddings().weight.detach()
        self.hidden = self.word_weight.shape[1]

        def loss(params, embeds, mask_add, token_types, label):
            kwargs = {
                "inputs_embeds": embeds[None],
                "attention_mask": mask_add[None, None, None, :],
            }
            if token_types is not None:
                kwargs["token_type_ids"] = token_types[None]
            out = functional_call(model, (params, consts), args=(), kwargs=kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            return F.cross_entropy(logits.float(), label[None])

        argnums = (0, 1) if self.word_in_scope else 0
        self._fn = vmap(grad(loss, argnums=argnums), in_dims=(None, 0, 0, 0, 0))
        self._fn_no_tt = vmap(grad(loss, argnums=argnums), in_dims=(None, 0, 0, None, 0))

    def per_example(self, batch: dict[str, torch.Tensor]):
        """Per-example gradients: ({name: (B, numel)}, embedding gradients (B, L, H) or None)."""
        ids = batch["input_ids"]
        mask = batch["attention_mask"]
        embeds = F.embedding(ids, self.word_weight)
        # Additive key mask, as transformers builds it: 0 to attend, the dtype's min to not.
        mask_add = (1.0 - mask.to(embeds.dtype)) * torch.finfo(embeds.dtype).min
        tt = batch.get("token_type_ids")
        fn = self._fn if tt is not None else self._fn_no_tt
        out = fn(self.params, embeds, mask_add, tt, batch["labels"])
        grads, embed_grads = out if self.word_in_scope else (out, None)
        b = ids.shape[0]
        flat = {n: grads[n].reshape(b, -1) for n in self.dense_names}
        return flat, embed_grads

    def _word_rows(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        embed_grads: torch.Tensor,
        pos: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum embedding gradients per (instance, row slot) into (B, n_slots, H); pos < 0 drops.

        ``out`` (B, n_slots × H), e.g. a slice of the feature buffer, is overwritten in place.
        """
        b = ids.shape[0]
        n_slots = int(pos.max().item()) + 1 if pos.numel() else 0
        slot = pos[ids]
        keep = (slot >= 0) & (mask > 0)
        if out is None:
            out = torch.zeros(b, n_slots * self.hidden, device=ids.device)
        else:
            out.zero_()
        target = out.view(b, n_slots, self.hidden)
        inst = torch.arange(b, device=ids.device)[:, None].expand_as(slot)
        target.index_put_(
            (inst[keep], slot[keep]), embed_grads[keep].to(out.dtype), accumulate=True
        )
        return target

    def width(self, vocab_pos: torch.Tensor | None) -> int:
        """Length of a feature row: scope parameters (word part: ``vocab_pos`` rows) or ``dim``."""
        if self.projector is not None:
            return self.projector.dim
        width = sum(p.numel() for p in self.params.values())
        if self.word_in_scope and vocab_pos is not None:
            width += (int(vocab_pos.max().item()) + 1) * self.hidden
        return width

    def features(
        self,
        batch: dict[str, torch.Tensor],
        vocab_pos: torch.Tensor | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write a batch's gradient features into ``out`` (B, width); return squared norms.

        ``vocab_pos`` maps word ids to row slots of the word part (-1: not needed); None
        leaves the word part out of the features (it still counts in the norms). With
        ``out`` None only the norms (float32 self-influence terms) are computed.
        """
        flat, embed_grads = self.per_example(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.projector is not None:
            proj = self._project(flat, embed_grads, ids, mask)
            if out is not None:
                out.copy_(proj)
            return torch.linalg.vector_norm(proj, dim=1).square()
        sq = torch.zeros(ids.shape[0], device=ids.device)
        offset = 0
        for n in self.dense_names:
            g = flat[n]
            sq += torch.linalg.vector_norm(g, dim=1).square()
            if out is not None:
                out[:, offset : offset + g.shape[1]].copy_(g)
            offset += g.shape[1]
        if embed_grads is not None:
            # ‖Σ_t e_t 1[id_t]‖² over the vocabulary = Σ_{t,t'} [id_t = id_t'] e_t·e_t'.
            m = mask > 0
            gram = embed_grads @ embed_grads.transpose(1, 2)
            same = (ids[:, :, None] == ids[:, None, :]) & m[:, :, None] & m[:, None, :]
            sq += (gram * same).sum((1, 2))
            if vocab_pos is not None and out is not None:
                self._word_rows(ids, mask, embed_grads, vocab_pos, out[:, offset:])
        return sq

    def _project(
        self,
        flat: dict[str, torch.Tensor],
        embed_grads: torch.Tensor | None,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Projected gradients (B, dim), the word part projected from its touched rows."""
        assert self.projector is not None
        out = torch.zeros(ids.shape[0], self.projector.dim, device=ids.device)
        for n in self.dense_names:
            out += self.projector.project(n, self.shapes[n], flat[n])
        if embed_grads is not None:
            used = torch.unique(ids[mask > 0])  # sorted
            pos = torch.full((self.word_weight.shape[0],), -1, dtype=torch.long, device=ids.device)
            pos[used] = torch.arange(used.numel(), device=ids.device)
            rows = self._word_rows(ids, mask, embed_grads, pos)
            out += self.projector.project_rows(
                self.word_name, self.shapes[self.word_name], used, rows
            )
        return out


# --------------------------------------------------------------------------- engine


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype for dot products from a dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise AtlasError(f"dtype must be one of {', '.join(names)} (got '{dtype}').")
    return names[dtype]


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
        start = time.perf_counter()
        tr = _Data(train, "training")
        te = _Data(test, "test") if test is not None else None
        n_test = te.n if te is not None else 0
        chunks = [(s, min(s + self.chunk_size, tr.n)) for s in range(0, tr.n, self.chunk_size)]
        sink: _Sink
        if shard_dir is not None:
            sink = _ShardSink(Path(shard_dir), self._options(tr, te, len(chunks)))
        else:
            sink = _MemorySink()
        total = len(self.checkpoints) * len(chunks)
        bar = tqdm(total=total, desc="tracin", unit="shard", disable=not progress, leave=False)
        try:
            for ci, (where, lr) in enumerate(self.checkpoints):
                missing = [c for c in range(len(chunks)) if not sink.has(ci, c)]
                need_test_norms = te is not None and not sink.has_test(ci)
                bar.update(len(chunks) - len(missing))
                if not missing and not need_test_norms:
                    continue
                model = self._load(where)
                grads = _CheckpointGrads(
                    model, self.scope, self.device, self._projector, self.dtype
                )
                self.n_params = grads.n_params
                test_sq = np.full(n_test, np.nan, dtype=np.float32)
                for c, block in self._checkpoint_blocks(grads, tr, te, chunks, missing, test_sq):
                    sink.put(ci, c, lr * block)
                    bar.update(1)
                if need_test_norms:
                    if np.isnan(test_sq).any():  # every training chunk was already on disk
                        test_sq = self._test_sq_norms(grads, te)
                    sink.put_test(ci, test_sq)
                del grads, model
        finally:
            bar.close()
        if self.n_params is None:  # every shard was on disk
            self.check()
        matrix, stack, self_inf, train_sq = _aggregate(
            sink, len(self.checkpoints), chunks, n_test, tr.n, per_checkpoint
        )
        lrs = np.array([lr for _, lr in self.checkpoints], dtype=np.float64)
        test_norms = None
        if te is not None:
            test_sq = np.stack([sink.get_test(ci) for ci in range(len(self.checkpoints))])
            test_norms = np.sqrt(np.maximum(test_sq, 0.0)).astype(np.float32)
        return TracInResult(
            matrix=matrix if te is not None else None,
            per_checkpoint=stack,
            self_influence=self_inf,
            n_params=int(self.n_params),
            seconds=time.perf_counter() - start,
            train_grad_norms=_unweighted_norms(train_sq, lrs),
            test_grad_norms=test_norms,
        )

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
            "checkpoints": [
                [str(w) if not isinstance(w, nn.Module) else "<module>", lr]
                for w, lr in self.checkpoints
            ],
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


def _vocab_of(data: _Data, rows: np.ndarray) -> torch.Tensor:
    """Sorted word ids that occur (unmasked) in ``rows``."""
    sel = torch.as_tensor(rows, dtype=torch.long)
    return torch.unique(data.ids[sel][data.mask[sel] > 0])


# --------------------------------------------------------------------------- shards


class _Sink:
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


class _MemorySink(_Sink):
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


class _ShardSink(_Sink):
    """Blocks as ``.npy`` shards in a folder, with the options they were computed with."""

    def __init__(self, folder: Path, options: dict[str, Any]) -> None:
        """Use ``folder``; discard its shards if they were computed with other options."""
        self.folder = folder
        opt_path = folder / SHARD_OPTIONS
        if opt_path.exists():
            try:
                old = json.loads(opt_path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if old != json.loads(json.dumps(options)):
                shutil.rmtree(folder)
        if not opt_path.exists():
            store.write_json(opt_path, options)

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


def _aggregate(
    sink: _Sink,
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


def _unweighted_norms(weighted_sq: np.ndarray, lrs: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------- run stage


def _run_checkpoints(run: Path, manifest: dict[str, Any]) -> list[tuple[Path, float]]:
    """The run's (checkpoint folder, lr) list, or :class:`AtlasError` if training is incomplete."""
    entries = manifest.get("checkpoints") or []
    if not store.stage_done(run, "train") or not entries:
        raise AtlasError(
            f"{run} has no complete checkpoints yet; finish training first (python -m core run)."
        )
    out = []
    for entry in entries:
        path = run / str(entry.get("path", ""))
        if not entry.get("path") or not path.is_dir():
            raise AtlasError(f"Checkpoint {path} listed in the manifest is missing.")
        if entry.get("lr") is None:
            raise AtlasError(f"Checkpoint {path} has no learning rate in the manifest.")
        out.append((path, float(entry["lr"])))
    return out


def _run_options(
    run: Path, scope: str | None, project: int | None, seed: int | None
) -> tuple[dict[str, Any], Any]:
    """Resolve and validate scope/projection against the run's config defaults."""
    from core.config import config_from_dict

    manifest = store.load_manifest(run)
    config = config_from_dict(manifest.get("config") or {})
    scope = scope or config.tracin_params
    project = project if project is not None else config.tracin_project
    seed = seed if seed is not None else config.tracin_seed
    parse_scope(scope)
    if project is not None and int(project) <= 0:
        raise AtlasError(f"--project must be a positive dimension (got {project}).")
    options = {
        "params": scope,
        "project": None if project is None else int(project),
        "seed": int(seed) if project is not None else None,
    }
    return options, (manifest, config)


def _run_data(
    run: Path, max_length: int, test_rows: np.ndarray | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, np.ndarray]:
    """Encode the run's train (observed labels) and test (true labels) instances."""
    from core.models import encode, load_tokenizer

    instances = store.load_instances(run)
    train_df = instances[instances["split"] == "train"]
    test_df = instances[instances["split"] == "test"]
    if test_rows is not None:
        test_df = test_df.iloc[test_rows]
    if len(train_df) == 0:
        raise AtlasError(f"{run / store.INSTANCES} has no training instances.")
    tokenizer = load_tokenizer(run)
    train = encode(tokenizer, train_df["text"].tolist(), max_length)
    train["labels"] = torch.as_tensor(
        train_df["observed_label"].to_numpy(copy=True), dtype=torch.long
    )
    test = None
    if len(test_df):
        test = encode(tokenizer, test_df["text"].tolist(), max_length)
        test["labels"] = torch.as_tensor(test_df["label"].to_numpy(copy=True), dtype=torch.long)
    return train, test, test_df["id"].to_numpy()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's VmHWM belongs to the current program image; ``ru_maxrss`` (the fallback) also
    counts a parent's peak inherited across fork+exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Process peak RSS (and CUDA peak allocation) in MiB."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run_tracin(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The tracin stage: write tracin.npy, tracin_per_checkpoint.npy and self_influence.npy.

    Options default to the run's config (``tracin_params``, ``tracin_project``,
    ``tracin_seed``). Skipped when already complete with the same options; resumes from
    the shards of an interrupted run. Returns the manifest's ``tracin`` entry.
    """
    from core.models import load_classifier, resolve_device

    run = Path(run_dir)
    options, (manifest, config) = _run_options(run, scope, project, seed)
    checkpoints = _run_checkpoints(run, manifest)
    previous = manifest.get("tracin") or {}
    outputs = [
        run / store.TRACIN,
        run / store.TRACIN_PER_CHECKPOINT,
        run / store.SELF_INFLUENCE,
        run / store.GRAD_NORMS_TRAIN,
    ]
    if (
        store.stage_done(run, "tracin")
        and {k: previous.get(k) for k in options} == options
        and all(p.exists() for p in outputs)
    ):
        return previous
    dev = resolve_device(device)
    engine = TracInCP(
        checkpoints,
        scope=options["params"],
        project=options["project"],
        seed=options["seed"] or 0,
        device=dev,
        dtype=dtype,
        loader=load_classifier,
    )
    train, test, _ = _run_data(run, config.max_length)
    # Loads the first checkpoint: a scope that selects nothing fails here, before any write.
    n_params = engine.check()

    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    store.mark_stage(run, "tracin", store.STATUS_RUNNING, **options)
    shard_dir = run / store.TRACIN_SHARDS_DIR
    result = engine.compute(train, test, shard_dir=shard_dir, progress=progress)
    n_train = len(train["labels"])
    n_test = 0 if test is None else len(test["labels"])
    matrix = result.matrix if result.matrix is not None else np.zeros((0, n_train), np.float32)
    store.write_npy(run / store.TRACIN, matrix.astype(np.float32))
    write_per_checkpoint(
        shard_dir,
        len(checkpoints),
        n_train,
        n_test,
        engine.chunk_size,
        run / store.TRACIN_PER_CHECKPOINT,
    )
    store.write_npy(run / store.SELF_INFLUENCE, result.self_influence.astype(np.float32))
    store.write_npy(run / store.GRAD_NORMS_TRAIN, result.train_grad_norms)
    if result.test_grad_norms is not None:
        store.write_npy(run / store.GRAD_NORMS_TEST, result.test_grad_norms)
    seconds = time.perf_counter() - start
    info = {
        **options,
        "n_params": n_params,
        "n_checkpoints": len(checkpoints),
        "n_train": n_train,
        "n_test": n_test,
        "device": str(dev),
        "dtype": dtype,
        "chunk_size": engine.chunk_size,
        "seconds": round(seconds, 2),
        **_peak_memory_mb(dev),
    }
    store.update_manifest(run, tracin=info)
    stage_info = {k: v for k, v in info.items() if k != "seconds"}
    store.mark_stage(run, "tracin", store.STATUS_COMPLETE, seconds, **stage_info)
    # The final files hold everything the shards did; they are only resumption state.
    shutil.rmtree(shard_dir, ignore_errors=True)
    return info


# ------------------------------------------------------------- approximation error


def scope_error(
    exact: np.ndarray, approx: np.ndarray, ks: Sequence[int] = (10, 50)
) -> dict[str, Any]:
    """Per-test-row agreement of approximate with exact scores (both (n_test, n_train)).

    Returns ``per_test`` rows (Spearman rank correlation; top-k overlap of proponents and
    of opponents, as fractions of k) and their mean/median/min in ``summary``.
    """
    from scipy.stats import rankdata

    exact = np.asarray(exact, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    if exact.shape != approx.shape or exact.ndim != 2:
        raise AtlasError("Exact and approximate scores must be matrices of one shape.")
    n_train = exact.shape[1]
    rows = []
    for e, a in zip(exact, approx, strict=True):
        re_, ra = rankdata(e), rankdata(a)
        sd = re_.std() * ra.std()
        row: dict[str, float] = {
            "spearman": float(((re_ - re_.mean()) * (ra - ra.mean())).mean() / sd) if sd else 1.0
        }
        for k in ks:
            kk = min(k, n_train)
            top_e, top_a = np.argsort(-e)[:kk], np.argsort(-a)[:kk]
            bot_e, bot_a = np.argsort(e)[:kk], np.argsort(a)[:kk]
            row[f"top{k}_overlap"] = len(np.intersect1d(top_e, top_a)) / kk
            row[f"bottom{k}_overlap"] = len(np.intersect1d(bot_e, bot_a)) / kk
        rows.append(row)
    summary = {}
    for key in rows[0] if rows else []:
        vals = np.array([r[key] for r in rows])
        summary[key] = {
            "mean": float(vals.mean()),
            "median": float(np.median(vals)),
            "min": float(vals.min()),
        }
    return {"per_test": rows, "summary": summary}


def compare_to_exact(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | None = None,
    seed: int | None = None,
    n_test: int = 20,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Measure a scope/projection against exact 'all' TracIn on ``n_test`` test instances.

    Test instances are evenly spaced over the test split. Scores already in the run's
    tracin.npy are reused when they were computed with the options needed (their seconds
    are then reported as 0). Writes nothing to the run.
    """
    from core.models import load_classifier, resolve_device

    run = Path(run_dir)
    options, (manifest, config) = _run_options(run, scope, project, seed)
    checkpoints = _run_checkpoints(run, manifest)
    if n_test <= 0:
        raise AtlasError(f"--compare-n must be positive (got {n_test}).")
    n_test_all = int((store.load_instances(run)["split"] == "test").sum())
    if n_test_all == 0:
        raise AtlasError(f"{run} has no test instances to compare on.")
    rows = np.unique(np.linspace(0, n_test_all - 1, min(n_test, n_test_all)).round().astype(int))
    train, test, test_ids = _run_data(run, config.max_length, rows)
    dev = resolve_device(device)

    def scores(scope_: str, project_: int | None, seed_: int) -> tuple[np.ndarray, float, int]:
        engine = TracInCP(
            checkpoints,
            scope=scope_,
            project=project_,
            seed=seed_,
            device=dev,
            loader=load_classifier,
        )
        res = engine.compute(train, test, progress=progress)
        return res.matrix, res.seconds, res.n_params

    def stored(opts: dict[str, Any]) -> tuple[np.ndarray, float, int] | None:
        """Rows of the run's tracin.npy when it was computed with ``opts``."""
        info = manifest.get("tracin") or {}
        if not store.stage_done(run, "tracin") or any(info.get(k) != v for k, v in opts.items()):
            return None
        return np.asarray(store.read_npy(run / store.TRACIN)[rows]), 0.0, int(info["n_params"])

    exact_opts = {"params": "all", "project": None, "seed": None}
    exact, t_exact, n_exact = stored(exact_opts) or scores("all", None, 0)
    approx, t_approx, n_approx = stored(options) or scores(
        options["params"], options["project"], options["seed"] or 0
    )
    report = scope_error(exact, approx)
    for row, tid in zip(report["per_test"], test_ids, strict=True):
        row["test_id"] = int(tid)
    return {
        **options,
        "n_test": len(rows),
        "n_train": int(exact.shape[1]),
        "n_params_exact": n_exact,
        "n_params": n_approx,
        "seconds_exact": round(t_exact, 2),
        "seconds_approx": round(t_approx, 2),
        **report,
    }
