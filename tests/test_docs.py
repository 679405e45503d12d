"""The documentation runs: every ``python`` and ``bash`` block of README.md and docs/, and the site builds.

Each page's blocks run in order in one fresh folder, as a reader would paste them: ``python``
blocks in one namespace, ``bash`` blocks with this environment's ``jaxae`` first on PATH. A
block whose first line is ``# needs: ...`` says what it needs that a test machine lacks (a GPU
cluster, internet, a full dataset) and is not run; everything else must run as written. The
folder ``data/fashion-mnist`` holds the embedded sample in IDX form, standing in for the
download the Datasets guide describes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(?P<lang>python|bash)[^\n]*\n(?P<code>.*?)^```", re.S | re.M)
NEEDS = "# needs:"


def blocks(page: Path) -> list[tuple[str, str]]:
    """The runnable ``(language, code)`` blocks of a page, in order."""
    found = [(m["lang"], m["code"]) for m in BLOCK.finditer(page.read_text())]
    return [(lang, code) for lang, code in found if not code.lstrip().startswith(NEEDS)]


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if blocks(p)]


def _reader_folder(tmp_path: Path) -> Path:
    import jaxae

    sample = Path(jaxae.__file__).parent / "_data" / "mnist-sample"
    shutil.copytree(sample, tmp_path / "data" / "fashion-mnist")
    return tmp_path


def jaxae_commands(code: str) -> list[list[str]] | None:
    """The argument lists of a block made only of ``jaxae ...`` commands, else None.

    Those run in this process through :func:`jaxae.cli.main`, which is what the ``jaxae``
    script calls: the same code path, without paying for a new interpreter, JAX start-up and
    compilations for every line. Anything else (loops, variables, pipes) runs in bash.
    """
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] != "jaxae" or any(ch in line.split("#")[0] for ch in "|&;$<>`"):
            return None
        commands.append(argv[1:])
    return commands


def _run_bash(code: str, cwd: Path, env: dict, where: str) -> None:
    commands = jaxae_commands(code)
    if commands is None:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{code}\n{proc.stderr[-3000:]}"
        return
    from jaxae import cli

    for argv in commands:
        try:
            status = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            status = e.code
        assert status in (0, None), f"{where} failed ({status}): jaxae {shlex.join(argv)}"


def run_page(page: Path, cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for i, (lang, code) in enumerate(blocks(page), 1):
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}, block {i}"
            if lang == "python":
                exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs' own examples
            else:
                _run_bash(code, cwd, env, where)
    finally:
        os.chdir(old)


def _page_params() -> list:
    """Every page's examples, README's included (about 5 minutes of CPU in all), are ``slow``:
    ``make test-all`` runs them; the commands they show are each tested faster elsewhere."""
    return [pytest.param(p, id=p.name, marks=pytest.mark.slow) for p in _runnable_pages()]


@pytest.mark.parametrize("page", _page_params())
def test_every_block_of_the_page_runs(page, tmp_path):
    run_page(page, _reader_folder(tmp_path))


def test_the_runner_fails_on_a_broken_block(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("```python\nx = 1\n```\n\n```bash\n# needs: a GPU\nexit 1\n```\n\n```bash\njaxae no-such\n```\n")
    assert [lang for lang, _ in blocks(page)] == ["python", "bash"]  # the `# needs:` block is not run
    with pytest.raises(AssertionError, match="block 2 failed"):
        run_page(page, tmp_path)
    page.write_text("```bash\necho ok | grep -q ok\nfalse\n```\n")  # a block bash runs
    with pytest.raises(AssertionError, match="block 1 failed"):
        run_page(page, tmp_path)


def test_jaxae_lines_run_in_process_and_the_rest_in_bash():
    assert jaxae_commands(
        "jaxae train --epochs 2 \\\n  --workdir runs/a   # note\n\njaxae evaluate --workdir runs/a\n"
    ) == [
        ["train", "--epochs", "2", "--workdir", "runs/a"],
        ["evaluate", "--workdir", "runs/a"],
    ]
    assert jaxae_commands("for i in 0 1; do jaxae train; done") is None
    assert jaxae_commands("jaxae train --workdir $HOME/x") is None


def test_no_page_sends_readers_outside_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points at a folder outside the repository"


def test_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "README links into the docs"
    for link in links:
        assert (ROOT / link).is_file(), link


def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "train" / "index.html").is_file()
