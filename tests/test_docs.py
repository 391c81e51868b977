"""The documentation cannot drift: docs/parameters.md is what docs/gen_parameters.py writes from the
code's docstrings, the README stays a front door (at most 10 KB), and every relative link in the
README and docs/*.md reaches a file (and, where it names one, a heading). Each check has a control
that shows it can fail. No process is started and no model is loaded."""

import dataclasses
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 10240


def _generator():
    spec = importlib.util.spec_from_file_location("gen_parameters", ROOT / "docs" / "gen_parameters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _generator()


# ---- (a) docs/parameters.md is generated ------------------------------------------------------

def test_parameters_page_is_what_the_generator_writes():
    assert (ROOT / "docs" / "parameters.md").read_text() == gen.render(gen.collect()), \
        "docs/parameters.md is out of date: run `make docs`"
    assert gen.main(["--check"]) == 0


def test_every_field_of_the_three_dataclasses_is_on_the_page():
    page = (ROOT / "docs" / "parameters.md").read_text()
    for module, name, _ in gen.CLASSES:
        cls = getattr(importlib.import_module(module), name)
        docs = gen.attribute_docstrings(cls)
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in page
            assert " ".join(docs[field.name].split()) in page


def test_a_changed_docstring_is_caught(tmp_path, capsys):
    """Control: one docstring line changed, in the code (the rendered input) or in the file."""
    sections = gen.collect()
    first = sections[1].rows[0]
    changed = dataclasses.replace(first, doc=first.doc + " Changed.")
    edited = [dataclasses.replace(sections[1], rows=(changed, *sections[1].rows[1:])), *sections[2:]]
    assert gen.render([sections[0], *edited]) != (ROOT / "docs" / "parameters.md").read_text()

    page = tmp_path / "parameters.md"
    text = gen.render(sections)
    page.write_text(text)
    assert gen.main(["--check", str(page)]) == 0
    line = next(line for line in text.splitlines() if line.startswith("| `num_inference_steps` |"))
    page.write_text(text.replace(line, line.replace("Denoising steps.", "Denoising steps, changed."), 1))
    assert gen.main(["--check", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err and "make docs" in err


def test_attribute_docstrings_reads_the_literal_after_each_field():
    from cfgpar.diffusion.data import DiffusionParallelConfig

    docs = gen.attribute_docstrings(DiffusionParallelConfig)
    assert docs["cfg_parallel_size"].startswith("Ranks that split the guidance branches")
    assert "degrees" not in docs and "describe" not in docs  # methods and properties are not fields
    rows = {row.name: row for row in gen.dataclass_section("cfgpar.diffusion.data", "DiffusionParallelConfig", "").rows}
    assert rows["world_size"].default == "derived" and rows["cfg_parallel_size"].default == "`1`"


def test_omni_arguments_are_read_from_its_source_and_all_described():
    rows = gen.omni_section().rows
    assert [row.name for row in rows][:2] == ["model", "parallel_config"]
    assert {row.name for row in rows} == set(gen.OMNI_ARGS)


def test_an_undescribed_omni_argument_stops_the_generator(monkeypatch):
    """Control: an argument of Omni.__init__ that OMNI_ARGS lacks is an error, not a silent gap."""
    monkeypatch.setattr(gen, "OMNI_ARGS", {k: v for k, v in gen.OMNI_ARGS.items() if k != "dtype"})
    with pytest.raises(LookupError, match="'dtype'"):
        gen.omni_section()


# ---- (b) the README is a front door ------------------------------------------------------------

def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; at most {README_LIMIT}: move detail to docs/"


# ---- (c) relative links resolve ----------------------------------------------------------------

MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, anchors = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path) -> list[str]:
    text = _prose(page.read_text())
    broken = []
    for target in MD_LINK.findall(text) + HTML_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    """Control: a missing file, a missing heading and a wrong image path are each reported; links
    inside code, and absolute URLs, are not links to check."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Other page\n\n## A: heading, here\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n[ok](../other.md) [ok too](../other.md#a-heading-here) [self](#page)\n"
        "[gone](missing.md) [bad anchor](../other.md#nowhere) <img src=\"images/none.png\">\n"
        "[web](https://example.com/x) `[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)", "../other.md#nowhere (no such heading)",
                                  "images/none.png (no such file)"]
