"""YAML for parameter files and --set values: the safe loader, bounded, with errors that name file and line.

PyYAML's safe loader already refuses tags such as `!!python/object/apply`; this adds a bound on what
aliases can expand to (a "billion laughs" document is a few lines of anchors that expand to billions of
values when anything walks the result) and nesting depth, and turns every YAML error into a ConfigError
of one line: `<file>:<line>:<column>: <problem>`.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

#: values a parameter document may expand to (aliases counted at their full size); params files hold ~30
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 50


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader; each document is measured (aliases expanded, without expanding them) first."""

    def compose_document(self) -> Any:
        node = super().compose_document()
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


def _check_size(root: yaml.Node) -> None:
    """Expanded size of a node graph in linear time: a node's size is memoised, however often it recurs."""
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
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", node.start_mark)
            visiting.add(id(node))
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)
            continue
        visiting.discard(id(node))
        sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        if sizes[id(node)] > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this document to more than {MAX_YAML_VALUES} values "
                            "(an alias bomb?)", node.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely; any problem is a ConfigError naming `source` and the line."""
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
