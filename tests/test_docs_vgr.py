"""The documentation: every Python and shell block of every page in docs/ runs as the README's do
(tests/test_readme_vgr.py: the same runner and the same `<!-- fragment: NAME -->` marker), the commands of the blocks
that do not run name modules, scripts and make targets that exist, and the API reference covers the public API, the
config's fields and the server's flags. The site's strict build is `make docs`, which `make test` runs."""

import ast
import dataclasses
import importlib.util
import re
import shlex

import pytest

from conftest import ROOT
from test_readme_vgr import BLOCK, README, blocks, run

import transformers_vgr
import transformers_vgr.training
from transformers_vgr import VGRConfig


DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
API_PAGES = sorted((DOCS / "api").glob("*.md"))
def all_blocks() -> list:
    return [block for page in PAGES for block in blocks(page)]


@pytest.mark.parametrize("fragment, language, code", all_blocks())
def test_docs_block_runs(fragment, language, code):
    if fragment:
        pytest.skip(f"marked as a fragment: {fragment}")
    run(code, language)


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block, each as its words: continuation lines joined, comments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def module_exists(name: str) -> bool:
    """A module of this package by its file (importing transformers_vgr.vllm would need vLLM), any other by its spec."""
    if name.split(".")[0] == "transformers_vgr":
        path = ROOT / "src" / name.replace(".", "/")
        return path.with_suffix(".py").exists() or (path / "__main__.py").exists()
    return importlib.util.find_spec(name) is not None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):", text, flags=re.M))


def every_shell_block() -> list:
    pages = [README, *PAGES]
    return [pytest.param(match.group("code"), id=f"{page.stem}-{number}")
            for page in pages
            for number, match in enumerate(BLOCK.finditer(page.read_text()), start=1)
            if match.group("language") == "bash"]


@pytest.mark.parametrize("code", every_shell_block())
def test_shell_block_names_what_exists(code):
    """Fragments included: `python -m MODULE` names a module that is there (of this package, lmms-eval, the standard
    library), `python SCRIPT.py` a script of the repository and `make TARGET` a target of the Makefile."""
    targets = make_targets()
    for words in shell_commands(code):
        for index, word in enumerate(words):
            if word == "-m" and index + 1 < len(words) and words[index - 1].endswith("python"):
                assert module_exists(words[index + 1]), f"no module {words[index + 1]}: {' '.join(words)}"
            elif word.endswith(".py") and not word.startswith("-"):
                assert (ROOT / word).exists(), f"no script {word}: {' '.join(words)}"
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"no make target {words[1:]}"


def documented_names() -> set[str]:
    """Every object an API page renders (`::: transformers_vgr.NAME` or `::: transformers_vgr.module.NAME`)."""
    names = set()
    for page in API_PAGES:
        names.update(re.findall(r"^::: (transformers_vgr(?:\.\w+)*)$", page.read_text(), flags=re.M))
    return names


@pytest.mark.parametrize("package", [transformers_vgr, transformers_vgr.training], ids=lambda p: p.__name__)
def test_api_reference_covers_all(package):
    documented = documented_names()
    missing = [name for name in package.__all__ if f"{package.__name__}.{name}" not in documented]
    assert not missing, f"not in docs/api/: {missing}"


def test_model_page_lists_every_config_field():
    text = (DOCS / "model.md").read_text()
    table = text[text.index("## Configuration"): text.index("## Resources")]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    own_fields = {field.name for field in dataclasses.fields(VGRConfig) if field.name in VGRConfig.__annotations__}
    assert rows == own_fields


def server_flags() -> dict[str, dict]:
    """The server's own argparse flags, read from serve.py's source (importing it needs vLLM): flag -> keywords."""
    tree = ast.parse((ROOT / "src" / "transformers_vgr" / "serve.py").read_text())
    flags = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords
                        if keyword.arg in ("default", "help")}
            flags[ast.literal_eval(node.args[0])] = keywords
    return flags


def vgr_engine_defaults() -> set[str]:
    """The engine arguments `apply_vgr_defaults` sets when the command line leaves them unset, as flags."""
    tree = ast.parse((ROOT / "src" / "transformers_vgr" / "vllm" / "offline.py").read_text())
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == "apply_vgr_defaults")
    return {"--" + target.attr.replace("_", "-") for node in ast.walk(function) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Attribute)}


def test_server_flags_page_matches_the_server():
    text = (DOCS / "api" / "server.md").read_text()
    own = text[text.index("## The server's own flags"): text.index("## vLLM's engine flags")]
    rows = {row[0]: row[1:] for row in re.findall(r"^\| `(--[\w-]+)` \| `([^`]*)` \| (.*) \|$", own, flags=re.M)}
    flags = server_flags()
    assert set(rows) == set(flags)
    for flag, keywords in flags.items():
        assert rows[flag] == (str(keywords["default"]), keywords["help"]), flag
    engine = text[text.index("## vLLM's engine flags"):]
    assert set(re.findall(r"^\| `(--[\w-]+)` \|", engine, flags=re.M)) == vgr_engine_defaults()
