"""Per-example gradients of one checkpoint's scope, as dot-product features."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.influence.projection import Projector
from core.influence.scopes import select_parameters, word_embedding_name


class Features(NamedTuple):
    """Gradient features of a set of instances at one checkpoint, one tensor per slot."""

    slots: list[torch.Tensor]  # each (n, d_slot), in the engine's dot-product dtype


class CheckpointGrads:
    """Per-example gradients of one checkpoint's scope, as dot-product features."""

    def __init__(
        self,
        model: nn.Module,
        scope: str,
        device: torch.device,
        projector: Projector | None,
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
        self.word_name = word_embedding_name(model)
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
