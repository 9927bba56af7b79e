"""The learning layer: tokenizers, the classifiers and fine-tuning with per-epoch checkpoints
(torch and transformers).
"""
