"""The ``app`` command: the Streamlit lab started on this machine."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from core.options.validation import check_number
from core.storage.errors import AtlasError

REPO = Path(__file__).resolve().parents[2]  # the checkout: app.py, pages/ and cache/ live here


APP_PORT = 8501  # Streamlit's own default, as `make app`


APP_ADDRESS = "localhost"  # loopback only, as `make app`: the lab starts jobs, so no LAN by default


def app_command(
    cache: str | None, port: int = APP_PORT, address: str = APP_ADDRESS
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment ``atlas app`` runs: ``streamlit run app.py`` on ``port`` at
    ``address``, reading the run store ``cache`` through ATLAS_CACHE (the app's only setting).

    ``cache`` None: $ATLAS_CACHE, else ``cache/`` in the working directory when there is one
    (where ``atlas run`` writes), else the checkout's ``cache/`` with the shipped demo runs.
    """
    check_number("--port", port, 1, 65535)
    app = REPO / "app.py"
    if not app.is_file():
        raise AtlasError(
            f"`atlas app` needs the lab's checkout (app.py and pages/ beside core/), and {app} "
            "is missing: run it from a clone installed with `pip install -e .` (as `make` does)."
        )
    import importlib.util  # a spec lookup only: importing streamlit here would cost a second

    if importlib.util.find_spec("streamlit") is None:
        raise AtlasError("Streamlit is not installed here; install it with `make setup`.")
    if cache is None:
        cache = os.environ.get("ATLAS_CACHE") or ("cache" if Path("cache").is_dir() else None)
    folder = Path(cache).expanduser().resolve() if cache else REPO / "cache"
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(port),
        "--server.address",
        address,
    ]
    return argv, {**os.environ, "ATLAS_CACHE": str(folder)}


def cmd_app(args: argparse.Namespace) -> str | None:
    """Start the Streamlit lab (replaces this process), or print the command with --dry-run."""
    argv, env = app_command(args.cache, args.port, args.address)
    host = "localhost" if args.address in ("localhost", "127.0.0.1", "::1") else args.address
    line = f"ATLAS_CACHE={shlex.quote(env['ATLAS_CACHE'])} " + shlex.join(argv)
    if args.dry_run:
        return line
    print(f"Opening the lab at http://{host}:{args.port} (Ctrl+C stops it)", file=sys.stderr)
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # never returns: Streamlit takes over the terminal and Ctrl+C
    return None  # pragma: no cover
