"""The cleaning layer: detectors rank training instances by suspicion, and interventions
(exclude, relabel, reweight) retrain without their top suspects; the review-queue and
cleaned-data exports.
"""
