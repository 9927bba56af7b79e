"""Cleaning lab: detectors against the known flips, review queue, interventions."""

from ui.screens import cleaning

cleaning.render()
