"""Cleaning lab: detectors against the known flips, review queue, interventions."""

from ui.views import cleaning

cleaning.render()
