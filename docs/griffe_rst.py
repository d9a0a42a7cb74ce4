"""A griffe extension: the reST bits of gradcam_ref's docstrings, as Markdown for mkdocstrings.

The docstrings are Google style with Sphinx math (they read well in ``help()`` and in an
editor). mkdocstrings renders Markdown, so before rendering this extension rewrites

- ``.. math::`` blocks into ``$$ ... $$`` display math,
- ``:math:`x``` into ``$x$`` inline math (pymdownx.arithmatex typesets both),
- ``:func:`name```, ``:class:`name``` and ``:mod:`name``` into cross-references to the API page
  when ``name`` is documented there, else into inline code,
- the Google-style ``Example:`` heading into ``Examples:``, the one griffe renders as doctest
  code (it would render ``Example:`` as a note, its ``>>>`` lines as nested quotes).

The source docstrings are not changed.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

MATH_BLOCK = re.compile(r"^(?P<indent>[ ]*)\.\. math::[ ]*\n(?P<body>(?:(?P=indent)[ ]+.*\n|[ ]*\n)+)", re.M)
INLINE_MATH = re.compile(r":math:`(?P<tex>[^`]+)`")
EXAMPLE_HEADING = re.compile(r"^(?P<indent>[ ]*)Example:[ ]*$", re.M)
ROLE = re.compile(r":(?:func|class|mod|meth|attr):`~?(?P<name>[\w.]+)`")


def rst_to_markdown(text: str, resolve: Any = lambda name: None) -> str:
    """Rewrite the reST math and roles of one docstring; ``resolve(name)`` gives a full path or None."""

    def block(match: re.Match[str]) -> str:
        indent = match["indent"]
        body = textwrap.dedent(match["body"]).strip("\n")
        return f"{indent}$$\n{textwrap.indent(body, indent)}\n{indent}$$\n\n"

    def role(match: re.Match[str]) -> str:
        name = match["name"]
        path = resolve(name)
        return f"[`{name}`][{path}]" if path else f"`{name}`"

    text = MATH_BLOCK.sub(block, text if text.endswith("\n") else text + "\n")
    text = INLINE_MATH.sub(lambda m: f"${m['tex']}$", text)
    text = EXAMPLE_HEADING.sub(lambda m: f"{m['indent']}Examples:", text)
    return ROLE.sub(role, text).rstrip("\n")


class RstToMarkdown(griffe.Extension):
    """Apply :func:`rst_to_markdown` to every docstring once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "gradcam_ref":
            return  # backends/ is converted once attached below gradcam_ref
        if "backends" not in pkg.members:
            _attach_backends(pkg, loader)
        self._convert(pkg, pkg)

    def _convert(self, obj: griffe.Object, pkg: griffe.Module) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, lambda name: _resolve(obj, pkg, name))
        for member in obj.members.values():
            if not member.is_alias:
                self._convert(member, pkg)  # type: ignore[arg-type]


def _attach_backends(pkg: griffe.Module, loader: griffe.GriffeLoader) -> None:
    """Load ``backends/`` as ``gradcam_ref.backends``, as the editable install maps it.

    setuptools' ``package-dir`` puts the folder ``backends/`` at ``gradcam_ref.backends``;
    griffe's finder sees only the folder of ``gradcam_ref``, so the subpackage is attached here.
    Finding the spec imports nothing but ``gradcam_ref`` (no framework).
    """
    spec = importlib.util.find_spec("gradcam_ref.backends")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gradcam_ref.backends is not installed: pip install -e .")
    backends = loader.load(Path(list(spec.submodule_search_locations)[0]))
    assert isinstance(backends, griffe.Module)
    pkg.set_member("backends", backends)


def _resolve(obj: griffe.Object, pkg: griffe.Module, name: str) -> str | None:
    """The public path of ``name`` as seen from ``obj``: ``gradcam_ref.X`` for exported names."""
    short = name.split(".")[-1]
    if any(part.startswith("_") for part in name.split(".")):
        return None  # private: not on the API page, shown as code
    if name.startswith(pkg.name + "."):
        return name if short in pkg.members or name.count(".") > 1 else None
    if short in pkg.members:  # exported by gradcam_ref/__init__.py: documented at gradcam_ref.X
        return f"{pkg.name}.{short}"
    module = obj if obj.is_module else obj.module
    if short in module.members:
        return f"{module.path}.{short}"
    return None
