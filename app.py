"""Influence Atlas: where do mislabeled training instances land in TracIn scores? (home page)

Run with ``streamlit run app.py``. The app only reads the run store (``cache/`` or
$ATLAS_CACHE); it never imports torch, so it starts fast and can serve a hosted demo.
"""

from ui.views import home

home.render()
