"""Suspicion rankings of training instances, and the detect stage that scores them against the flips.

Every detector gives each training instance one float, higher = more suspicious,
computed without looking at the flipped mask (the mask only scores the ranking
afterwards, in :mod:`core.analysis.metrics`). The detect stage writes
``detectors.parquet`` (``id`` + one column per detector) and ``detection.json``
(metrics per detector beside the random baseline, and a note on how each was
computed), then marks the stage ``detect`` complete.

The package holds one module per family, each importing only those listed after it:
:mod:`~core.cleaning.detectors.stage` (the detect stage), :mod:`~core.cleaning.detectors.registry` (one
entry per detector), :mod:`~core.cleaning.detectors.retraining` (the inner-split retraining
method), :mod:`~core.cleaning.detectors.shape_aware` and :mod:`~core.cleaning.detectors.cheap`. The names
below are re-exported here, so ``from core.cleaning.detectors import run_detect`` keeps working.

Detectors (names are the run-store contract):

``self_influence``
    TracIn self-influence Σ_i η_i ‖∇ℓ(w_i, z)‖² with the observed label
    (Pruthi et al.): a wrong label keeps the gradient large for longer.
``misclassified_influence``
    The COMPSAC 2024 method (Yamaguchi, Hirabayashi and Tamekuri; paper §II.C):
    split the training data again into train-in-train / val-in-train /
    test-in-train (80/10/10, stratified on the observed label, seeded), fine-tune
    a fresh model on train-in-train with the run's own configuration, find the
    test-in-train instances it misclassifies (prediction ≠ observed label), and
    rank *every* training instance by its TracIn influence on them, each instance's
    gradients taken at the train-in-train checkpoints with its observed label.
    Aggregation: see :func:`aggregate_influence`.
``shape_aware``
    The study's own idea (paper §III, §V.D): in the run's TracIn matrix, flipped
    instances sit at the ends of S-shaped sorted curves and near the centre of
    Z-shaped ones. For each misclassified test instance the detector takes suspects
    from where its shape says they are: far from the curve's centre value for an S,
    close to it for a Z, weighted by how clear the shape is. See
    :func:`shape_aware_scores`.
``loss``
    Cross-entropy on the observed label at the final checkpoint (``logits.npy``).
``aum``
    Area under the margin (Pleiss et al. 2020) over the saved checkpoints:
    the mean of logit[observed] − logit[other]; negated, since a low margin is suspicious.
``cleanlab``
    Confident learning (Northcutt et al.) on out-of-sample probabilities from a
    cheap, honest model: logistic regression, 5-fold stratified
    ``cross_val_predict`` on the training split with observed labels. Its features
    are the frozen *pretrained* encoder's mean-pooled embeddings when the run's
    model is pretrained (a fair opponent for detectors that see a fine-tuned
    encoder), else TF-IDF character 1–4-grams (no word splitter needed, so
    Japanese works too). The
    score is ``is_issue + (1 − label_quality)``: the instances
    ``cleanlab.filter.find_label_issues`` flags come first, each group ordered by
    ``cleanlab.rank.get_label_quality_scores`` (self-confidence).
``random``
    Uniform random scores from the run's seed: the baseline made concrete.
"""

from core.cleaning.detectors.cheap import (
    aum_scores,
    cleanlab_scores,
    loss_scores,
    pretrained_features,
    random_scores,
)
from core.cleaning.detectors.registry import (
    DETECTORS,
    REASONS,
    REGISTRY,
    Detector,
)
from core.cleaning.detectors.retraining import (
    INFLUENCE_CACHE,
    NESTED_FRACTIONS,
    RETRAIN_MEMORY_MB,
    WORK,
    WORK_DIR,
    Retraining,
    aggregate_influence,
    compute_retraining,
    misclassified_influence_matrix,
    nested_split,
    plan_retraining,
)
from core.cleaning.detectors.shape_aware import (
    centre_distances,
    rank_positions,
    shape_aware_scores,
    shape_preference,
)
from core.cleaning.detectors.stage import (
    STAGE,
    detection_summary,
    detection_table,
    load_scores,
    run_detect,
)

__all__ = [
    "DETECTORS",
    "Detector",
    "INFLUENCE_CACHE",
    "NESTED_FRACTIONS",
    "REASONS",
    "REGISTRY",
    "RETRAIN_MEMORY_MB",
    "Retraining",
    "STAGE",
    "WORK",
    "WORK_DIR",
    "aggregate_influence",
    "aum_scores",
    "centre_distances",
    "cleanlab_scores",
    "compute_retraining",
    "detection_summary",
    "detection_table",
    "load_scores",
    "loss_scores",
    "misclassified_influence_matrix",
    "nested_split",
    "plan_retraining",
    "pretrained_features",
    "random_scores",
    "rank_positions",
    "run_detect",
    "shape_aware_scores",
    "shape_preference",
]
