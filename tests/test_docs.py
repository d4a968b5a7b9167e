"""Every command the README and docs/ show is one the project takes: each `python -m waveglow_lib ...` line
(in code blocks, tables or inline code) parses with the CLI and builds its configuration — params file,
`--set` keys and values — without running; `--help` lines print help; `make` targets exist; the demo-model
script's lines parse with its own parser. A renamed flag, parameter or file breaks this test, not a reader."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from waveglow_lib.assets import train_demo_model
from waveglow_lib.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: what a documented command line starts with (an optional launcher, then our module)
COMMAND = re.compile(r"(?:\.venv/bin/)?(?:torchrun [^`|]*?)?(?:python -m |-m )(waveglow_lib(?:\.assets\.\w+)?)\b([^`\n]*)")


def _lines(text: str) -> list[str]:
    """Code lines (fenced blocks with continuations joined) and inline code spans."""
    out, prose, in_block = [], [], False
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            out.append(line.split(" #")[0])
        else:
            prose.append(line)
    # inline code may wrap onto the next line of a paragraph
    out.extend(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(prose)))
    return out


def documented_commands() -> list[tuple[str, str, str]]:
    """(doc file, module, argument string) for every documented command of ours."""
    found = []
    for doc in DOCS:
        for line in _lines(doc.read_text()):
            for module, rest in COMMAND.findall(line):
                found.append((doc.name, module, rest.strip()))
    return found


def argv_variants(rest: str) -> list[list[str]]:
    """The argument lists a line stands for: `[...]` optional parts left out, `...` dropped, and a first
    word `a|b|c` expanded to each command (other `x|y` placeholders take their first choice)."""
    rest = re.sub(r"\[[^\]]*\]", "", rest).replace("...", " ").replace("…", " ")
    words = shlex.split(rest)
    if not words:
        return [[]]
    heads = words[0].split("|")
    tail = [w.split("|")[0] if "|" in w and "=" not in w else w for w in words[1:]]
    return [[head, *tail] for head in heads]


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    modules = {module for _, module, _ in COMMANDS}
    assert {"waveglow_lib", "waveglow_lib.assets.train_demo_model"} <= modules
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("doc,module,rest", COMMANDS, ids=[f"{d}:{r[:40]}" for d, _, r in COMMANDS])
def test_every_documented_command_parses_and_configures(doc, module, rest, monkeypatch):
    monkeypatch.chdir(ROOT)  # documented paths are relative to the repository root
    for argv in argv_variants(rest):
        if module == "waveglow_lib.assets.train_demo_model":
            args = train_demo_model.build_parser().parse_args(argv)
            assert args.until or args.evaluate_only or args.ceilings, f"{doc}: {argv}"  # else main() refuses it
            continue
        if module != "waveglow_lib":  # another script of the package, run without arguments
            assert callable(getattr(importlib.import_module(module), "main", None)) and not argv, f"{doc}: {module}"
            continue
        if "--help" in argv:
            with pytest.raises(SystemExit) as done:
                build_parser().parse_args(argv)
            assert done.value.code == 0, f"{doc}: {argv}"
            continue
        args = build_parser().parse_args(argv)
        command = args.command_spec
        (command.configure or config_from_args)(args)  # params file, --set keys and values, flags


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    documented = {t for doc in DOCS for t in re.findall(r"`make ([\w-]+)`|^make ([\w-]+)", doc.read_text(), flags=re.M)
                  for t in t if t}
    assert documented and documented <= targets, documented - targets


def test_links_between_docs_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}"
