"""Check the built documentation site in headless Chromium, as a reader would see it (`make test`, after `make docs`).

One Chromium run loads a probe page that opens the landing page and two paper pages in frames, waits for their
images to decode and reports what each page shows; the checks below assert on that report:

* the landing page lists all catalogue papers with their derived status, linking the pages of those with a notebook
  (and only those);
* each paper page shows its committed figure (decoded by the browser: natural width > 0), its claims table (one row per
  claim of `results/cpu/<slug>/claims.json`) and its API section (an autodoc entry for every public class and function
  of its module).

A second run takes a screenshot of the first paper's results section (`--screenshot`, to look at).
Usage: `python ci/check_docs.py [--site _docs] [--papers copyspec parallelbench] [--screenshot PATH]`.
"""
from __future__ import annotations

import argparse
import html
import importlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from paper_repro.core.catalog import PAPERS, get_paper, load_claims, notebook_path, status_detail  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# What the probe reports for each page: its title, the catalogue table's rows, and for each section id asked for its
# text, its tables' body rows, its images (decoded width) and the ids of the elements inside it.
PROBE_JS = r"""
const pages = __PAGES__;
function load(url) {
  return new Promise(resolve => {
    const frame = document.createElement('iframe');
    frame.style.width = '1280px'; frame.style.height = '900px';
    frame.onload = () => resolve(frame);
    frame.src = url;
    document.body.appendChild(frame);
  });
}
function decoded(img) {
  img.loading = 'eager';
  if (img.complete) return Promise.resolve();
  return new Promise(r => { img.addEventListener('load', r); img.addEventListener('error', r); });
}
function section(doc, id) {
  const el = doc.getElementById(id);
  if (!el) return null;
  return {text: el.textContent.replace(/\s+/g, ' ').slice(0, 20000),
          tables: [...el.querySelectorAll('table')].map(t => [...t.querySelectorAll('tbody tr')].map(
                     tr => [...tr.querySelectorAll('td')].map(td => ({text: td.textContent.trim(),
                       links: [...td.querySelectorAll('a')].map(a => a.getAttribute('href'))})))),
          images: [...el.querySelectorAll('img')].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
          ids: [...el.querySelectorAll('[id]')].map(e => e.id)};
}
(async () => {
  const report = [];
  for (const p of pages) {
    try {
      const frame = await load(p.url);
      const doc = frame.contentDocument;
      await Promise.all([...doc.images].map(decoded));
      const sections = {};
      for (const id of p.sections) sections[id] = section(doc, id);
      report.push({url: p.url, title: doc.title, sections,
                   nav: [...doc.querySelectorAll('.sidebar-tree .caption-text')].map(e => e.textContent)});
    } catch (e) { report.push({url: p.url, error: String(e)}); }
  }
  document.getElementById('report').textContent = JSON.stringify(report);
})();
"""


def browser() -> str:
    "The headless browser to use: Debian's `chromium` (ci/debian-packages.txt), or another Chromium build."
    for name in BROWSERS:
        if path := shutil.which(name): return path
    raise SystemExit(f"no Chromium found (looked for {', '.join(BROWSERS)}); install Debian's `chromium` "
                     "(listed in ci/debian-packages.txt, installed by `make`)")


