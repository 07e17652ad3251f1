"""Sphinx extension for the course site: every lab page offers the STUDENT notebook, not the solved master.

A lab page is built from its solved master `notebooks/NN_slug.ipynb`; learners should work in
`notebooks/student/NN_slug.ipynb` (solutions stripped, outputs cleared). This extension

* copies each lab's student notebook into the site (`student/NN_slug.ipynb`), so "download" works offline;
  when `notebooks/student/` has not been generated yet it builds the same file with `labkit.release`;
* puts a "Work through this lab" box under the lab's title: Open in Colab (the student notebook on GitHub,
  from the repository URL in `_config.yml`) and Download the student notebook;
* points the theme's rocket (launch) menu at the student notebook too, and its download menu at the student
  notebook instead of the master's source;
* labels the folded solution cells "Show the solution";
* drops the `# NBVAL_...` directive comments (instructions for the tests) from the code shown on the site;
* leaves out sphinx-thebe's scripts (Jupyter Book loads them twice, a JavaScript error on every page, and
  live code would need a server on the network: the labs open in Colab or locally instead).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
LAB_DOCNAME = re.compile(r"^notebooks/(?P<slug>\d{2}_[\w-]+)$")
NBVAL_COMMENT = re.compile(r"^# NBVAL_[A-Z_]+[ \t]*\n?", re.MULTILINE)
SOLUTION = "### BEGIN SOLUTION"
STUDENT_DIR = "student"  # folder of the built site holding the student notebooks


def _lab_slug(docname: str) -> str | None:
    """`NN_slug` when `docname` is a lab page (a master notebook), else None."""
    match = LAB_DOCNAME.match(docname)
    return match["slug"] if match else None


def _colab_url(app: Sphinx, slug: str) -> str:
    """Colab URL opening the student notebook of lab `slug` from the repository on GitHub."""
    options = app.config.html_theme_options
    repo = options["repository_url"].rstrip("/").removesuffix(".git")
    org_repo = repo.split("github.com/", 1)[1]
    colab = options.get("launch_buttons", {}).get("colab_url", "https://colab.research.google.com").rstrip("/")
    branch = options.get("repository_branch") or "main"
    return f"{colab}/github/{org_repo}/blob/{branch}/notebooks/student/{slug}.ipynb"


def _relative_root(docname: str) -> str:
    """Relative URL from page `docname` up to the site root ('' or '../', ...)."""
    return "../" * docname.count("/")


def label_solutions(app: Sphinx, doctree: nodes.document) -> None:
    """Folded cells holding a solution say "Show the solution" instead of myst-nb's "Show code cell source"."""
    if _lab_slug(app.env.docname) is None:
        return
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") == "cell_code" and cell.get("hide_mode") == "input" and SOLUTION in cell.astext():
            cell["prompt_show"] = "Show the solution"
            cell["prompt_hide"] = "Hide the solution"


def tag_solution_toggles(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Give the folded solutions (wrapped by myst-nb's post-transform) a class the stylesheet can colour."""
    for toggle in doctree.findall(lambda node: type(node).__name__ == "HideCodeCellNode"):
        if SOLUTION in toggle.astext():
            toggle["classes"].append("course-solution")


def strip_nbval_comments(app: Sphinx, doctree: nodes.document) -> None:
    """Remove `# NBVAL_CHECK_OUTPUT`-style lines (test directives, noise to a learner) from shown code."""
    if _lab_slug(app.env.docname) is None:
        return
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        cleaned = NBVAL_COMMENT.sub("", text)
        if cleaned != text:
            block.children = [nodes.Text(cleaned)]
            block.rawsource = cleaned


def add_launch_box(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Insert the Colab / download box right under a lab page's title."""
    slug = _lab_slug(docname)
    if slug is None:
        return
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None or not isinstance(section[0], nodes.title):
        LOGGER.warning("lab page %s has no title: no launch box added", docname, location=docname)
        return
    download = f"{_relative_root(docname)}{STUDENT_DIR}/{slug}.ipynb"
    html = f"""
<div class="lab-launch" data-student-notebook="notebooks/student/{slug}.ipynb">
  <span class="lab-launch-title">Work through this lab</span>
  <a class="lab-launch-button lab-launch-colab" href="{_colab_url(app, slug)}" target="_blank"
     rel="noopener">Open in Colab</a>
  <a class="lab-launch-button lab-launch-download" href="{download}" download="{slug}.ipynb">Download the
     student notebook</a>
  <span class="lab-launch-hint">or run <code>make lab</code> and open
     <code>notebooks/student/{slug}.ipynb</code>. This page is the solved lab: its solutions are folded,
     open one (<em>Show the solution</em>) only when you are stuck.</span>
</div>"""
    section.insert(1, nodes.raw("", html, format="html"))


def retarget_header_buttons(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Point the theme's Colab and .ipynb download buttons of a lab page at its student notebook."""
    slug = _lab_slug(pagename)
    if slug is None:
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "launch-buttons":
            for button in group["buttons"]:
                if button.get("text") == "Colab":
                    button["url"] = _colab_url(app, slug)
                    button["tooltip"] = "Open the student notebook in Colab"
        elif group.get("label") == "download-buttons":
            for button in group["buttons"]:
                if button.get("label") in ("download-source-button", "download-notebook-button"):
                    button["url"] = f"{_relative_root(pagename)}{STUDENT_DIR}/{slug}.ipynb"
                    button["tooltip"] = "Download the student notebook"


def drop_thebe_assets(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Remove sphinx-thebe's script, inline configuration and stylesheet from every page."""

    def is_thebe(asset) -> bool:
        body = str(getattr(asset, "attributes", {}).get("body", ""))
        return "thebe" in str(getattr(asset, "filename", "") or "") or "THEBE_JS_URL" in body

    context["script_files"] = [js for js in context.get("script_files", []) if not is_thebe(js)]
    context["css_files"] = [css for css in context.get("css_files", []) if not is_thebe(css)]


def copy_student_notebooks(app: Sphinx, exception: Exception | None) -> None:
    """Put every lab's student notebook in the built site (generated with labkit.release if missing)."""
    if exception is not None or app.builder.format != "html":
        return
    root = Path(app.srcdir)
    out = Path(app.outdir) / STUDENT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for docname in sorted(app.env.found_docs):
        slug = _lab_slug(docname)
        if slug is None:
            continue
        student = root / "notebooks" / "student" / f"{slug}.ipynb"
        if student.is_file():
            shutil.copyfile(student, out / student.name)
            continue
        from labkit.release import student_notebook  # imports jax: only when the students are not generated

        LOGGER.info("course_site: %s missing, generating it from the master", student)
        master = nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4)
        nbformat.write(student_notebook(master, name=slug), out / student.name)


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", strip_nbval_comments)
    app.connect("doctree-read", label_solutions)
    app.connect("doctree-resolved", add_launch_box)
    app.connect("doctree-resolved", tag_solution_toggles)
    app.connect("html-page-context", retarget_header_buttons, priority=600)
    app.connect("html-page-context", drop_thebe_assets, priority=600)
    app.connect("build-finished", copy_student_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
