"""The README's figures and lists, read from where the code defines them, so that the two cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from qlora_lite import config
from qlora_lite.training.checkpoints import RESUMABLE_CHANGES

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SECTIONS = {cls.__name__: field.name for field in config.dataclasses.fields(config.RecipeConfig) if (cls := field.default_factory) is not config.dataclasses.MISSING}


def read_key_docs() -> dict[str, tuple[object, str]]:
    """Every recipe key -> (its default, the docstring under its field in config.py)."""
    tree = ast.parse((REPO / "qlora_lite" / "config.py").read_text())
    defaults = config.config_to_dict(config.RecipeConfig())
    docs = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and (node.name in SECTIONS or node.name == "RecipeConfig")):
            continue
        for field, doc in zip(node.body, node.body[1:]):
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                section = SECTIONS.get(node.name)
                key = f"{section}.{field.target.id}" if section else field.target.id
                docs[key] = ((defaults[section] if section else defaults)[field.target.id], doc.value.value)
    return docs


def test_the_config_table_is_the_docstrings_of_config_py():
    """One place knows what a key means: its docstring. The README's table is made of them (a failure prints the row to paste)."""
    docs = read_key_docs()
    assert sorted(docs) == sorted(config.valid_keys())
    rows = [f"| `{key}` | `{default!r}` | {doc} |" for key, (default, doc) in docs.items()]
    missing = [row for row in rows if row not in README.splitlines()]
    assert missing == []


def test_the_settings_a_resume_may_change_are_the_ones_the_readme_lists():
    """Issue 22: train.report_to could change on resume but was missing from the README's list."""
    listed = re.search(r"A resume may change only these settings: (.*?)\.\n", README, re.S).group(1)
    assert sorted(re.findall(r"`([a-z_.]+)`", listed)) == sorted(RESUMABLE_CHANGES)


def test_the_readme_says_what_the_first_lines_of_metrics_jsonl_are():
    """Issue 22: the environment record was called metrics.jsonl's first line; the data record is (fit's open_log writes both)."""
    source = (REPO / "qlora_lite" / "training" / "fit.py").read_text()
    order = re.findall(r'log\.write\(\{"event": "(data|environment)"', source)
    assert order == ["data", "environment"]
    assert "| data (first line; again on resume) |" in README and "| environment (second line; again on resume) |" in README
    assert "first line of\n`metrics.jsonl` (event `environment`)" not in README and "as the second line of `metrics.jsonl`" in README


def test_the_demo_takes_the_same_time_wherever_it_is_said():
    """Issue 22: "about 60 s", "about two minutes" and "a few minutes" in three places."""
    recipe = (REPO / "recipes" / "tiny-demo.yaml").read_text().splitlines()[0]
    first_command = next(line for line in README.splitlines() if line.startswith("# 1. install and run the offline demo"))
    section = README[README.index("## The demo"):README.index("## Recipes")]
    said = [re.findall(r"about (\d+) s the first time", text) for text in (recipe, first_command, section)]
    assert said == [["80"], ["80"], ["80"]]
