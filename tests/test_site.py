"""The course site: `jupyter-book build` with warnings as errors, then every page checked in a real browser.

The book is built once (as `make book` does, `-W --keep-going`, from the notebooks' stored outputs), served
from `_build/html` on 127.0.0.1 with an ephemeral port, and Debian's Chromium, driven by Playwright, visits
every page once. Each page's findings are collected first; the tests below then each check one property on
all pages, so one failing run lists every broken page. Full-page screenshots go to `_build/screens/`.

Chromium comes from Debian (`make test` installs it where `/usr/bin/chromium` is missing and it runs as root);
Playwright's own browser download is never used. Without Chromium the browser tests are skipped on a
developer's machine, but in CI (`CI` set) they fail instead.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse
from urllib.request import urlopen

import nbformat
import pytest
import yaml
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENS = ROOT / "_build" / "screens"
BUILD_SECONDS_LIMIT = 120
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
]
# Text of a page outside code, outside rendered maths: a `$` or `\(` left there is maths MathJax did not render.
UNRENDERED_MATH = re.compile(r"\$[^\s$]|\\\(|\\\[|\\begin\{")


def chromium_path() -> str | None:
    """Debian's Chromium, or another `chromium` on PATH; None when there is none."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def toc_lab_docnames() -> list[str]:
    """Docnames of the lab pages listed in _toc.yml (`notebooks/NN_slug`), in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = []

    def walk(entries):
        for entry in entries or []:
            if re.fullmatch(r"notebooks/\d{2}_[\w-]+", entry.get("file", "")):
                names.append(entry["file"])
            walk(entry.get("chapters"))
            walk(entry.get("sections"))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return names


def repository() -> tuple[str, str]:
    """`owner/name` and branch of the repository: the one setting in _config.yml."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    return config["url"].rstrip("/").split("github.com/", 1)[1], config.get("branch", "main")


# ---------------------------------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def built_site() -> dict:
    """Build the book exactly as `make book` does; return its output and wall time."""
    placeholder = ROOT / "book" / "instructor.md"
    assert placeholder.exists(), "book/instructor.md is in _toc.yml but missing"
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    start = time.perf_counter()
    result = subprocess.run(
        [str(jupyter_book), "build", ".", "-W", "--keep-going", "--all"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"jupyter-book build failed:\n{output[-6000:]}"
    return {"output": output, "seconds": seconds}


def test_book_builds_without_warnings_in_time(built_site):
    warnings = [line for line in built_site["output"].splitlines() if re.search(r"WARNING|ERROR", line)]
    assert not warnings, "build warnings:\n" + "\n".join(warnings)
    assert built_site["seconds"] < BUILD_SECONDS_LIMIT, f"build took {built_site['seconds']:.0f} s"


def test_maths_is_served_by_the_site_itself(built_site):
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in HTML.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]+src=\"https?://", text), f"{page}: script loaded from the network"
        assert not re.search(r"<link[^>]+href=\"https?://[^\"]+\.css", text), f"{page}: CSS from the network"


def test_every_lab_in_the_toc_has_a_page_with_its_student_notebook(built_site):
    labs = toc_lab_docnames()
    assert labs and labs[0] == "notebooks/01_dot_product_attention"
    for docname in labs:
        slug = docname.split("/")[1]
        assert (HTML / f"{docname}.html").is_file()
        student = nbformat.reads((HTML / "student" / f"{slug}.ipynb").read_text(encoding="utf-8"), as_version=4)
        sources = "\n".join(cell.source for cell in student.cells)
        assert "### BEGIN SOLUTION" not in sources and "raise NotImplementedError()" in sources
        assert all(not cell.get("outputs") for cell in student.cells)
        committed = ROOT / "notebooks" / "student" / f"{slug}.ipynb"
        if committed.is_file():
            assert (HTML / "student" / committed.name).read_bytes() == committed.read_bytes()


# ---------------------------------------------------------------------------------------------------- browser


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports failures itself
        pass


