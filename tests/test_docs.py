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
docstrings that do not render all fail it). The built site needs no network: its math is MathML
made at build time (docs/mathml.py), checked in the HTML and laid out by a headless Chromium.
"""

from __future__ import annotations

import contextlib
import doctest
import html
import io
import json
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
    page = (built_site / "site" / "reference" / "index.html").read_text()
    assert page.count("<math ") > 20
    assert ":math:" not in page and ".. math::" not in page and ":func:" not in page
    assert "<blockquote>" not in page
    assert page.count("&gt;&gt;&gt;") >= 8  # the docstrings' doctests, shown as code


CODE = re.compile(r"<(pre|code|script)\b.*?</\1>", re.DOTALL)
UNRENDERED_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$<>\n]*\\[A-Za-z]+[^$<>\n]*\$")
URL = re.compile(r"(?:https?:)?//(?P<host>[\w.-]+\.[a-z]{2,})(?P<path>[^\s\"'`)<>\\]*)", re.IGNORECASE)
CDN_HOST = re.compile(r"jsdelivr|cdnjs|unpkg|googleapis|gstatic|bootstrapcdn|polyfill|code\.jquery|(?:^|\.)cdn\.", re.I)
MATH_SCRIPT = re.compile(r"mathjax|katex", re.IGNORECASE)
# The theme's script holds two fallbacks it fetches only when a browser has no ResizeObserver
# (every current one has) or a page has a mermaid diagram (none has): the only CDN URLs allowed.
THEME_FALLBACKS = {"https://unpkg.com/resize-observer-polyfill", "https://unpkg.com/mermaid@11/dist/mermaid.min.js"}
RESOURCE = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)=\"(?P<url>[^\"]+)\"")


def site_pages(site: Path) -> list[Path]:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > len(PAGES), "the built site has fewer pages than docs/"
    return pages


def test_site_math_is_rendered_at_build_time(built_site: Path) -> None:
    """No page keeps TeX for a script to typeset: every formula is a <math> element."""
    site = built_site / "site"
    for page in site_pages(site):
        text = CODE.sub("", page.read_text())
        left = [m[0] for m in UNRENDERED_TEX.finditer(text)]
        assert not left, f"{page.relative_to(site)}: TeX left unrendered: {left[:5]}"
    math = (site / "math" / "index.html").read_text()
    assert math.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">') >= 5
    assert math.count('display="inline">') >= 20


def test_site_loads_nothing_from_the_network(built_site: Path) -> None:
    """No CDN anywhere in the site (MathJax, fonts...) and every script, style and image is local."""
    site = built_site / "site"
    for path in sorted(p for p in site.rglob("*") if p.suffix in {".html", ".css", ".js", ".json", ".xml", ".map"}):
        urls = {
            m[0] for m in URL.finditer(path.read_text(errors="replace"))
            if CDN_HOST.search(m["host"]) or MATH_SCRIPT.search(m[0])
        }
        if path.parent.name == "javascripts" and path.name.startswith("bundle."):  # the theme's script, its map
            urls -= THEME_FALLBACKS
        assert not urls, f"{path.relative_to(site)} names CDN URLs: {sorted(urls)[:5]}"
    for page in site_pages(site):
        text = page.read_text()
        assert 'class="mermaid"' not in text, f"{page.relative_to(site)}: a mermaid diagram loads mermaid from a CDN"
        remote = [m["url"] for m in RESOURCE.finditer(text) if re.match(r"(?:[a-z]+:)?//", m["url"])]
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def chromium() -> str | None:
    """A headless-capable Chromium or Chrome on PATH (make test installs Debian's chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# Appended to a copy of the math page: once loaded, measure the first display equation's layout.
LAYOUT_PROBE = """<script>
addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, height: r.height}; };
  let report;
  try {
    const math = document.querySelector('math[display="block"]');
    const frac = math.querySelector("mfrac"), sup = math.querySelector("msubsup, msup");
    report = {
      mathml: math instanceof MathMLElement, math: box(math),
      numerator: box(frac.children[0]), denominator: box(frac.children[1]),
      base: box(sup.children[0]), script: box(sup.children[sup.children.length - 1]),
      remote: performance.getEntriesByType("resource").map((e) => e.name).filter((n) => !n.startsWith("file:")),
    };
  } catch (error) {
    report = {error: `no display equation with a fraction and a script: ${error}`};
  }
  const out = document.createElement("pre");
  out.id = "layout-probe";
  out.textContent = JSON.stringify(report);
  document.body.append(out);
});
</script>"""


def test_browser_lays_out_the_math(built_site: Path, tmp_path: Path) -> None:
    """A real browser, with no network, lays out an equation of the math page as math."""
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH and none could be installed (make test runs apt-get install chromium)")
    site = tmp_path / "site"
    shutil.copytree(built_site / "site", site)
    page = site / "math" / "index.html"
    probe = page.with_name("layout-probe.html")
    probe.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,1000", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="layout-probe">(.*?)</pre>', run.stdout, re.DOTALL)
    assert found, f"Chromium did not run the probe (exit {run.returncode}):\n{run.stderr[-2000:]}"
    layout = json.loads(html.unescape(found[1]))
    assert "error" not in layout, layout.get("error")
    assert layout["mathml"], "the equation is not a MathML element"
    assert layout["math"]["width"] > 50 and layout["math"]["height"] > 10, layout["math"]
    num, den = layout["numerator"], layout["denominator"]
    assert num["bottom"] <= den["top"] + 1, f"the fraction is not stacked: {num} {den}"
    assert num["left"] < den["right"] and den["left"] < num["right"], f"numerator and denominator apart: {num} {den}"
    base, script = layout["base"], layout["script"]
    assert script["left"] >= base["right"] - 1 and script["height"] < base["height"], f"no script: {base} {script}"
    assert layout["remote"] == [], f"the page fetched {layout['remote']}"
