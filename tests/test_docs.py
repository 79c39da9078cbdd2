"""The README and docs/ link to files and headings that exist.

Relative links (images included) must name a file in the repository, and a
`#fragment` must be the GitHub anchor of a heading in the file it points to.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
  """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # '#' in code is not a heading
  return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(path: pathlib.Path) -> list[str]:
  return [link for link in LINK.findall(path.read_text())
          if not re.match(r"[a-z]+:", link)]  # http:, https:, mailto:


def test_github_anchor():
  assert github_anchor("The main job's timings") == "the-main-jobs-timings"
  assert github_anchor("Set-up: the two commands") == "set-up-the-two-commands"
  assert github_anchor("`stnjax.data` (MNIST)") == "stnjaxdata-mnist"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
  links = relative_links(document)
  broken = []
  for link in links:
    target, _, fragment = link.partition("#")
    file = (document.parent / target).resolve() if target else document
    if not file.is_file():
      broken.append(f"{link}: no file {file}")
    elif fragment and fragment not in anchors(file):
      broken.append(f"{link}: no heading with anchor #{fragment} in {file.name}")
  assert not broken, f"{document.name}: " + "; ".join(broken)

