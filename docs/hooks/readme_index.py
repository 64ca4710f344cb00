"""MkDocs hook: the site's home page is README.md, so that the front page is written once.

The README links to the pages as `docs/PAGE.md` (as GitHub resolves them from the repository's root); on the site
they sit beside the home page, so those links lose their `docs/` prefix, and the pages' links to `../README.md` go
to the home page. Any other relative link of the README points outside the site, and the strict build fails on it.
"""

from pathlib import Path

from mkdocs.structure.files import File


README = Path(__file__).resolve().parents[2] / "README.md"


def on_files(files, config):
    text = README.read_text().replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("](../README.md", "](index.md")
