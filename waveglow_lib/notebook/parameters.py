"""The notebooks' parameters, checked before anything runs: the names papermill injected and their types.

papermill writes the parameters it is given into a cell of Python assignments ("# Parameters", after the
notebook's own `parameters` cell) and runs it: a name it is given is code (docs/security.md). The project's
`run` passes only `params_file` and `overrides`; a person calling papermill may pass anything, and a typo
(`param_file`) would be silently ignored while the notebook runs on its defaults. `check_parameters` reads
that injected cell back from the kernel's input history and refuses, in one line, any name the notebook does
not read, then the types of the two it always reads. It also makes the library's own errors (`WaveGlowError`)
show as their one-line message in the notebook, not as a traceback through the library.
"""
from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, ConfigTypeError, WaveGlowError

#: the parameters every notebook reads (the project's `run` passes exactly these)
RUN_PARAMETERS = ("params_file", "overrides")
#: the first line of the cell papermill injects (papermill.translators: `comment("Parameters")`)
INJECTED_HEADER = "# Parameters"


def injected_names(source: str) -> list[str]:
    """The names an injected-parameters cell assigns; ConfigError when it holds anything but plain
    `name = value` assignments (a parameter name that is code)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConfigError(f"papermill's injected parameters are not plain assignments ({exc.msg}): pass "
                          f"only {', '.join(RUN_PARAMETERS)}") from None
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names.append(node.targets[0].id)
        else:
            raise ConfigError(f"papermill's injected parameters hold code, not only `name = value` assignments "
                              f"(line {node.lineno}): a parameter name is code; pass only {', '.join(RUN_PARAMETERS)}")
    return names


def _injected_cell(history: Iterable[str]) -> str | None:
    """The most recent injected-parameters cell in the kernel's input history, None when there is none
    (the notebook was opened and run by hand)."""
    for source in reversed(list(history)):
        if source.split("\n", 1)[0].rstrip() == INJECTED_HEADER:
            return source
    return None


def check_names(names: Iterable[str], allowed: Iterable[str]) -> None:
    """ConfigError naming the first injected name the notebook does not read (and the likely one meant)."""
    allowed = list(allowed)
    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"papermill parameter {name!r} is not one this notebook reads{hint}: it reads "
                              f"{', '.join(allowed)}; set run settings in the params file or as keys of `overrides`")


def check_types(params_file: Any, overrides: Any) -> None:
    """ConfigTypeError in one line when `params_file` is not a path or `overrides` not a mapping."""
    if not isinstance(params_file, (str, os.PathLike)) or isinstance(params_file, bool):
        raise ConfigTypeError(f"parameter 'params_file' must be a path to a params file (a string, e.g. "
                              f"\"params/demo.yaml\"), got {type(params_file).__name__} {params_file!r}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigTypeError(f"parameter 'overrides' must be a mapping of parameter names to values (e.g. "
                              f"{{\"limit\": 3}}), got {type(overrides).__name__} {str(overrides)[:80]!r}")
    for key in overrides or {}:
        if not isinstance(key, str):
            raise ConfigTypeError(f"parameter 'overrides' must have parameter names as keys, got {key!r}")


def _one_line_errors(shell) -> None:
    """The library's errors shown as their message, one line, in the notebook (not a traceback through
    the library: the message says what is wrong and what to do)."""
    def show(self, etype, value, tb, tb_offset=None):
        stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}"]
        self._showtraceback(etype, value, stb)   # IPython leaves showing it to the handler
        return stb

    shell.set_custom_exc((WaveGlowError,), show)


def check_parameters(params_file: Any, overrides: Any, *, also: Iterable[str] = ()) -> None:
    """What each notebook calls first (through `notebook_config`, or itself): refuses injected parameters
    other than `params_file`, `overrides` and the notebook's own (`also`), then wrong types."""
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        _one_line_errors(shell)
        source = _injected_cell(shell.user_ns.get("In") or [])
        if source is not None:
            check_names(injected_names(source), [*RUN_PARAMETERS, *also])
    check_types(params_file, overrides)
