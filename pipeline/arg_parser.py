"""The CLI's argument parser: a parse error is one line, in the user's terms.

jsonargparse prints the usage of every option (about 100 lines) before the line that says what was wrong,
reports a malformed YAML file as ``in "<unicode string>", line 2`` and an unknown key in a config file
without naming the file, and answers ``--model.num_classes`` with a link to ``data.num_classes``, an
option that does not exist. This parser prints a one-line usage, names the config file, and says where
the number of classes comes from.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

import yaml
from pytorch_lightning.cli import LightningArgumentParser

from pipeline.module import NUM_CLASSES_HINT
from pipeline.parsed_config import SECTIONS

_configs_read: list[str] = []  # every --config file parsed in this process, in order


class PipelineArgumentParser(LightningArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_st 0` was read as trainer.max_steps
        super().__init__(*args, **kwargs)
        self._reading: list[str] = []  # the --config file being read (nested: innermost last)

    def print_usage(self, file=None) -> None:
        """One line, not every option: the error and the ``--help`` tip follow it."""
        prog = self.prog.replace(" [options]", "")
        subcommands = getattr(self, "_subcommands_action", None)
        if subcommands is not None:
            prog += " {" + ",".join(subcommands.choices) + "}"
        print(f"usage: {prog} [--config FILE ...] [--SECTION.KEY VALUE ...]", file=file or sys.stdout)

    def parse_path(self, cfg_path, *args, **kwargs):
        self._reading.append(str(cfg_path))
        _configs_read.append(str(cfg_path))
        try:
            self._check_sections(cfg_path)
            return super().parse_path(cfg_path, *args, **kwargs)
        except UnicodeDecodeError as e:  # a binary file (a checkpoint, a tar): jsonargparse let the traceback out
            self.error(f"--config {cfg_path} is not a text (UTF-8) file: {e.reason} at byte {e.start}")
        finally:
            self._reading.pop()

    def _check_sections(self, cfg_path) -> None:
        """``trainer: 5`` in a file was dropped without a word (the run went on with the defaults) and
        ``checkpoint: [1]`` failed later in a traceback: a section is a mapping (or a file name)."""
        try:
            node = yaml.safe_load(Path(str(cfg_path)).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError):
            return  # the parse itself says what is wrong
        for section, value in (node.items() if isinstance(node, dict) else ()):
            if section in SECTIONS and value is not None and not isinstance(value, (dict, str)):
                self.error(f"--config {cfg_path}: {section}: expected a mapping of settings ({section}.KEY: VALUE), "
                           f"got {value!r}")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(self.explain(message), ex)

    def explain(self, message: str) -> str:
        """`message` on one line, naming the config file it is about and the setting to change."""
        if message.startswith("Problems parsing config") and self._reading:
            detail = message.split(":", 1)[1].strip().replace('\n  in "<unicode string>",', " at")
            return f"--config {self._reading[-1]} is not valid YAML: {'; '.join(detail.splitlines())}"
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        message = _nested_setting(message) or _choices(message) or message
        if message.startswith("--config ") and ": expected a mapping of settings" in message:
            return message
        if message.startswith("Unexpected config:") and self._reading:  # a file of no settings, or of a list
            try:
                empty = yaml.safe_load(Path(self._reading[-1]).read_text()) is None
            except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError):
                empty = False
            if empty:
                return f"--config {self._reading[-1]} holds no settings (an empty file, or only comments)"
        if message.startswith("--config ") and " is not a text (UTF-8) file" in message:
            return message
        if re.search(r'Linked "model(\.init_args)?\.num_classes" must be given via', message):
            return f"model.num_classes: {NUM_CLASSES_HINT}"
        if self._reading:  # a bad value in the file being read
            return f"--config {self._reading[-1]}: {message}"
        unknown = re.search(r"Subcommand '(\w+)' does not accept option '([^']+)'", message)
        if unknown and (path := _config_with_key(unknown.group(2))):
            return (f"--config {path}: unknown key {unknown.group(2)} "
                    f"(`python -m pipeline {unknown.group(1)} --help` lists them)")
        return message


_UNION = re.compile(r'Parser key "(?P<section>[\w.]+)": Does not validate against any of the Union subtypes .*?'
                    r"Problem with given class_path '[^']+': (?P<inner>.*?) - Expected a <class 'NoneType'>")


def _nested_setting(message: str) -> str | None:
    """A bad key or value inside an optional settings class (``data.augment``): jsonargparse reports the
    whole union it tried (about 400 characters of class names and ``NestedArg(...)``); say which setting."""
    m = _UNION.search(message)
    if not m:
        return None
    section, inner = m.group("section"), m.group("inner")
    if unknown := re.fullmatch(r"Option '([^']+)' is not accepted", inner):
        return f"unknown key {section}.{unknown.group(1)}"
    if bad := re.fullmatch(r'Parser key "([^"]+)": (.*)', inner):
        detail = re.sub(r"<class '(\w+)'>", r"\1", bad.group(2)).replace("typing.Literal", "one of ")
        if expected := re.fullmatch(r"Expected an? (.*?)\. Got value: (.*)", detail):
            detail = f"expected {expected.group(1)}, got {expected.group(2)}"
        return f"{section}.{bad.group(1)}: {detail}"
    return f"{section}: {inner}"


_CHOICES = re.compile(r'Parser key "(?P<key>[\w.]+)": Does not validate against any of the Union subtypes '
                      r"Subtypes: \[(?P<subtypes>.*?)\] Errors: .* Given value: (?P<value>.*)$")


def _choices(message: str) -> str | None:
    """A value outside a setting's fixed choices (``trainer.precision 17``): jsonargparse lists each
    ``Literal`` of the union and each of its errors (about 700 characters); say the value and the choices."""
    m = _CHOICES.search(message)
    if not m:
        return None
    parts = re.findall(r"typing\.Literal\[(.*?)\]|<class '(\w+)'>", m.group("subtypes"))
    if any(cls and cls != "NoneType" for _, cls in parts):
        return None  # a union with other types: its errors say more than a list of choices
    null = " (or null)" if any(cls == "NoneType" for _, cls in parts) else ""
    other = re.sub(r"typing\.Literal\[.*?\]|<class '\w+'>", "", m.group("subtypes")).strip(" ,")
    if other:  # a list (``model.milestone_steps: list[int] | None``): no choices, it said "is not one of: "
        example = " in brackets, e.g. [30, 45]" if other.startswith("list[") else ""
        return f"{m.group('key')}: expected {other}{example}{null}, got {m.group('value')}"
    choices: list[str] = []
    for literal, _ in parts:
        for item in (v.strip() for v in literal.split(",")):
            if item and item.strip("'") not in choices:
                choices.append(item.strip("'"))
    return f"{m.group('key')}: {m.group('value')} is not one of: {', '.join(choices)}{null}"


def _config_with_key(dotted: str) -> str | None:
    """The last config file read that has the (nested) key `dotted`: the one that set it."""
    for path in reversed(_configs_read):
        try:
            node = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        for part in dotted.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return path
    return None


_MISSING = object()
