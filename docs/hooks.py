"""MkDocs hook: show the experiments' figures in the pages without copying them into docs/.

The pages link figures where they live in the repository, ``../experiments/results/...``, so
they render on a code host as well; the site gets the same files under ``figures/`` and the
links are rewritten to match.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
LINK_IN_REPO = "../experiments/results/"


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"figures/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # pages in docs/api/ are one folder down
    return markdown.replace(LINK_IN_REPO, "../" * depth + "figures/")
