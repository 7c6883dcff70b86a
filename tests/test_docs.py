"""The documentation (issue 31): the README is a front door of at most 250 lines, every relative link in it and in
docs/ resolves, and the table of the shipped models in docs/pretrained.md is the one their files give."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for needed in ("make demo", "make test", "lebm-zoo fit --recipe", "load_pretrained", "## Adding a model"):
        assert needed in text, needed


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://|mailto:|#", link)]
    missing = [link for link in local if link and not (page.parent / link).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_the_table_of_shipped_models_is_current(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pretrained_table  # `python benchmarks/pretrained_table.py --check`, in this process

    assert pretrained_table.main(["--check"]) == 0, capsys.readouterr().err
