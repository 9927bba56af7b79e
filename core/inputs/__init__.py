"""The inputs layer: what a study starts from: its configuration and presets, the datasets, and
the seeded split with its label flips. No torch.
"""
