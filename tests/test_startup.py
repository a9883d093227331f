"""Start-up: `medusa --help` and the commands that load no model do not import torch or transformers.

Checked through ``sys.modules`` in a fresh interpreter, not timed (timings: docs/benchmarks/cpu-startup).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers")


def imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": SOURCE, "PATH": "/usr/bin:/bin"},
    )
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["prompts", "--help"],
        ["cache", "list"],
        ["tree", "build", "--help"],
        ["generate", "--help"],
        ["chat", "--help"],
        ["serve", "--help"],
        ["distill", "--help"],
        ["train", "--help"],
    ],
)
def test_commands_that_load_no_model_import_no_torch(argv, tmp_path):
    code = (
        "import os\nos.environ['MEDUSA_CACHE_DIR'] = " + repr(str(tmp_path)) + "\n"
        "import contextlib, io\nfrom medusa.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass"
    )
    assert imported_after(code) == set()


def test_the_package_imports_its_public_names_on_first_use():
    assert imported_after("import medusa.cli") == set()
    assert imported_after("from medusa import MedusaModel") == set(HEAVY)


def test_version(capsys):
    from medusa import __version__
    from medusa.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"medusa {__version__}\n"


def test_the_flag_defaults_spelled_out_for_fast_help_match_the_library():
    from medusa import acceptance, heads, lookup
    from medusa.commands import common
    from medusa.training.config import TrainConfig

    assert common.SCHEMES == acceptance.SCHEMES
    assert common.HEAD_TYPES == heads.HEAD_TYPES
    assert common.DEFAULT_HEAD_TYPE == heads.DEFAULT_HEAD_TYPE == TrainConfig.__dataclass_fields__["head_type"].default
    assert (common.DEFAULT_TYPICAL_EPS, common.DEFAULT_TYPICAL_DELTA) == (
        acceptance.DEFAULT_TYPICAL_EPS,
        acceptance.DEFAULT_TYPICAL_DELTA,
    )
    assert (common.DEFAULT_MAX_NGRAM, common.MAX_NGRAM, common.MAX_LOOKUP_NODES) == (
        lookup.DEFAULT_MAX_NGRAM,
        lookup.MAX_NGRAM,
        lookup.MAX_LOOKUP_NODES,
    )
