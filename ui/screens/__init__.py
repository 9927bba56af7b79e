"""The app's screens: one module per page, each exposing ``render()``, called by the thin file
in ``pages/``. Named screens, not views: a view is core's (:mod:`core.analysis.views`), a checkpoint range
and a normalisation of the influence scores."""
