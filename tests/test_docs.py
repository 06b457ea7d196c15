"""The docs: the generated reference pages are current, every relative link and #anchor in README.md and
docs/ resolves, every page is listed, and every configs/ file a documented command names exists. And the
checker itself: each fault planted in a copy of the docs is reported (so the checks above can fail)."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from devops_cli import docsgen


def test_generated_reference_pages_are_current():
    problems = docsgen.stale(ROOT)
    assert not problems, "\n".join(problems)


def test_every_relative_link_and_anchor_resolves():
    problems = docsgen.broken_links(ROOT)
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index_and_the_site_nav():
    problems = docsgen.unlisted_pages(ROOT)
    assert not problems, "\n".join(problems)


def test_configs_named_by_documented_commands_exist():
    problems = docsgen.missing_configs(ROOT)
    assert not problems, "\n".join(problems)


def test_readme_stays_the_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines (at most 250): move the detail into a page under docs/"


@pytest.mark.parametrize("heading, anchor", [
    ("QLoRA: `quantization_bit: 4 | 8`", "qlora-quantization_bit-4--8"),
    ("Streaming: corpora bigger than RAM (`streaming: true`)", "streaming-corpora-bigger-than-ram-streaming-true"),
    ("chat --url: a remote server", "chat---url-a-remote-server"),
    ("What a run leaves in output_dir", "what-a-run-leaves-in-output_dir"),
    ("[Serve](serve.md): *the* API", "serve-the-api"),
    ("Über 5× faster", "über-5-faster"),
])  # fmt: skip
def test_anchor_slugs_are_githubs(heading, anchor):
    assert docsgen.slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A\n\n## Setup\n\n```\n## not a heading\n```\n\n## Setup\n", encoding="utf-8")
    assert docsgen.anchors(page) == {"a", "setup", "setup-1"}


def test_reference_covers_every_command_option_and_key():
    """What the generated pages hold, from the code itself (not from the pages): every command, flag, key."""
    import typer.main

    from devops_cli.cli import app
    from devops_cli.train.recipe import schema

    cli, keys = docsgen.cli_reference(), docsgen.recipe_keys_reference()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"\n## devops-model {name}\n" in cli
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else ():
                assert f"`{opt}`" in cli, (name, opt)
    assert "| `--shots`, `-k` | int |" in cli and "| `--max-shard-size` | float | `5.0` |" in cli
    assert all(f"| `{f.name}` |" in keys for f in schema() if f.name != "extra")
    assert "| `learning_rate` | float | `5e-05` | peak learning rate |" in keys


@pytest.fixture
def docs_copy(tmp_path):
    """README.md, docs/, configs/ and mkdocs.yml copied: a checkout the checker can be pointed at."""
    for name in ("docs", "configs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    for name in ("README.md", "mkdocs.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    assert docsgen.check(tmp_path) == []  # the copy is clean, so what follows is what was planted
    return tmp_path


def test_the_checker_reports_a_stale_or_missing_reference_page(docs_copy):
    cli = docs_copy / "docs" / "reference" / "cli.md"
    cli.write_text(cli.read_text().replace("`--dry-run`", "`--dry-runn`", 1))
    (docs_copy / "docs" / "reference" / "recipe-keys.md").unlink()
    problems = docsgen.stale(docs_copy)
    assert problems == ["docs/reference/cli.md: stale (the code changed since it was generated) — run make docs",
                        "docs/reference/recipe-keys.md: missing — run make docs"]  # fmt: skip
    assert docsgen.write(docs_copy) == ["docs/reference/cli.md", "docs/reference/recipe-keys.md"]
    assert docsgen.stale(docs_copy) == [] and docsgen.write(docs_copy) == []  # rerunnable: nothing left to do


def test_the_checker_reports_broken_links_and_anchors(docs_copy):
    page = docs_copy / "docs" / "pt.md"
    page.write_text(page.read_text() + "\nSee [nothing](nope.md), [sft](sft.md#no-such-heading), [here](#nor-here),\n"
                    "[a recipe](../configs/tiny-pt.yaml) and [fine](sft.md#padding-free-batches-packing).\n"
                    "`[in code](ignored.md)`\n")  # fmt: skip
    readme = docs_copy / "README.md"
    readme.write_text(readme.read_text() + "\n[gone](docs/gone.md)\n")
    n = page.read_text().count("\n") - 2  # the line of 'See ...'
    problems = docsgen.broken_links(docs_copy)
    assert problems == [
        "README.md:" + str(readme.read_text().count("\n")) + ": link 'docs/gone.md': docs/gone.md does not exist",
        f"docs/pt.md:{n}: link 'nope.md': nope.md does not exist",
        f"docs/pt.md:{n}: link 'sft.md#no-such-heading': no heading with anchor #no-such-heading in docs/sft.md",
        f"docs/pt.md:{n}: link '#nor-here': no heading with anchor #nor-here in docs/pt.md",
        f"docs/pt.md:{n + 1}: link '../configs/tiny-pt.yaml' leaves docs/, which the docs site cannot follow — name the "
        "file in `code` instead",
    ], problems


def test_the_checker_reports_unlisted_pages_and_missing_configs(docs_copy):
    (docs_copy / "docs" / "orphan.md").write_text("# Orphan\n\n```bash\ndevops-model sft configs/tiny-sft.yaml\n"
                                                  "devops-model pt configs/nope-pt.yaml nproc_per_node=2\n```\n\n"
                                                  "Run `devops-model dpo configs/deepspeed/zero9.json`.\n")  # fmt: skip
    assert docsgen.unlisted_pages(docs_copy) == ["docs/orphan.md: not linked from docs/index.md — add it there",
                                                 "docs/orphan.md: not in mkdocs.yml's nav — add it there"]
    assert docsgen.missing_configs(docs_copy) == [
        "docs/orphan.md:5: the command names configs/nope-pt.yaml, which does not exist",
        "docs/orphan.md:8: the command names configs/deepspeed/zero9.json, which does not exist",
    ]
    (docs_copy / "configs" / "tiny-sft.yaml").unlink()  # a shipped recipe renamed: the docs naming it fail
    assert any("configs/tiny-sft.yaml, which does not exist" in p for p in docsgen.check(docs_copy))


def test_the_check_command_exits_1_and_names_each_problem(docs_copy, monkeypatch, capsys):
    monkeypatch.setattr(docsgen, "ROOT", docs_copy)
    (docs_copy / "docs" / "reference" / "cli.md").write_text("old\n")
    assert docsgen.main(["--check"]) == 1
    assert "docs/reference/cli.md: stale (the code changed since it was generated) — run make docs" in capsys.readouterr().out
    assert docsgen.main(["--bogus"]) == 2
