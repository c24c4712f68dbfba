"""The README documents what the code offers: every setting, every error code."""

from __future__ import annotations

from pathlib import Path

from app.errors import Errors
from app.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README[README.index("## Configuration"):README.index("## Deployment")]
    missing = [f"SENTIMENT_{name.upper()}" for name in Settings.model_fields
               if f"| `SENTIMENT_{name.upper()}` |" not in table]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_error_code_is_in_the_readme() -> None:
    missing = [k.code for k in Errors.all() if f"`{k.code}`" not in README]
    assert not missing, f"README lacks the error codes {missing}"
