"""Sphinx helpers for the monai_patchplug documentation.

* Included files are rewritten as they are read (Sphinx's ``include-read`` event, which MyST's ``{include}`` emits):
  - the percent-format tutorial scripts (``tutorials/NN_*.py``) become MyST Markdown: ``# %% [markdown]`` cells
    turn into text, code cells into ``python`` blocks, and each ``save_figure(fig, "NAME")`` is followed by the
    figure ``tutorials/figures/NAME`` that the script writes;
  - the README's links to the tutorial scripts point at the rendered tutorial pages instead.
* Intersphinx works offline: small inventories of the MONAI, PyTorch and numpy objects these pages refer to are
  written into the build directory and read from there, so a build never waits for the network. With
  ``MPP_DOCS_ONLINE_INVENTORIES=1`` the projects' published inventories are tried first (these stay the fallback).
* Napoleon turns ``a, b, c: text`` in an ``Args:`` section into one parameter entry per name, each with the
  whole text; the second and later ones are shortened to a pointer to the first.
* A constant (``LOCATION``) does not show the docstring of its type (``str``); the API page gives its text.
* Classes whose signature autodoc takes from MONAI's ``MapTransform.__new__`` (``(*args, **kwargs)``) are shown
  with the parameters of their ``__init__``.
* Base classes that are public names of the package are shown under their public name
  (``monai_patchplug.PatchSampler``, not the module that defines it), so the link to the API page resolves.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

TUTORIAL_SCRIPT = re.compile(r"(^|/)tutorials/\d\d_\w+\.py$")
CELL = re.compile(r"^# %%(.*)$")
FIGURE = re.compile(r"""save_figure\(\s*\w+\s*,\s*["']([\w.-]+\.png)["']""")


def percent_script_to_myst(source: str) -> str:
    """A percent-format script (``# %%`` code cells, ``# %% [markdown]`` text cells) as MyST Markdown."""
    cells: list[tuple[str, list[str]]] = []
    kind, lines = "code", []
    for line in source.splitlines():
        match = CELL.match(line)
        if match:
            cells.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in match.group(1) else "code"), []
        else:
            lines.append(line)
    cells.append((kind, lines))
    blocks = []
    for kind, lines in cells:
        while lines and not lines[0].strip():
            lines = lines[1:]
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        if not lines:
            continue
        if kind == "markdown":
            blocks.append("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines))
            continue
        code = "\n".join(lines)
        blocks.append(f"```python\n{code}\n```")
        for name in FIGURE.findall(code):
            alt = name.removesuffix(".png").replace("_", " ")
            blocks.append(f"![{alt}](figures/{name})")
    return "\n\n".join(blocks) + "\n"


README_LINKS = (
    (re.compile(r"\]\(tutorials/(\d\d_\w+)\.py\)"), r"](/tutorials/\1.md)"),
    (re.compile(r"\]\(tutorials/bundle/docs/README\.md\)"), "](/tutorials/03_bundle.md)"),
    # the README's sections sit on different pages here
    (re.compile(r"\(see the migration table below\)"), "(see [the migration table](/migrating.md))"),
)


def rewrite_included(app: Sphinx, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    path = Path(relative_path).as_posix()
    if TUTORIAL_SCRIPT.search(path):
        content[0] = percent_script_to_myst(content[0])
    elif path.endswith("README.md") and "tutorials/" not in path:
        for pattern, replacement in README_LINKS:
            content[0] = pattern.sub(replacement, content[0])


# project key -> (project name, documentation root, {name: (role, page under the root, anchor)})
INVENTORIES: dict[str, tuple[str, str, dict[str, tuple[str, str, str]]]] = {
    "monai": (
        "MONAI",
        "https://docs.monai.io/en/stable/",
        {
            **{
                name: ("class", "transforms.html", f"monai.transforms.{name.rsplit('.', 1)[1]}")
                for plain in ("MapTransform", "Randomizable", "InvertibleTransform", "LazyTransform", "Transform")
                for name in (
                    f"monai.transforms.{plain}",
                    f"monai.transforms.{'inverse' if plain == 'InvertibleTransform' else 'transform'}.{plain}",
                )
            },
            **{
                f"monai.transforms.{name}": ("class", "transforms.html", f"monai.transforms.{name}")
                for name in (
                    "Compose", "Invertd", "LoadImaged", "EnsureChannelFirstd", "SaveImaged", "RandSpatialCropSamplesd",
                    "RandWeightedCropd", "RandCropByPosNegLabeld", "RandCropByLabelClassesd", "FgBgToIndicesd",
                    "ClassesToIndicesd",
                )
            },
            **{
                f"{module}.{name}": ("class", "inferers.html", f"monai.inferers.{name}")
                for name in ("Inferer", "SlidingWindowInferer", "PatchInferer", "Merger", "AvgMerger")
                for module in ("monai.inferers", "monai.inferers.inferer")
            },
            **{
                f"monai.data.{name}": ("class", "data.html", f"monai.data.{name}")
                for name in ("MetaTensor", "DataLoader", "Dataset", "CacheDataset")
            },
            "monai.data.meta_tensor.MetaTensor": ("class", "data.html", "monai.data.MetaTensor"),
            "monai.data.list_data_collate": ("function", "data.html", "monai.data.utils.list_data_collate"),
            "monai.data.utils.list_data_collate": ("function", "data.html", "monai.data.utils.list_data_collate"),
            "monai.engines.SupervisedEvaluator": ("class", "engines.html", "monai.engines.SupervisedEvaluator"),
            "monai.engines.SupervisedTrainer": ("class", "engines.html", "monai.engines.SupervisedTrainer"),
        },
    ),
    "torch": (
        "PyTorch",
        "https://pytorch.org/docs/stable/",
        {
            "torch.Tensor": ("class", "tensors.html", "torch.Tensor"),
            "torch.device": ("class", "tensor_attributes.html", "torch.device"),
            "torch.dtype": ("class", "tensor_attributes.html", "torch.dtype"),
            "torch.nn.Module": ("class", "generated/torch.nn.Module.html", "torch.nn.Module"),
            **{
                f"{module}.{name}": ("class", "data.html", f"torch.utils.data.{name}")
                for name in ("IterableDataset", "Dataset", "DataLoader")
                for module in ("torch.utils.data", "torch.utils.data.dataset")
            },
            **{
                f"torch.distributed.{name}": ("function", "distributed.html", f"torch.distributed.{name}")
                for name in ("init_process_group", "all_reduce", "reduce", "new_group")
            },
        },
    ),
    "numpy": (
        "NumPy",
        "https://numpy.org/doc/stable/",
        {
            "numpy.ndarray": ("class", "reference/generated/numpy.ndarray.html", "numpy.ndarray"),
            "numpy.memmap": ("class", "reference/generated/numpy.memmap.html", "numpy.memmap"),
            "numpy.pad": ("function", "reference/generated/numpy.pad.html", "numpy.pad"),
        },
    ),
}


def write_inventory(path: Path, project: str, entries: dict[str, tuple[str, str, str]]) -> None:
    """Write a Sphinx inventory (format 2) of ``name -> (role, page, anchor)`` entries."""
    body = "".join(f"{name} py:{role} 1 {page}#{anchor} -\n" for name, (role, page, anchor) in sorted(entries.items()))
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n# Version: stable\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(header.encode() + zlib.compress(body.encode()))
    tmp.replace(path)


def offline_intersphinx(app: Sphinx, config: Config) -> None:
    folder = Path(app.doctreedir) / "mpp_inventories"
    online = os.environ.get("MPP_DOCS_ONLINE_INVENTORIES") == "1"
    mapping = {}
    for key, (project, url, entries) in INVENTORIES.items():
        local = folder / f"{key}.inv"
        write_inventory(local, project, entries)
        mapping[key] = (url, (None, str(local)) if online else (str(local),))
    config.intersphinx_mapping = mapping


def public_bases(app: Sphinx, name: str, obj: object, options: dict, bases: list) -> None:
    import monai_patchplug

    public = {id(getattr(monai_patchplug, n)): n for n in monai_patchplug.__all__}
    for i, base in enumerate(bases):
        if id(base) in public:
            bases[i] = f":py:class:`monai_patchplug.{public[id(base)]}`"


def init_signature(
    app: Sphinx, what: str, name: str, obj: object, options: dict, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    if what != "class" or signature != "(*args, **kwargs)" or "__init__" not in vars(obj):
        return None
    from sphinx.util.inspect import signature as get_signature
    from sphinx.util.inspect import stringify_signature

    sig = get_signature(obj.__init__, bound_method=True)
    return stringify_signature(sig, show_annotation=app.config.autodoc_typehints == "signature"), return_annotation


PARAM = re.compile(r"^:param (\w+):(.*)$")


def shared_parameter_text(app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]) -> None:
    """After napoleon: a parameter whose text repeats an earlier parameter's points to that one instead."""
    blocks: list[list[str]] = []
    for line in lines:  # a field is its first line and the indented lines after it
        if blocks and blocks[-1][0].startswith(":") and line.startswith((" ", "\t")):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    seen: dict[tuple[str, ...], str] = {}
    out: list[str] = []
    for block in blocks:
        match = PARAM.match(block[0])
        if match:
            text = (match.group(2).strip(), *(line.strip() for line in block[1:] if line.strip()))
            if len(" ".join(text)) > 80 and text in seen:
                out.append(f":param {match.group(1)}: as ``{seen[text]}``.")
                continue
            seen.setdefault(text, match.group(1))
        out.extend(block)
    lines[:] = out


def no_type_docstring(app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]) -> None:
    if what in ("data", "attribute") and not isinstance(obj, type) and obj.__doc__ == type(obj).__doc__:
        lines[:] = []


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("include-read", rewrite_included)
    app.connect("config-inited", offline_intersphinx, priority=100)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("autodoc-process-signature", init_signature)
    app.connect("autodoc-process-docstring", shared_parameter_text, priority=900)
    app.connect("autodoc-process-docstring", no_type_docstring)  # napoleon runs at 500
    return {"parallel_read_safe": True, "parallel_write_safe": True}
