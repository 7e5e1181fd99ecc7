"""Sphinx configuration of the monai_patchplug documentation (``bash scripts/docs.sh`` builds it)."""

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the working tree, installed or not
sys.path.insert(0, str(DOCS / "_ext"))

project = "monai_patchplug"
author = "monai_patchplug maintainers"
copyright = "2026, monai_patchplug maintainers"
release = re.search(r"^version\s*=\s*(\S+)", (ROOT / "setup.cfg").read_text(), re.M).group(1)
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
    "mpp_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# MyST: GitHub-style Markdown as in the README, with `{directive}` fences and heading anchors for links.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings; types go into the parameter lists, signatures stay readable.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# intersphinx: the mapping is filled in by mpp_docs from inventories written into the build directory, so the
# build needs no network (MPP_DOCS_ONLINE_INVENTORIES=1 tries the published ones first).
intersphinx_mapping: dict = {}
intersphinx_timeout = 5

html_theme = "furo"
html_title = f"monai_patchplug {release}"
html_static_path = ["_static"]
html_css_files = ["mpp.css"]
html_theme_options = {"navigation_with_keys": True}
