"""Package hygiene: `import preftune` is cheap and side-effect free; losses/ and rank/ stay light."""

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_preftune_loads_no_heavy_library():
    mods = _modules_after("import preftune, preftune.data, preftune.model, preftune.train")
    for heavy in ("torch", "transformers", "accelerate", "datasets", "peft"):
        assert heavy not in mods, heavy


@pytest.mark.parametrize("pkg", ["preftune.losses", "preftune.rank"])
def test_losses_and_rank_import_without_hf_stack(pkg):
    mods = _modules_after(f"import {pkg}; import preftune.losses as L; L.names()")
    for heavy in ("transformers", "accelerate", "datasets", "peft"):
        assert heavy not in mods, heavy


def test_cli_help_lists_commands():
    from typer.testing import CliRunner

    from preftune.cli import app

    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "losses"):
        assert cmd in res.output


def test_losses_command_lists_every_objective():
    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.losses import names

    res = CliRunner().invoke(app, ["losses"], env={"COLUMNS": "250"})
    assert res.exit_code == 0
    for n in names():
        assert n in res.output, n
