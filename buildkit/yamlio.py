"""YAML loading that remembers where each value came from.

Mappings load as `LocDict` and sequences as `LocList`; both carry the 1-based line of the node itself
and of each key or item, so a validation error can point at `matrix.yaml:LINE`. Duplicate keys, which
PyYAML silently lets the last one win, are an error here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, where


class LocDict(dict):
    line: int = 0
    key_lines: dict
    raw: dict  # key -> the scalar's text as written ("12.10" where the value became the float 12.1)

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LocList(list):
    line: int = 0
    item_lines: list

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


class _Loader(yaml.SafeLoader):
    """SafeLoader that builds LocDict/LocList and refuses duplicate keys."""

    path: str = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LocDict:  # type: ignore[override]
        self.flatten_mapping(node)
        result = LocDict()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.raw = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            line = key_node.start_mark.line + 1
            if key in result:
                raise UserError(
                    f"{where(self.path, line)}: duplicate key '{key}' (first at line {result.key_lines[key]}); "
                    "keep one of them"
                )
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = line
            if isinstance(value_node, yaml.ScalarNode):
                result.raw[key] = value_node.value
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LocList:  # type: ignore[override]
        result = LocList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _Loader.construct_sequence)


def load_text(text: str, path: str) -> Any:
    """Parse YAML text; syntax errors become one `path:line: ...` message."""
    loader = _Loader(text)
    loader.path = path
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise UserError(f"{where(path, line)}: malformed YAML: {problem}; fix the syntax at that line") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML: {exc}; fix the syntax") from exc
    finally:
        loader.dispose()


def load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"{path}: file not found; pass an existing file with --matrix or set LMI_MATRIX") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{path}: is a directory, not a YAML file; pass the matrix file itself") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from exc
    return load_text(text, str(path))
