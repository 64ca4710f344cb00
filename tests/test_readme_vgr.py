"""Every Python and shell block of README.md runs as written, each in a fresh process from the repository's folder,
offline (tests/test_docs_vgr.py runs the blocks of the pages in docs/ with the same helpers).

A block that is deliberately a fragment (it needs a GPU, a server, a large model, minutes of training...) says so on
the line right above its fence with an HTML comment, `<!-- fragment: NAME -->`, and is skipped by that name. A shell
block runs in bash with the running interpreter's folder first on PATH, so that `python` is the virtualenv's. The
README opens with a quick start on checkpoints/vgr-tiny that prints the right answer and saves the picture.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


README = ROOT / "README.md"
BLOCK = re.compile(
    r"^(?:<!--\s*fragment:\s*(?P<fragment>[^>]*?)\s*-->\n)?```(?P<language>python|bash)\n(?P<code>.*?)^```",
    re.M | re.S,
)


def blocks(page: Path, skip_sections: tuple = ()) -> list:
    """(fragment name or None, language, code) of each Python and shell block of `page`, as pytest params whose id
    names the page, the block's number and its section; blocks under a heading in `skip_sections` (slugs) are left
    out."""
    text = page.read_text()
    found = []
    for number, match in enumerate(BLOCK.finditer(text), start=1):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], flags=re.M)
        section = re.sub(r"\W+", "-", headings[-1].lower()).strip("-") if headings else "top"
        if section in skip_sections:
            continue
        found.append(pytest.param(match.group("fragment"), match.group("language"), match.group("code"),
                                  id=f"{page.stem}-{number}-{section}"))
    return found


def run(code: str, language: str = "python") -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(ROOT / "outputs" / ".hf_home"))
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        command = ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{code}\n---\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.parametrize("fragment, language, code", blocks(README, skip_sections=("quick-start",)))
def test_readme_block_runs(fragment, language, code):
    if fragment:
        pytest.skip(f"marked as a fragment: {fragment}")
    run(code, language)


def test_readme_opens_with_the_quick_start():
    text = README.read_text()
    first_section = re.search(r"^## (.+)$", text, flags=re.M).group(1)
    assert first_section == "Quick start"
    quick_start = text[text.index("## Quick start") :]
    quick_start = quick_start[: quick_start.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", quick_start, flags=re.S)
    assert "checkpoints/vgr-tiny" in code and "example.json" in code
    picture = ROOT / "outputs" / "quickstart.png"
    picture.unlink(missing_ok=True)
    output = run(code)
    lines = output.splitlines()
    assert lines[-2] == ("The red box is here <sot>[0.28, 0.53, 0.47, 0.72]<eot> and the digit in it is 7. "
                         "Final answer: 7")
    assert lines[-1] == "7 [(0.28, 0.53, 0.47, 0.72)] [(125.44, 237.44, 210.56, 322.56)]"
    assert picture.exists()
