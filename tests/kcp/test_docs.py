"""The documentation's key tables list exactly the keys of the config dataclasses, per family."""

import dataclasses
import os
import re

from kcp.core.config import Config, ModelConfig
from kcp.core.families import MODEL_FAMILIES

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "configuration.md")


def leaf_keys(cls, prefix: str) -> set:
    """Dotted keys of a config dataclass, nested sections flattened (data.augment.copies)."""
    keys = set()
    for field in dataclasses.fields(cls):
        nested = field.default_factory
        if field.metadata.get("internal"):
            continue
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            keys |= leaf_keys(nested, f"{prefix}.{field.name}")
        else:
            keys.add(f"{prefix}.{field.name}")
    return keys


def documented_tables() -> dict:
    """{group: keys} from the doc's tables; a group is a `### section`, or `model/FAMILY` after a "`FAMILY`:" line."""
    groups, group = {}, None
    for line in open(DOC, encoding="utf-8"):
        heading = re.match(r"^### (\w+)", line)
        family = re.match(r"^`(\w+)`:\s*$", line)
        if heading:
            group = heading.group(1)
        elif family and group and group.startswith("model"):
            group = f"model/{family.group(1)}"
        row = re.match(r"^\| `([a-z_.]+)` \|", line)
        if row and group:
            groups.setdefault(group, set()).add(row.group(1))
    return groups


def test_every_section_table_lists_exactly_its_keys():
    tables = documented_tables()
    for section in dataclasses.fields(Config):
        if section.name == "model":
            continue
        assert tables[section.name] == leaf_keys(section.default_factory, section.name), section.name


def test_the_model_tables_list_the_shared_keys_and_each_family_s_own():
    tables = documented_tables()
    shared = leaf_keys(ModelConfig, "model")  # the family is internal: its keys are in its own table
    assert tables["model"] == shared
    assert {group for group in tables if group.startswith("model/")} == {f"model/{name}" for name in MODEL_FAMILIES}
    for name, family in MODEL_FAMILIES.items():
        assert tables[f"model/{name}"] == leaf_keys(family, "model"), name
