"""The storage layer, the bottom of core: the run store's file names and column sets, atomic
writes, manifests, provenance and the writer's lock, and the one user-facing exception.

It builds no command strings (the options layer registers its rebuild phrasing with
:func:`core.storage.store.set_rebuild_phrasing`) and imports no torch: the app reads runs with it.
"""
