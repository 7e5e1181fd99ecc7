"""The documentation builds with warnings as errors, offline, and documents every public name."""

from __future__ import annotations

import html as html_lib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for module in ("sphinx", "furo", "myst_parser"):
    pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]' (or '.[test]')")


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once, as scripts/docs.sh does (-W --keep-going), into a temporary folder."""
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
           "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stderr[-5000:]}"
    return out / "html"


def test_api_page_documents_every_public_name(html: Path):
    import monai_patchplug

    api = (html / "api.html").read_text(encoding="utf-8")
    missing = [name for name in monai_patchplug.__all__ if f'id="monai_patchplug.{name}"' not in api]
    assert not missing, f"not on the API page: {missing}"
    assert "str(object=" not in api, "LOCATION shows the docstring of str"
    # every entry has a body: a docstring or, for LOCATION, the page's own text
    for name in monai_patchplug.__all__:
        entry = api.split(f'id="monai_patchplug.{name}"', 1)[1].split("</dl>", 1)[0]
        assert "<p>" in entry, f"{name} has an empty entry"
        signature = re.search(rf'id="monai_patchplug\.{name}">(.*?)</dt>', api, re.S).group(1)
        signature = html_lib.unescape(re.sub(r"<[^>]+>", "", signature))
        assert "(*args, **kwargs)" not in signature, f"{name}: the real parameters are not shown"


@pytest.mark.parametrize("page", ["index", "getting-started", "samplers", "inference", "queue", "migrating",
                                  "benchmarks", "api", "changelog", "development", "tutorials/index"])
def test_page_renders_without_raw_markup(html: Path, page: str):
    text = (html / f"{page}.html").read_text(encoding="utf-8")
    body = re.sub(r"<pre>.*?</pre>", "", text, flags=re.S)  # code blocks may show anything
    for leftover in ("```", "{include}", ":start-after:", "<!-- docs:", "# %%"):
        assert leftover not in body, f"{page}.html shows {leftover!r}"


def test_tutorials_are_rendered_with_their_figures(html: Path):
    scripts = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
    assert scripts
    for script in scripts:
        page = (html / "tutorials" / f"{script.stem}.html").read_text(encoding="utf-8")
        assert "# %%" not in page, f"{script.name}: cell markers left in the page"
        assert 'class="highlight-python' in page, f"{script.name}: no code block"
        for figure in re.findall(r"""save_figure\(\s*\w+\s*,\s*["']([\w.-]+\.png)""", script.read_text()):
            assert f"_images/{figure}" in page, f"{script.name}: figure {figure} missing"
            assert (html / "_images" / figure).is_file()
    assert "_images/02_overlap_modes.png" in (html / "inference.html").read_text(encoding="utf-8")


def test_readme_links_to_tutorials_point_at_pages(html: Path):
    inference = (html / "inference.html").read_text(encoding="utf-8")
    assert "tutorials/05_distributed_inference.html" in inference
    assert ".py\"" not in re.sub(r'href="_downloads/[^"]*"', "", inference)
