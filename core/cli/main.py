"""The entry point: parse, run the handler, and turn every refusal into one sentence and an exit status."""

from __future__ import annotations

import errno
import os
import sys

from core.cli.common import _command_line
from core.cli.parser import build_parser
from core.execution.executors import RESUME, TaskFailed
from core.storage.errors import AtlasError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    quiet_libraries()
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        out = args.func(args)
    except TaskFailed as exc:  # the input was fine; a task's computation failed
        text = str(exc)
        if args is not None:  # the command that resumes, as typed, in place of "the command"
            text = text.replace(RESUME, f"rerun `{_command_line(args)}` to resume")
        print(f"error: {text}", file=sys.stderr)
        return 1
    except AtlasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `atlas show RUN | head`: the reader left; stop quietly, as Unix tools do.
        _silence_stdout()
        return 0
    except OSError as exc:  # the machine, not the request: a full disk, a read-only folder
        print(f"error: {os_error_sentence(exc)}", file=sys.stderr)
        return 1
    if out is not None:
        try:
            print(out)
        except BrokenPipeError:
            _silence_stdout()
    return 0


# What to do about the environment problems a command can meet while writing.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space, then rerun the same command to resume",
    errno.EDQUOT: "free some space, then rerun the same command to resume",
    errno.EACCES: "give this user write access or choose another path",
    errno.EPERM: "give this user write access (or remove the file's immutable flag) or choose another path",
    errno.EROFS: "choose a writable path (another --out or --cache)",
}


def os_error_sentence(exc: OSError) -> str:
    """An operating-system error as one sentence: the path, the cause and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    cause = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ERROR_ADVICE.get(exc.errno, "fix that, then rerun the same command")
    return f"{where}: {cause.rstrip('.')}; {advice}."


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def quiet_libraries() -> None:
    """Silence library chatter (load reports, hub warnings) that would bury our messages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Environment variables, not imports: transformers costs a second to import, and a bad
    # request must be refused before that (transformers reads them when it loads).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded (tests call main in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