def chromium(args: list[str], timeout: float = 120) -> str:
    "Run headless Chromium with `args`; return its stdout."
    base = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--allow-file-access-from-files", "--disable-dev-shm-usage"]
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run([*base, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout)
    if run.returncode: raise SystemExit(f"chromium failed (exit {run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


def probe(pages: list[dict], workdir: Path) -> list[dict]:
    "Load `pages` ({url, sections}) in Chromium and return what each shows (see `PROBE_JS`)."
    probe_html = workdir / "probe.html"
    probe_html.write_text("<!doctype html><html><body><pre id='report'></pre><script>"
                          + PROBE_JS.replace("__PAGES__", json.dumps(pages)) + "</script></body></html>")
    dom = chromium(["--virtual-time-budget=60000", "--dump-dom", probe_html.as_uri()])
    m = re.search(r"<pre id=\"report\">(.*?)</pre>", dom, re.S)
    if not m or not m.group(1).strip(): raise SystemExit("the probe page reported nothing (did the site load?)")
    return json.loads(html.unescape(m.group(1)))


def screenshot(url: str, anchor: str, path: Path, workdir: Path, size: tuple[int, int] = (1280, 1600)) -> Path:
    "A screenshot of `url` scrolled to the element with id `anchor` (the page is framed and scrolled by script)."
    frame_html = workdir / "frame.html"
    frame_html.write_text(  # furo scrolls smoothly: an instant scroll lands before the screenshot is taken
        "<!doctype html><html><body style='margin:0'><script>const f = document.createElement('iframe');"
        f"f.style.cssText = 'border:0;width:{size[0]}px;height:{size[1]}px';"
        "f.onload = () => setTimeout(() => { const w = f.contentWindow;"
        f" const y = w.document.getElementById({json.dumps(anchor)}).getBoundingClientRect().top + w.scrollY;"
        " w.scrollTo({top: y, behavior: 'instant'}); }, 500);"
        f"f.src = {json.dumps(url)}; document.body.appendChild(f);</script></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    chromium([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=10000", f"--screenshot={path}",
              frame_html.as_uri()])
    return path


def public_api(module: str) -> list[str]:
    "The classes and functions a module defines and lists in `__all__` (each needs an autodoc entry)."
    mod = importlib.import_module(module)
    return [n for n in getattr(mod, "__all__", []) if (inspect.isclass(o := getattr(mod, n)) or inspect.isfunction(o))
            and getattr(o, "__module__", None) == module]


def check_landing(page: dict) -> list[str]:
    "The catalogue lists every paper with its status; a paper links its page exactly when it has a notebook."
    cat = page["sections"].get("catalogue")
    if not cat or not cat["tables"]: return ["landing page: no catalogue table"]
    rows = {r[1]["text"]: r for r in cat["tables"][0] if len(r) >= 6}
    problems = [] if len(rows) == len(PAPERS) else [f"landing page: catalogue has {len(rows)} rows, {len(PAPERS)} papers"]
    for p in PAPERS:
        row = rows.get(p.slug)
        if row is None: problems.append(f"landing page: {p.slug} missing from the catalogue"); continue
        status, links = row[-1]["text"], row[1]["links"]
        if status != status_detail(p): problems.append(f"landing page: {p.slug} shows status {status!r}, not {status_detail(p)!r}")
        has_nb = notebook_path(p).is_file()
        if has_nb and links != [f"{p.family}/{p.slug}.html"]: problems.append(f"landing page: {p.slug} links {links}")
        if not has_nb and links: problems.append(f"landing page: planned {p.slug} links {links} (it has no page)")
    if not page["nav"]: problems.append("landing page: no navigation captions")
    return problems


def check_paper(page: dict, slug: str) -> list[str]:
    "The paper page shows its figure (decoded), its claims table (one row per claim) and its module's API."
    paper, s = get_paper(slug), page["sections"]
    problems = []
    fig = s.get(f"{slug}-figure-cpu")
    if not fig or not fig["images"]: problems.append(f"{slug}: no figure section with an image")
    elif not all(i["width"] > 0 for i in fig["images"]): problems.append(f"{slug}: figure not decoded: {fig['images']}")
    claims = load_claims(ROOT / "results" / "cpu" / slug / "claims.json")
    table = s.get(f"{slug}-claims-cpu")
    if not table or not table["tables"]: problems.append(f"{slug}: no claims table")
    else:
        shown = sorted(row[1]["text"] for row in table["tables"][0])   # columns: kind, claim, ...
        if shown != sorted(c["id"] for c in claims): problems.append(f"{slug}: claims table shows {shown}, "
                                                                    f"claims.json has {[c['id'] for c in claims]}")
    module = f"paper_repro.{paper.family}.{slug}"
    api = s.get(f"{paper.family}-{slug}-api")
    if not api: problems.append(f"{slug}: no API section")
    else:
        missing = [n for n in public_api(module) if f"{module}.{n}" not in api["ids"]]
        if missing: problems.append(f"{slug}: API section lacks {missing}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, default=ROOT / "_docs", help="the built site (default _docs/)")
    parser.add_argument("--papers", nargs="+", default=["copyspec", "parallelbench"], help="paper pages to check")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "build" / "docs-check" / "paper-results.png",
                        help="where to write a screenshot of the first paper's results section")
    args = parser.parse_args(argv)
    site = args.site.resolve()
    if not (site / "index.html").is_file(): raise SystemExit(f"no site at {site}: run `make docs` first")
    papers = [get_paper(s) for s in args.papers]
    pages = [{"url": (site / "index.html").as_uri(), "sections": ["catalogue"]}]
    pages += [{"url": (site / p.family / f"{p.slug}.html").as_uri(),
               "sections": [f"{p.slug}-figure-cpu", f"{p.slug}-claims-cpu", f"{p.family}-{p.slug}-api"]} for p in papers]
    with tempfile.TemporaryDirectory() as work:
        report = probe(pages, Path(work))
        problems = [f"{r['url']}: {r['error']}" for r in report if "error" in r]
        if not problems:
            problems += check_landing(report[0])
            for p, page in zip(papers, report[1:]): problems += check_paper(page, p.slug)
        first = papers[0]
        shot = screenshot((site / first.family / f"{first.slug}.html").as_uri(), f"{first.slug}-results-cpu",
                          args.screenshot.resolve(), Path(work))
    for p in problems: print(f"docs check: {p}", file=sys.stderr)
    if problems: return 1
    print(f"docs check: landing page and {', '.join(args.papers)} read as expected in Chromium; screenshot {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
