"""The documentation documents what the code offers: every setting, every error code, links that resolve.

README.md is the front door; the reference lives under docs/. The configuration reference is
generated from the ``Settings`` fields (``scripts/gen_config_docs.py``), so it cannot drift from them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from app.errors import Errors
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"


def _generator() -> ModuleType:
    """The generator script, loaded by path (``scripts/`` is not an installed package)."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_what_the_generator_renders() -> None:
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert _generator().render(committed) == committed, (
        "docs/configuration.md is out of date with the Settings fields in app/settings.py: "
        "run `python scripts/gen_config_docs.py` and commit docs/configuration.md")


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    gen = _generator()
    table = text[text.index(gen.BEGIN):text.index(gen.END)]
    missing = [f"SENTIMENT_{name.upper()}" for name in Settings.model_fields
               if f"| `SENTIMENT_{name.upper()}` |" not in table]
    assert not missing, f"docs/configuration.md's settings table lacks {missing}"


def test_every_error_code_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    table = text[text.index("## Errors"):]
    table = table[:table.index("\n## ")]
    missing = [k.code for k in Errors.all() if f"`{k.code}`" not in table]
    assert not missing, f"docs/api.md's error table lacks the error codes {missing}"


def test_readme_keeps_the_test_command_ci_runs() -> None:
    # .ci/run runs "the README's test command"; the quick start must keep showing exactly that.
    assert 'pip install -e ".[dev]" && python -m pytest' in README.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            slug = base = _slug(m.group(1))
            n = 0
            while slug in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
                n += 1
                slug = f"{base}-{n}"
            anchors.add(slug)
    return anchors


def _links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # links in code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link in the README and docs/ names a file that exists and, with #anchor, a heading in it."""
    broken = []
    for link in _links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"
