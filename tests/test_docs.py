"""The documentation never rots: every code block in ``docs/*.md`` runs here, and the site builds.

Each page is one test. Its fenced code blocks run in order in one namespace, as a reader would
type them into one session:

- ``pycon`` blocks are doctests (``>>>`` lines and their printed output), compared exactly
  up to whitespace (and ``...``, which stands for the rest of a long error message);
- ``python`` blocks are executed;
- ``bash`` blocks may only hold commands this repository defines: ``make TARGET`` (the target
  must exist in the Makefile), ``gradcam-ref ...`` (run, must exit 0) and
  ``pip install -e '.[EXTRAS]'`` (each extra must exist in pyproject.toml).

- ``text`` blocks are command-line synopses: each line starting with ``gradcam-ref COMMAND`` (and
  its indented continuation lines) may name only options that COMMAND's parser has.

The README's blocks run the same way. Any other fence language fails the test, so that no block
can hide from it. The figures the
pages show come from ``docs/make_figures.py`` and the whole site is built with
``mkdocs build --strict`` (broken links, missing figures, API names that no longer exist and
docstrings that do not render all fail it).
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.MULTILINE | re.DOTALL,
)
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+)")


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line number)`` of every fenced block, in page order, dedented."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = len(match["indent"])
        lines = match["body"].splitlines(keepends=True)
        body = "".join(line[indent:] if line[:indent].isspace() else line for line in lines)
        blocks.append((match["lang"], body, text.count("\n", 0, match.start()) + 1))
    return blocks


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^(\w[\w.-]*):", text, re.MULTILINE)}


def pyproject_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.MULTILINE))


def check_shell_line(line: str, where: str) -> None:
    """A shell line in the docs is a command this repository defines, and it works."""
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[0] == "make":
        missing = set(words[1:]) - makefile_targets()
        assert not missing, f"{where}: `{line}` names Makefile targets that do not exist: {missing}"
    elif words[0] == "gradcam-ref":
        from gradcam_ref import cli

        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(words[1:]) == 0, f"{where}: `{line}` failed"
    elif words[:3] == ["pip", "install", "-e"] and len(words) == 4:
        extras = re.fullmatch(r"\.\[([\w,-]+)\]", words[3])
        assert extras, f"{where}: `{line}`: expected pip install -e '.[extra,...]'"
        missing = set(extras.group(1).split(",")) - pyproject_extras()
        assert not missing, f"{where}: `{line}` names extras pyproject.toml lacks: {missing}"
    else:
        raise AssertionError(f"{where}: the docs' test cannot check the shell line `{line}`")


def check_synopsis(code: str, where: str) -> None:
    """A usage synopsis names only options that its command has (``gradcam-ref COMMAND ...``)."""
    from gradcam_ref import cli

    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    command = None
    for line in code.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "gradcam-ref":
            assert len(words) > 1 and words[1] in commands, f"{where}: `{line}` names no command of gradcam-ref"
            command = commands[words[1]]
        else:
            assert command is not None and line[:1].isspace(), f"{where}: `{line}` is not a gradcam-ref synopsis"
        known = {option for action in command._actions for option in action.option_strings}
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", line.split("#", 1)[0]))
        assert named <= known, f"{where}: `{line}` names options that {command.prog} lacks: {named - known}"


def run_page(page: Path) -> None:
    """Every fenced block of ``page`` in order, in one namespace (see the module docstring)."""
    blocks = code_blocks(page.read_text())
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    with np.printoptions():  # a page's np.set_printoptions stays on its page
        for lang, code, line in blocks:
            where = f"{page.name}:{line}"
            if lang == "pycon":
                test = parser.get_doctest(code, namespace, where, str(page), line)
                assert test.examples, f"{where}: a pycon block without >>> examples"
                report = io.StringIO()
                result = runner.run(test, out=report.write, clear_globs=False)
                namespace.update(test.globs)  # DocTest runs on a copy: keep what it defined
                assert result.failed == 0, f"{where}: doctest failed\n{report.getvalue()}"
            elif lang == "python":
                exec(compile(code, where, "exec"), namespace)
            elif lang == "bash":
                for shell_line in code.splitlines():
                    check_shell_line(shell_line, where)
            elif lang == "text":
                check_synopsis(code, where)
            else:
                raise AssertionError(f"{where}: fence language {lang!r} is not run by the docs' test")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page: Path) -> None:
    run_page(page)


def test_readme_code_blocks_run() -> None:
    run_page(ROOT / "README.md")


def test_synopses_are_checked() -> None:
    check_synopsis("gradcam-ref explain IMAGE --model M [--layer NAME]\n    [--out DIR]", "here")
    with pytest.raises(AssertionError, match=r"names options that gradcam-ref explain lacks: \{'--colour'\}"):
        check_synopsis("gradcam-ref explain IMAGE\n    [--colour C]", "here")
    with pytest.raises(AssertionError, match="names no command"):
        check_synopsis("gradcam-ref paint", "here")
    with pytest.raises(AssertionError, match="is not a gradcam-ref synopsis"):
        check_synopsis("rm -rf /", "here")


def test_every_page_has_code() -> None:
    """A page that teaches without one executed number is allowed only for the API reference."""
    for page in PAGES:
        if page.name != "reference.md":
            assert code_blocks(page.read_text()), f"{page.name} has no code block"


def test_code_block_parser() -> None:
    text = textwrap.dedent(
        """\
        Intro.

        ```pycon
        >>> 1 + 1
        2
        ```

        !!! note
            ```python
            x = 3
            ```
        """
    )
    assert code_blocks(text) == [("pycon", ">>> 1 + 1\n2\n", 3), ("python", "x = 3\n", 9)]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of docs/ with its figures made by docs/make_figures.py, built by mkdocs --strict."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mkdocs is not installed: install the docs extra (make test does, via the test extra)")
    work = tmp_path_factory.mktemp("docs-build")
    shutil.copytree(DOCS, work / "docs", ignore=shutil.ignore_patterns("figures", "__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", work / "mkdocs.yml")
    figures = subprocess.run(
        [sys.executable, str(work / "docs" / "make_figures.py"), str(work / "docs" / "figures")],
        capture_output=True, text=True, cwd=work,
    )
    assert figures.returncode == 0, figures.stderr
    build = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(work / "site")],
        capture_output=True, text=True, cwd=work,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr}"
    return work


def test_mkdocs_build_strict(built_site: Path) -> None:
    for page in PAGES:
        stem = "" if page.stem == "index" else f"{page.stem}/"
        assert (built_site / "site" / stem / "index.html").is_file(), f"{page.name} was not built"


def test_figures_come_from_the_script(built_site: Path) -> None:
    """Every picture a page shows is made by docs/make_figures.py, and the script makes no other."""
    shown = {m["path"] for page in PAGES for m in IMAGE.finditer(page.read_text())}
    made = {f"figures/{p.name}" for p in (built_site / "docs" / "figures").iterdir()}
    assert shown, "no page shows a figure"
    assert shown == made, f"shown but not made: {shown - made}; made but not shown: {made - shown}"


def test_api_reference_renders_math(built_site: Path) -> None:
    """Docstrings' ``:math:`` and ``.. math::`` reach the site as math, not as reST source, and
    their ``Example:`` sections as code, not as nested quotes."""
    html = (built_site / "site" / "reference" / "index.html").read_text()
    assert html.count('class="arithmatex"') > 20
    assert ":math:" not in html and ".. math::" not in html and ":func:" not in html
    assert "<blockquote>" not in html
    assert html.count("&gt;&gt;&gt;") >= 8  # the docstrings' doctests, shown as code
