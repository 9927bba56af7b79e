"""TracIn engine: influence matrices, self-influence and top-k over saved checkpoints.

``TracIn(z, z') = Σ_i η_i ∇ℓ(w_i, z) · ∇ℓ(w_i, z')`` (Pruthi et al. 2020, TracInCP), with ℓ
the per-instance cross-entropy in eval mode (no dropout).

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
computed with; shards of other options are refused (never deleted). Every shard is computed on
``THREADS`` (1) torch threads (:func:`fixed_threads`), whatever the process's own count, because
some ATen CPU kernels cut their rows among the threads: the files are then the same bits whatever
executor, worker count or ``chunks_per_task`` made them.

Parameter scopes (``select_parameters``):

- ``all``: every parameter (the definition).
- ``no-word-embeddings``: all but the word-embedding matrix.
- ``last-N``: the last N encoder layers, the pooler and the classifier.
- ``head``: the classifier only (the linear layer on the pooled feature). The pooler is left
  out so that ``head`` is exactly the linear head of the binary-head identity
  ``2·e·e'·(h·h' + 1)``; ``last-N`` is the scope that adds the pooler.

Default per preset (core/inputs/config.py): ``quick`` uses ``all`` (exact; the tiny model's word
part is small because only test-vocabulary rows count); ``paper`` uses ``all`` with the
factorized projection ``factorized:64`` (core.influence.factorized), chosen by the error study
(core.analysis.error_study), which measures every cheap method against exact all-parameter scores.

The engine assumes BERT-like Hugging Face classifiers: ``get_input_embeddings()``, an
``inputs_embeds`` argument, right padding, and no weight tying of the word embeddings.

The package (``core.influence``) re-exports the public names of its modules (``__all__`` holds
public names only; what a module keeps to itself starts with an underscore and is never
imported by another):

- ``base``: the engine family's :class:`Engine` protocol (``options()``, ``shard_options()``,
  ``check()``, ``compute()``, ``compute_checkpoint()``), whose default implementations are
  what its members share (checkpoints, loading, the block loop on :data:`THREADS` torch
  threads, :class:`TracInResult`); a member fills one :class:`CheckpointJob` at a time;
- ``engine``: :class:`TracInCP`, exact gradients of a scope or their dense projection;
- ``factorized``: :class:`FactorizedTracIn`, the Kronecker-factored projection of every
  parameter (LoGra-style);
- ``registry``: :func:`engine_for`, the engine of a ``--project`` spec
  (:data:`core.options.tracin_options.PROJECTIONS` lists the spellings, torch-free);
- ``scopes``: :func:`select_parameters` (the torch-free :func:`core.options.tracin_options.parse_scope`
  checks a scope's spelling before torch is imported);
- ``projection``: the seeded :class:`Projector`; ``inputs``: :class:`EncodedData`, encoded
  instances and batches;
- ``gradients``: per-example gradient features of one checkpoint;
- ``shards``: where blocks go (:class:`MemorySink`, :class:`ShardSink`) and their sum;
- ``stage``: the run stage (:func:`run_tracin`) and the public task API every executor
  uses: :func:`plan` (run → list of :class:`Task`), :func:`compute` (task → its shards,
  written atomically, skipped when present) and :func:`aggregate` (shards → the run's
  files, bitwise the same whatever order the tasks ran in); ``core.execution.executors`` runs those
  tasks here, in a process pool or on Ray (``run_tracin(..., executor=...)``);
- ``study``: the approximation study (:func:`compare_to_exact`, :func:`scope_error`).
"""

from __future__ import annotations

from core.influence.base import (
    CHUNK_SIZE,
    THREADS,
    CheckpointJob,
    Engine,
    TracInResult,
    default_loader,
    fixed_threads,
    resolve_dtype,
)
from core.influence.engine import (
    BATCH_BYTES,
    BUFFER_BYTES,
    MAX_BATCH,
    MAX_BUFFER_ROWS,
    MAX_TEST_BYTES,
    SEQ_BUDGET,
    TopK,
    TracInCP,
    bf16_native,
    check_dtype,
)
from core.influence.factorized import FactorizedGrads, FactorizedTracIn, factorized_tracin
from core.influence.gradients import CheckpointGrads, Features
from core.influence.inputs import EncodedData, vocab_of
from core.influence.projection import PROJECTION_BLOCK_ELEMS, PROJECTION_CACHE_BYTES, Projector
from core.influence.registry import ENGINES, engine_class, engine_for
from core.influence.scopes import select_parameters, word_embedding_name
from core.influence.shards import (
    SHARD_OPTIONS,
    MemorySink,
    ShardSink,
    Sink,
    norm_shard_name,
    shard_name,
    sum_blocks,
    unweighted_norms,
    write_per_checkpoint,
)
from core.influence.stage import (
    Task,
    TaskOptions,
    aggregate,
    compute,
    default_chunks_per_task,
    encode_run_data,
    peak_memory_mb,
    peak_rss_mb,
    plan,
    resolve_options,
    run_checkpoints,
    run_tracin,
    tasks_use_remote_gpu,
)
from core.influence.study import compare_to_exact, scope_error
from core.options.tracin_options import parse_scope

__all__ = [
    "BATCH_BYTES",
    "BUFFER_BYTES",
    "CHUNK_SIZE",
    "ENGINES",
    "MAX_BATCH",
    "MAX_BUFFER_ROWS",
    "MAX_TEST_BYTES",
    "PROJECTION_BLOCK_ELEMS",
    "PROJECTION_CACHE_BYTES",
    "SEQ_BUDGET",
    "SHARD_OPTIONS",
    "THREADS",
    "CheckpointJob",
    "CheckpointGrads",
    "EncodedData",
    "Engine",
    "FactorizedGrads",
    "FactorizedTracIn",
    "Features",
    "MemorySink",
    "Projector",
    "ShardSink",
    "Sink",
    "Task",
    "TaskOptions",
    "TopK",
    "TracInCP",
    "TracInResult",
    "aggregate",
    "bf16_native",
    "check_dtype",
    "compare_to_exact",
    "compute",
    "default_chunks_per_task",
    "default_loader",
    "encode_run_data",
    "engine_class",
    "engine_for",
    "factorized_tracin",
    "fixed_threads",
    "norm_shard_name",
    "parse_scope",
    "peak_memory_mb",
    "peak_rss_mb",
    "plan",
    "resolve_dtype",
    "resolve_options",
    "run_checkpoints",
    "run_tracin",
    "scope_error",
    "select_parameters",
    "shard_name",
    "sum_blocks",
    "tasks_use_remote_gpu",
    "unweighted_norms",
    "vocab_of",
    "word_embedding_name",
    "write_per_checkpoint",
]
