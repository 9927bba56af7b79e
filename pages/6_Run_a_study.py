"""Run a study: start python -m core run in the background and follow it."""

from ui.screens import study

study.render()
