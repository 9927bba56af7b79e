"""Run a study: start python -m core run in the background and follow it."""

from ui.views import study

study.render()
