"""core.options.commands: a recorded command pinned to the run's configuration."""

from __future__ import annotations

import pytest

from core.cli import build_parser, config_from_args
from core.inputs.config import preset_config
from core.options.commands import pin_command


def _config(command: str) -> dict:
    return config_from_args(build_parser().parse_args(command.split()[3:])).to_dict()


def test_a_command_that_still_asks_for_its_configuration_is_unchanged():
    line = "python -m core run --preset quick --epochs 5 --name r"
    assert pin_command(line, _config(line)) == line


def test_a_changed_preset_default_is_written_out():
    made = preset_config("paper").to_dict() | {"tracin_params": "last-2", "tracin_project": None}
    line = "python -m core run --preset paper --name demo --detect"
    assert _config(line) != made  # today's paper preset asks for another TracIn method
    pinned = pin_command(line, made)
    assert pinned == line + " --params last-2"
    assert _config(pinned) == made


def test_differences_no_option_expresses_keep_the_command():
    made = preset_config("quick").to_dict() | {"tracin_seed": 7}
    line = "python -m core run --preset quick"
    assert pin_command(line, made) == line
    assert pin_command("python -m core sweep --preset quick", made) == (
        "python -m core sweep --preset quick"
    )


def test_the_run_store_never_imports_the_command_layer_or_the_cli():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("core", cache_dir=None)  # imports inside functions count too
    # as_packages: the CLI is a package, and a chain into any of its modules counts.
    for upper in ("core.options.commands", "core.cli", "core.options.run_options"):
        assert not graph.chain_exists("core.storage.store", upper, as_packages=True), upper
    assert not graph.chain_exists("core.options.commands", "core.cli", as_packages=True)
