"""YAML loading that remembers where each value came from.

Mappings load as `LocDict` and sequences as `LocList`; both carry the 1-based line of the node itself
and of each key or item, so a validation error can point at `matrix.yaml:LINE`. Duplicate keys, which
PyYAML silently lets the last one win, are an error here.
"""

from __future__ import annotations

import os
import stat
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
            if not isinstance(key_node, yaml.ScalarNode):
                raise UserError(f"{where(self.path, key_node.start_mark.line + 1)}: a mapping key must be a plain "
                                "value, not a list or a mapping; write the key as text")
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


MAX_BYTES = 1 << 20  # a matrix is a few KB; anything near this is not one
MAX_NODES = 100_000  # values after alias expansion: far above any real matrix, far below an alias bomb


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded, without expanding it: an
    alias is the same node object, so each distinct node's size is computed once."""
    sizes: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # iterative post-order: deep nesting cannot exhaust the Python stack
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    for node in reversed(order):
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
    return sizes[id(root)]


def load_text(text: str, path: str) -> Any:
    """Parse YAML text; syntax errors become one `path:line: ...` message. Aliases are allowed, but a
    document that expands to more than MAX_NODES values is refused before anything is built from it."""
    loader = _Loader(text)
    loader.path = path
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise UserError(f"{path}: the YAML expands to more than {MAX_NODES:,} values through its aliases "
                            "(*name); a matrix is far smaller: write the values out")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise UserError(f"{where(path, line)}: malformed YAML: {problem}; fix the syntax at that line") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML: {str(exc)[:200]}; fix the syntax") from exc
    except RecursionError as exc:
        raise UserError(f"{path}: the YAML nests too deeply; a matrix is a few levels deep") from exc
    finally:
        loader.dispose()


def load_file(path: Path) -> Any:
    """Read a matrix: a regular file of at most MAX_BYTES of UTF-8 (not a device, FIFO or directory)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any special file.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(path)
            if not stat.S_ISREG(info.st_mode):
                raise UserError(f"{path}: not a regular file (a device, a FIFO or a socket); pass the matrix file")
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise UserError(f"{path}: file not found; pass an existing file with --matrix or set LMI_MATRIX") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{path}: is a directory, not a YAML file; pass the matrix file itself") from exc
    except PermissionError as exc:
        raise UserError(f"{path}: not readable ({exc.strerror}); check its permissions") from exc
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES >> 10} KiB; a matrix is a few KB, so this is not one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from exc
    return load_text(text, str(path))
