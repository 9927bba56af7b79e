"""One module per page; each exposes ``render()``, called by the thin file in ``pages/``."""
