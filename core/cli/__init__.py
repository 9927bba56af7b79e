"""The command line: ``python -m core run|list|show|tracin|…|sweep|claims|group|replication``.

Every command that creates something prints the folder it wrote as its last stdout
line, so scripts can chain commands. Problems with the input end with one sentence on
stderr and exit status 2; progress bars go to stderr.

The package, each module importing only those listed after it: :mod:`~core.cli.main` (the
entry point and its error sentences), :mod:`~core.cli.parser` (every flag and help text),
the handlers by family (:mod:`~core.cli.study`: run, sweep, fetch; :mod:`~core.cli.show`:
list, show; :mod:`~core.cli.stages`: tracin, error-study, analyze, detect, clean, export;
:mod:`~core.cli.claims`: claims, group, replication; :mod:`~core.cli.app`: app) and
:mod:`~core.cli.common` (what the handlers share). The names below are re-exported here:
``atlas`` is ``core.cli:main``.
"""

from core.cli.app import app_command
from core.cli.main import main, os_error_sentence, quiet_libraries
from core.cli.parser import build_parser, check_study_argv
from core.cli.show import show_payload
from core.options.run_options import (
    DEFAULT_CACHE,
    UsageError,
    add_executor_options,
    add_study_options,
    config_from_args,
    executor_from_args,
)

__all__ = [
    "DEFAULT_CACHE",
    "UsageError",
    "add_executor_options",
    "add_study_options",
    "app_command",
    "build_parser",
    "check_study_argv",
    "config_from_args",
    "executor_from_args",
    "main",
    "os_error_sentence",
    "quiet_libraries",
    "show_payload",
]
