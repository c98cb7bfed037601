"""The generated reference pages are what the code and the results say (regenerate with
`driftline reference configuration --write` / `driftline reference benchmarks --write`)."""

from __future__ import annotations

from pathlib import Path

from driftline.reference import benchmarks, configuration

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_page_is_the_settings_class():
    assert (ROOT / "docs" / "configuration.md").read_text() == configuration.render()


def test_every_setting_says_what_it_means():
    assert [row.variable for row in configuration.settings_rows() if not row.meaning] == []


def test_the_benchmarks_page_is_the_committed_results():
    assert (ROOT / "docs" / "benchmarks.md").read_text() == benchmarks.render(ROOT / "reports" / "bench")


def test_the_readme_figures_are_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme == benchmarks.readme_with_figures(readme, ROOT / "reports" / "bench")
