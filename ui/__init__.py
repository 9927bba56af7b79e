"""App-side code: run-store loading with Streamlit caching, chart builders, widgets and the page screens.

Nothing under ``ui`` imports torch, transformers, umap or fugashi: the app only reads
the run store that ``core`` writes.
"""
