"""The options layer: what a user can ask for, checked without torch.

Every option's spelling and check (TracIn scopes and projections, error-study methods, a whole
study request), the options of ``run`` and ``sweep``, and the command lines a run's messages
name (reproduce, resume, rebuild a stage, recreate a shipped run). The layers above phrase
their refusals with these; the CLI and the app read them without importing torch.
"""
