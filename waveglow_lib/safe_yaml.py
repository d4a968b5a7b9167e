"""YAML for parameter files and --set values: the safe loader, bounded, with errors that name file and line.

PyYAML's safe loader already refuses tags such as `!!python/object/apply`. This adds bounds (a document's
bytes, its nesting depth, its aliases and what they expand to: a "billion laughs" document is a few lines of
anchors that expand to billions of values when anything walks the result), refuses numbers whose meaning
depends on the YAML version (`010` is 8 in YAML 1.1, the version PyYAML reads even after `%YAML 1.2`; `0x10`,
`0b11`, `1_000`, `1:20`; `yes`/`no`/`on`/`off`, booleans to YAML 1.1 and strings to 1.2), and turns every YAML error into a ConfigError of one line:
`<file>:<line>:<column>: <problem>`.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import ConfigError

#: a params file holds ~30 settings (2-3 KiB): the bound keeps a huge plain document from taking seconds
MAX_YAML_BYTES = 64 * 1024
MAX_YAML_DEPTH = 50
#: aliases (`*name`) a document may use, and the values they may add once expanded
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 10_000
_INT_TAG, _FLOAT_TAG, _BOOL_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
#: the numbers that mean the same in YAML 1.1 and 1.2 (and to a reader): plain decimal
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, bounded while it composes (depth, aliases) and measured before it constructs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_ALIASES} aliases (*name)",
                                                  self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_numbers(node)
        if self.aliases:
            _check_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A key given twice is a mistake (the later value would silently win)."""
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_numbers(root: yaml.Node) -> None:
    """Refuse numbers YAML 1.1 and 1.2 read differently (`010` octal, `0x10`, `0b11`, `1_000`, `1:20`),
    naming the parameter (the nearest mapping key above the number)."""
    stack: list[tuple[yaml.Node, str | None]] = [(root, None)]
    seen: set[int] = set()
    while stack:
        node, key = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                stack.extend([(key_node, key), (value_node, name)])
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, key) for child in node.value)
        elif _ambiguous_number(node) or _ambiguous_boolean(node):
            what = f"parameter '{key}': " if key else ""
            plain = "true or false" if node.tag == _BOOL_TAG else "a plain decimal number"
            raise yaml.constructor.ConstructorError(
                None, None, f"{what}{node.value!r} means different things in YAML 1.1 and 1.2 (PyYAML reads "
                            f"{yaml.safe_load(node.value)!r}); write {plain}, or quote it for a string",
                node.start_mark)


def _ambiguous_boolean(node: yaml.Node) -> bool:
    """`yes`, `no`, `on`, `off` (and their capitalised forms): booleans to YAML 1.1, strings to YAML 1.2."""
    return node.tag == _BOOL_TAG and str(node.value).lower() not in ("true", "false")


def _ambiguous_number(node: yaml.Node) -> bool:
    """An int that is not plain decimal (a leading zero or a base prefix), or a float with `_` or `:`.
    (`0o17`, YAML 1.2's octal, is a string to YAML 1.1: a number parameter refuses it by its type, and a string
    parameter keeps it, as `to_yaml` writes it back unquoted.)"""
    text = str(node.value)
    if node.tag == _INT_TAG:
        return not _PLAIN_INT.fullmatch(text)
    return node.tag == _FLOAT_TAG and ("_" in text or ":" in text)


def _check_size(root: yaml.Node) -> None:
    """Expanded size of a node graph in linear time: a node's size is memoised, however often it recurs.
    What the aliases add (the expanded size less the document's own values) is bounded."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # the nodes whose subtree is being measured: the path from the root
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not children_done:
            if id(node) in visiting:
                raise yaml.composer.ComposerError(None, None, "an alias that refers back to a value containing it",
                                                  node.start_mark)
            if depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases nest this document deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
            visiting.add(id(node))
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)
            continue
        visiting.discard(id(node))
        sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        if sizes[id(node)] - len(sizes) > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this document by more than {MAX_YAML_VALUES} values "
                            "(an alias bomb?)", node.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely; any problem is a ConfigError naming `source` and the line."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {size} bytes, more than the {MAX_YAML_BYTES} a parameters document may "
                          "hold (params files are a few KiB)", path=source)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(filter(None, [error.context, error.problem])) or "invalid YAML"
        raise ConfigError(f"{where}: {problem}", path=source) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be parameters", path=source) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML ({type(error).__name__}: {error})", path=source) from None
