"""Influence Atlas: where do mislabeled training instances land in TracIn scores?

Run with ``streamlit run app.py``. This entry point only builds the navigation from the one
page list in ``ui/pages.py`` and runs the chosen page. The app only reads the run store
(``cache/`` or $ATLAS_CACHE); it never imports torch, so it starts fast and can serve a hosted
demo.
"""

from ui import pages

pages.navigation().run()