@pytest.fixture(scope="module")
def server(built_site):
    """Serve _build/html on 127.0.0.1 with an ephemeral port; yield the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(HTML)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright; skipped only off CI when Chromium is not installed."""
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make test` installs it (apt-get install chromium)")
        pytest.skip("chromium not found (install Debian's chromium: `apt-get install chromium`, "
                    "or run `make test` as root); browser tests run in CI")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def site_pages() -> list[str]:
    """Every HTML page of the site, relative to its root (assets and copied sources left out)."""
    return sorted(
        page.relative_to(HTML).as_posix()
        for page in HTML.rglob("*.html")
        if not page.relative_to(HTML).parts[0].startswith("_")
    )


def screenshot_name(page: str) -> str:
    return page.removesuffix(".html").replace("/", "__") + ".png"


# Runs in the page: what a reader would see that is wrong.
PAGE_REPORT_JS = r"""
async () => {
  window.scrollTo(0, document.body.scrollHeight);
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.complete ? null :
      new Promise(done => { img.onload = img.onerror = done; setTimeout(done, 5000); })));
  window.scrollTo(0, 0);
  const main = document.querySelector("main") || document.body;
  const mathNodes = Array.from(main.querySelectorAll(".math"));
  const skip = el => el.closest("pre, code, script, style, mjx-container, .highlight, textarea, .output");
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!skip(node.parentElement)) texts.push(node.textContent);
  }
  return {
    title: document.title,
    mathNodes: mathNodes.length,
    unrendered: mathNodes.filter(el => !el.querySelector("mjx-container")).map(el => el.textContent.slice(0, 80)),
    mjx: main.querySelectorAll("mjx-container").length,
    mjxErrors: Array.from(main.querySelectorAll("mjx-merror")).map(el => el.textContent.slice(0, 80)),
    text: texts.join(" "),
    images: images.map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    colab: Array.from(document.querySelectorAll("a[href*='colab.research.google.com']")).map(a => a.href),
    download: Array.from(document.querySelectorAll("a.lab-launch-download")).map(a => a.href),
    folded: Array.from(main.querySelectorAll("details.hide.above-input")).map(d => d.open),
    plots: main.querySelectorAll(".cell_output img").length,
    hiddenPlots: Array.from(main.querySelectorAll(".cell_output img")).filter(img => img.closest("details")).length,
  };
}
"""


@pytest.fixture(scope="module")
def visited(server, browser) -> dict:
    """Visit every page once; return {page: report} with console errors, failed requests and page content."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    for old in SCREENS.glob("*.png"):
        old.unlink()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside = []

    def only_local(route):
        # Nothing may come from the network: record and refuse every request that leaves 127.0.0.1.
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith("data:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    reports = {}
    for name in site_pages():
        page = context.new_page()
        problems = []
        page.on("console", lambda msg, p=problems: msg.type == "error" and p.append(f"console: {msg.text}"))
        page.on("pageerror", lambda exc, p=problems: p.append(f"page error: {exc}"))
        page.on("requestfailed", lambda req, p=problems: p.append(f"request failed: {req.url} {req.failure}"))
        page.on("response", lambda res, p=problems: res.status >= 400 and p.append(f"HTTP {res.status}: {res.url}"))
        outside.clear()
        page.goto(server + name, wait_until="load")
        page.wait_for_load_state("networkidle")
        if page.evaluate("() => document.querySelector('main .math') !== null"):
            try:
                page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                       timeout=15_000)
                page.evaluate("() => MathJax.startup.promise")
            except PlaywrightError as error:
                problems.append(f"MathJax did not start: {error.message.splitlines()[0]}")
        report = page.evaluate(PAGE_REPORT_JS)
        report["url"] = page.url
        page.screenshot(path=str(SCREENS / screenshot_name(name)), full_page=True)
        report["problems"] = problems + [f"request to the network: {url}" for url in outside]
        reports[name] = report
        page.close()
    search = context.new_page()
    search.goto(server + "search.html?q=attention", wait_until="load")
    try:
        search.wait_for_selector("ul.search li a", timeout=20_000)
    except Exception:  # reported by the search test below, with what the page shows
        pass
    results = search.eval_on_selector_all("ul.search li a", "els => els.map(a => a.href)")
    search.screenshot(path=str(SCREENS / "search_attention.png"), full_page=True)
    context.close()
    return {"pages": reports, "search": results, "base": server}


def test_every_page_was_visited(visited):
    pages = visited["pages"]
    expected = {"book/intro.html", "book/setup.html", "book/references.html", "book/instructor.html"}
    expected |= {f"{docname}.html" for docname in toc_lab_docnames()}
    assert expected <= set(pages), f"pages missing from the site: {expected - set(pages)}"
    assert len(list(SCREENS.glob("*.png"))) == len(pages) + 1


def test_no_console_errors_or_failed_requests(visited):
    bad = {name: report["problems"] for name, report in visited["pages"].items() if report["problems"]}
    assert not bad, json.dumps(bad, indent=1)


def test_every_equation_is_rendered(visited):
    pages = visited["pages"]
    for name, report in pages.items():
        assert not report["unrendered"], f"{name}: maths not rendered: {report['unrendered'][:5]}"
        assert not report["mjxErrors"], f"{name}: MathJax errors: {report['mjxErrors'][:5]}"
        assert report["mjx"] >= report["mathNodes"], f"{name}: {report['mathNodes']} equations, {report['mjx']} shown"
        leftover = UNRENDERED_MATH.findall(report["text"])
        assert not leftover, f"{name}: raw maths left in the text: {leftover[:5]}"
    # Pages known to carry maths, including several inline equations side by side in one sentence or cell.
    for name in ["book/intro.html"] + [f"{d}.html" for d in toc_lab_docnames()]:
        assert pages[name]["mjx"] >= 3, f"{name}: expected rendered equations, found {pages[name]['mjx']}"


def test_every_image_loads(visited):
    for name, report in visited["pages"].items():
        broken = [image["src"][:100] for image in report["images"] if not image["ok"]]
        assert not broken, f"{name}: images that did not load: {broken}"


def test_lab_pages_show_their_plots(visited):
    # Trax's import switches matplotlib to Agg (trax/jaxboard.py: mpl.use('Agg')): a master executed without
    # restoring the inline backend stores no figure, and its page shows none.
    for docname in toc_lab_docnames():
        report = visited["pages"][f"{docname}.html"]
        assert report["plots"] > 0, (f"{docname}: no plot on the page: store the master with its figures "
                                     "(matplotlib inline backend after importing trax)")
        assert report["hiddenPlots"] == 0, f"{docname}: {report['hiddenPlots']} plots folded away"


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for key, value in attrs if key in ("id", "name") and value)


def test_every_internal_link_resolves(visited):
    base = visited["base"]
    anchors: dict[str, set[str]] = {}
    broken = []
    for name, report in visited["pages"].items():
        for link in report["links"]:
            if not link.startswith(base):
                continue
            url, fragment = urldefrag(link)
            if url not in anchors:
                try:
                    with urlopen(url, timeout=10) as response:
                        body = response.read()
                    parser = _Ids()
                    if url.endswith(".html") or url.endswith("/"):
                        parser.feed(body.decode("utf-8"))
                    anchors[url] = parser.ids
                except Exception as error:  # noqa: BLE001 - any failure is a broken link
                    anchors[url] = None
                    broken.append(f"{name}: {link} ({error})")
                    continue
            if anchors[url] is not None and fragment and url.endswith(".html") and fragment not in anchors[url]:
                broken.append(f"{name}: {link} (no element with id {fragment!r})")
    assert not broken, "\n".join(sorted(set(broken)))


def test_launch_links_open_the_matching_student_notebook(visited):
    org_repo, branch = repository()
    for docname in toc_lab_docnames():
        slug = docname.split("/")[1]
        report = visited["pages"][f"{docname}.html"]
        expected = (f"https://colab.research.google.com/github/{org_repo}/blob/{branch}"
                    f"/notebooks/student/{slug}.ipynb")
        assert report["colab"], f"{docname}: no Colab link"
        assert set(report["colab"]) == {expected}, f"{docname}: Colab links {report['colab']}, want {expected}"
        assert len(report["download"]) == 1, f"{docname}: expected one student-notebook download link"
        with urlopen(report["download"][0], timeout=10) as response:
            student = nbformat.reads(response.read().decode("utf-8"), as_version=4)
        master = nbformat.read(ROOT / f"{docname}.ipynb", as_version=4)
        assert [c.id for c in student.cells] == [c.id for c in master.cells
                                                 if "remove-student" not in c.metadata.get("tags", [])]
        assert "### BEGIN SOLUTION" not in "\n".join(c.source for c in student.cells)


def test_solutions_are_folded(visited):
    for docname in toc_lab_docnames():
        master = nbformat.read(ROOT / f"{docname}.ipynb", as_version=4)
        solutions = [c for c in master.cells if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]
        assert all("hide-input" in c.metadata.get("tags", []) for c in solutions), f"{docname}: untagged solution"
        folded = visited["pages"][f"{docname}.html"]["folded"]
        assert len(folded) >= len(solutions) and not any(folded), f"{docname}: solutions shown: {folded}"


def test_search_finds_a_lab_for_attention(visited):
    labs = [link for link in visited["search"] if re.search(r"/notebooks/\d{2}_[\w-]+\.html", link)]
    assert labs, f"searching 'attention' found no lab; results: {visited['search'][:10]}"


def test_every_lab_cites_the_bibliography(visited):
    for docname in toc_lab_docnames():
        links = visited["pages"][f"{docname}.html"]["links"]
        cited = [link for link in links if re.search(r"/book/references\.html#.", link)]
        assert cited, f"{docname}: no {{cite}} reference to book/references.bib"
