"""The analysis layer: what is read from stored influence scores and checkpoints.

Curve shapes and their calibration, views, correlations, [CLS] geometry, detection metrics,
the paper's claims and their replication, the lesson's numbers, the analyze stage and the
error study of the engines' approximations. Only the analyze stage's geometry and the error
study load torch, and only when they run.
"""
