"""The docstring examples run, and every public name has one (issue 17).

Every docstring of every module of the package is searched for ``>>>`` examples with :mod:`doctest` (what
``pytest --doctest-modules monai_patchplug`` collects, with the same option flags as pyproject.toml's
``doctest_optionflags``), and each docstring's examples run as one test, so ``pytest -q`` runs them with the rest of
the suite. A public constant has no docstring of its own: its documentation is the ``#:`` comment above its
assignment (as Sphinx reads it), whose examples run too.

Each example runs with torch's, numpy's and Python's global random states saved and restored, so an example that
draws random numbers does not change what later tests draw.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import random
import re
import time

import numpy as np
import pytest
import torch

import monai_patchplug

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: an example should take well under a second; this generous bound only catches one that became heavy
SECONDS = 10.0

MODULES = [monai_patchplug] + [
    importlib.import_module(info.name)
    for info in pkgutil.walk_packages(monai_patchplug.__path__, prefix=f"{monai_patchplug.__name__}.")
]


def attribute_doc(name: str) -> tuple[str, object, int] | None:
    """The ``#:`` comment block above ``name = ...`` in the package's modules: ``(text, module, line)``, or ``None``."""
    for module in MODULES:
        lines = inspect.getsource(module).splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"{re.escape(name)}\s*(:[^=]+)?=", line):
                first = i
                while first > 0 and lines[first - 1].startswith("#:"):
                    first -= 1
                if first < i:
                    text = "\n".join(re.sub(r"^#: ?", "", row) for row in lines[first:i])
                    return text, module, first
    return None


def public_doc(name: str) -> str | None:
    """The docstring of public ``name`` (its own, not one inherited), or a constant's ``#:`` comment."""
    obj = getattr(monai_patchplug, name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return inspect.cleandoc(obj.__doc__) if obj.__doc__ else None
    found = attribute_doc(name)
    return None if found is None else found[0]


def example_section(doc: str) -> str | None:
    """The body of the docstring's Google-style ``Example:`` section (the lines indented below it), or ``None``."""
    lines = doc.expandtabs().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Example:":
            indent = len(line) - len(line.lstrip())
            body = []
            for row in lines[i + 1 :]:
                if row.strip() and len(row) - len(row.lstrip()) <= indent:
                    break
                body.append(row)
            return "\n".join(body)
    return None


def collect() -> list[doctest.DocTest]:
    """Every docstring of the package's modules that holds examples, and the public constants' ``#:`` comments."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [test for module in MODULES for test in finder.find(module) if test.examples]
    parser = doctest.DocTestParser()
    for name in monai_patchplug.__all__:
        obj = getattr(monai_patchplug, name)
        if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
            continue
        found = attribute_doc(name)
        if found is not None:
            text, module, line = found
            test = parser.get_doctest(text, dict(vars(module)), f"{module.__name__}.{name}", module.__file__, line)
            if test.examples:
                tests.append(test)
    return sorted(tests, key=lambda test: test.name)


TESTS = collect()


def test_examples_are_collected():
    names = {test.name.rsplit(".", 1)[-1] for test in TESTS}
    assert set(monai_patchplug.__all__) <= names, f"no examples run for {sorted(set(monai_patchplug.__all__) - names)}"


@pytest.mark.parametrize("name", monai_patchplug.__all__)
def test_public_name_has_an_example(name: str):
    doc = public_doc(name)
    assert doc, f"{name} has no docstring (a constant: no #: comment above its assignment)"
    section = example_section(doc)
    assert section is not None, f"{name}'s docstring has no Google-style 'Example:' section"
    assert re.search(r"^\s*>>> ", section, re.M), f"{name}'s 'Example:' section has no runnable '>>>' line"


@pytest.mark.parametrize("test", TESTS, ids=[test.name.removeprefix("monai_patchplug.") for test in TESTS])
def test_docstring_examples_run(test: doctest.DocTest):
    # a fresh copy: the runner clears the globals it is given
    fresh = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename, test.lineno, test.docstring)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            result = runner.run(fresh, out=report.append)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    seconds = time.perf_counter() - start
    assert result.failed == 0, "".join(report)
    assert seconds < SECONDS, f"{test.name}: the examples took {seconds:.1f} s; keep them small"
