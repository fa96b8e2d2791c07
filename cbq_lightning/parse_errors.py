"""One line for every error jsonargparse reports about a command line or a ``--config`` file.

Why: left to itself, jsonargparse answers a bad value with a usage dump of about a hundred lines and a
multi-line report about "Union subtypes" and Python classes, and a recipe that is not valid YAML is not even
named. The ``cbq`` parser is built with ``exit_on_error=False``, so these errors reach :func:`parse_error_line`
as an ``ArgumentError`` instead; it rewrites the message into the single ``cbq: error:`` line every other bad
input gets: the flag or file, the key, the value, what would be accepted and where to look. Only the wording
changes: what the parser accepts and refuses is jsonargparse's decision, untouched.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cbq_lightning.moved_keys import moved_to, why_moved
from cbq_lightning.recipe_file import named_bases, read_mapping

COMMANDS = ("quantize", "evaluate", "export")

#: how jsonargparse spells the simple types, and how a user reads them
_SIMPLE_TYPES = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "NoneType": "null",
    "list": "a list ([a, b])", "dict": "a mapping ({key: value})", "pathlib.Path": "a path",
}
#: the messages jsonargparse gives when a value is not a section (a dataclass): accepted is a mapping or null
_NOT_A_SECTION = ("Expected a path but", "dot import path", "Not a valid subclass", "Unexpected import path")


def parse_error_line(message: str, argv: Sequence[str], parser: Any = None) -> str:
    """The one-line version of jsonargparse's ``message`` for the command line ``argv`` (without ``cbq``).

    ``parser`` (the ``cbq`` parser) lets an unknown key be answered with the closest known ones.
    """
    command = command_of(argv)
    files = config_files(argv)
    broken = broken_config_file(files)
    if broken is not None:  # a file that is not a YAML mapping: the message would name no file
        return broken
    known = _known_keys(parser, command)
    for rewrite in (_no_command, _missing_option, _missing_value, _unknown_options, _unknown_key):
        line = rewrite(message, command, files, known)
        if line is not None:
            return line
    problem = _key_problem(message)
    if problem is not None:
        return _bad_value_line(problem, argv, files, command)
    return f"{' '.join(message.split()).rstrip('.')} ({_help(command)} lists the options)."


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand of ``argv`` (the first word that names one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def config_files(argv: Sequence[str]) -> list[str]:
    """Every ``--config`` value of ``argv``, in order (the later ones override the earlier)."""
    found = []
    for index, word in enumerate(argv):
        if word == "--config" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif word.startswith("--config="):
            found.append(word.split("=", 1)[1])
    return found


def broken_config_file(files: Sequence[str]) -> str | None:
    """The line for the first ``--config`` file (or recipe named by a ``base:`` key) that cannot be read as a
    YAML mapping; None when all can."""
    seen: set[Path] = set()
    for name in files:
        line = _broken_file(name, seen)
        if line is not None:
            return line
    return None


def _broken_file(name: str, seen: set[Path]) -> str | None:
    path = Path(name)
    if path.resolve() in seen:  # a base named twice (or a cycle, which the recipe loader reports itself)
        return None
    seen.add(path.resolve())
    if not path.exists():
        if _inline_mapping(name):  # jsonargparse also takes the YAML itself as --config's value
            return None
        return f"--config {name}: no such file; check the path (the recipes are in configs/)."
    if path.is_dir():
        return f"--config {name} is a folder, not a file: give the YAML file inside it (e.g. {name}/config.yaml)."
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        return f"--config {name} cannot be read ({error.strerror or error}): make it readable."
    except UnicodeDecodeError:
        return f"--config {name} is not a text file: give a YAML file (see configs/)."
    except yaml.YAMLError as error:
        return f"--config {name} is not valid YAML: {_yaml_problem(error)}; fix the file (see configs/ for examples)."
    if content is None:
        return f"--config {name} is empty: a config file is a YAML mapping of keys (see configs/)."
    if not isinstance(content, dict):
        return (f"--config {name} holds a YAML {type(content).__name__}, not a mapping of keys "
                "(key: value per line): see configs/ for examples.")
    return _broken_base(path, content, seen)


def _broken_base(path: Path, content: dict[str, Any], seen: set[Path]) -> str | None:
    """The line for a recipe's ``base:`` recipe (paths relative to ``path``'s folder) that is itself broken."""
    for target in named_bases(path, content):
        if target.exists():  # a missing base is the recipe loader's to report, naming the recipe
            line = _broken_file(str(target), seen)
            if line is not None:
                return line.replace(f"--config {target}", f"{target} (the base of {path})", 1)
    return None


def _inline_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``did not find expected ',' or ']' at line 2, column 1 (while parsing a flow sequence at line 1, column 8)``."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    problem = error.problem or "syntax error"
    if error.problem_mark is not None:
        problem += f" at {_where(error.problem_mark)}"
    if error.context:
        context = error.context + (f" at {_where(error.context_mark)}" if error.context_mark is not None else "")
        problem += f" ({context})"
    return problem


def _where(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _help(command: str | None) -> str:
    return f"cbq {command} --help" if command else "cbq --help"


def _known_keys(parser: Any, command: str | None) -> list[str]:
    """The option names of ``command``'s parser (for "did you mean"); empty when they cannot be read."""
    try:
        subparser = parser._subcommands_action._name_parser_map[command]  # noqa: SLF001 - jsonargparse's map
        return [action.dest for action in subparser._actions if not action.dest.endswith("help")]  # noqa: SLF001
    except (AttributeError, KeyError, TypeError):
        return []


def _did_you_mean(key: str, known: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + match for match in close)}?)" if close else ""


def _no_command(message: str, command: str | None, files: Sequence[str], known: Sequence[str]) -> str | None:
    choice = re.search(r"invalid choice: '([^']*)'", message)
    if choice:
        return f"unknown command {choice.group(1)!r}: use one of {', '.join(COMMANDS)} (cbq --help)."
    if '"command"' in message and "not provided" in message:
        return (f"no command given: use one of {', '.join(COMMANDS)}, e.g. cbq quantize --config "
                "configs/tiny.yaml (cbq --help).")
    return None


def _missing_option(message: str, command: str | None, files: Sequence[str], known: Sequence[str]) -> str | None:
    """``the following arguments are required: export.run`` (a subcommand's own required option)."""
    required = re.fullmatch(r"the following arguments are required: (.+)", message.strip())
    if required is None:
        return None
    names = [name.strip().removeprefix(f"{command}.") for name in required.group(1).split(",")]
    flags = " and ".join(f"--{name}" for name in names)
    who = f"cbq {command}" if command else "cbq"
    return f"{who} needs {flags}: give it on the command line or in the --config file ({_help(command)})."


def _missing_value(message: str, command: str | None, files: Sequence[str], known: Sequence[str]) -> str | None:
    """``argument --config: expected one argument``: a flag given last, without its value."""
    found = re.fullmatch(r"argument (\S+): expected (?:one|at least one) argument", message.strip())
    if found is None:
        return None
    return f"{found.group(1)} needs a value: give it after the flag ({_help(command)})."


def _unknown_options(message: str, command: str | None, files: Sequence[str], known: Sequence[str]) -> str | None:
    """``unrecognized arguments: --nope 1``: flags the command does not have."""
    found = re.fullmatch(r"unrecognized arguments: (.*)", message.strip(), flags=re.S)
    if found is None:
        return None
    words = found.group(1).split()
    flags = [word.split("=", 1)[0] for word in words if word.startswith("-")]
    if not flags:
        return f"unexpected argument {' '.join(words)!r}: options are given as --key value ({_help(command)})."
    moved = moved_to(flags[0].lstrip("-")) if command == "quantize" else None
    if moved is not None:
        return f"option {flags[0]} is now --{moved} ({why_moved(moved)}): rename it."
    hint = _did_you_mean(flags[0].lstrip("-"), known, "--")
    return f"unknown option {', '.join(flags)}{hint}: {_help(command)} lists the options."


def _unknown_key(message: str, command: str | None, files: Sequence[str], known: Sequence[str]) -> str | None:
    """A key the command does not have, in a ``--config`` file or a mapping given to a flag."""
    found = re.search(r"does not accept option '([^']+)'", message)
    nested = re.search(r'Parser key "([^"]+)":.*Option \'([^\']+)\' is not accepted', message, flags=re.S)
    if found is None and nested is None:
        return None
    key = found.group(1) if found else f"{nested.group(1)}.{nested.group(2)}"  # type: ignore[union-attr]
    where = _file_with(key, files)
    origin = f"key {key} in {where}" if where else f"key {key}"
    moved = moved_to(key) if command == "quantize" else None
    if moved is not None:
        return f"{origin} is now {moved} ({why_moved(moved)}): move it there."
    who = f"cbq {command}" if command else "cbq"
    return (f"{origin} is not an option of {who}{_did_you_mean(key, known)}: rename or remove it "
            f"({_help(command)} lists the keys).")


@dataclass(frozen=True)
class KeyProblem:
    """What jsonargparse's ``Parser key "..."`` report says, without its layout."""

    #: the dotted key (a section's inner key joined to the section's)
    key: str
    #: the refused value as the user wrote it (None when the report does not say)
    value: str | None
    #: what would have been accepted, in words ("an integer", "one of cbq, rtn", ...); empty when unknown
    accepted: list[str]
    #: the report's own reason when it is not a type mismatch (a missing file, a missing inner key)
    reason: str | None = None


def _key_problem(message: str) -> KeyProblem | None:
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return None
    key = ".".join(keys)
    missing = re.search(r"the following arguments are required: (.+)", message)
    if missing is not None:  # a section switched on without one of its required keys
        inner = missing.group(1).strip()
        reason = f"the {key} section needs {key}.{inner} (or {key}: null to switch the section off)"
        return KeyProblem(f"{key}.{inner}", None, [], reason=reason)
    got = re.findall(r"Got value: (.*)", message)
    given = re.findall(r"Given value: (.*)", message)
    value = got[-1] if got else _nested_value(given[0]) if given else None
    return KeyProblem(key, value, _accepted(message), reason=_other_reason(message))


def _nested_value(given: str) -> str:
    """``NestedArg(key='damp', val='abc')`` -> ``abc``; any other given value as written."""
    nested = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", given.strip())
    if nested is None:
        return given.strip()
    return nested.group(1).strip("'")


def _accepted(message: str) -> list[str]:
    """The accepted types of the innermost key: its union's members, else its one ``Expected a ...``."""
    innermost = message[message.rfind('Parser key "'):]  # a section's inner key is reported inside the section's
    subtypes = re.search(r"Subtypes: \[(.*)\]\s*$", innermost, flags=re.M)
    if subtypes is not None:
        return _describe_all(_split_types(subtypes.group(1)))
    expected = re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", innermost, flags=re.M)
    return _describe_all([text for text in expected if not text.startswith("path")][:1])


def _split_types(text: str) -> list[str]:
    """``typing.Literal['a', 'b'], <class 'NoneType'>`` -> its two members (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def _describe_all(types: Sequence[str]) -> list[str]:
    """The members in words; a Literal's choices and ``null`` merge into one "one of ..." list."""
    choices: list[str] = []
    words: list[str] = []
    for text in types:
        literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text.strip())
        if literal is not None:
            choices += [choice.strip().strip("'\"") for choice in _split_types(literal.group(1))]
        else:
            words.append(_describe(text))
    if choices:
        return [f"one of {', '.join(choices + (['null'] if 'null' in words else []))}"] + [
            word for word in words if word != "null"]
    return words


def _describe(text: str) -> str:
    simple = re.fullmatch(r"<class '([\w.]+)'>", text.strip())
    if simple is None:
        return text.strip().replace("typing.", "")
    name = simple.group(1)
    if name in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[name]
    return "a mapping of the section's keys ({} for its defaults)"  # a dataclass: an optional section


def _other_reason(message: str) -> str | None:
    """The report's reason when it is not about the value's type (e.g. ``File does not exist: 'x'``)."""
    first = message.split("\n", 1)[0]
    rest = first.split(":", 1)[1].strip() if ":" in first else ""
    if rest:
        return rest
    if "Expected" not in message and not any(marker in message for marker in _NOT_A_SECTION):
        lines = [line.strip(" -") for line in message.splitlines()[1:] if line.strip()]
        return "; ".join(lines) or None
    return None


def _bad_value_line(problem: KeyProblem, argv: Sequence[str], files: Sequence[str], command: str | None) -> str:
    """``--method 'xyz' is not valid: expected one of cbq, rtn; ...`` (or ``KEY 'VALUE' in FILE ...``)."""
    if problem.key == "config" and problem.reason:  # the config action's own refusal names the file already
        return f"--config: {problem.reason.rstrip('.')}."
    flag = _flag_in(problem.key, argv)
    where = None if flag else _file_with(problem.key, files)
    value = f" {problem.value!r}" if problem.value is not None else ""
    if flag == f"--{problem.key}":
        origin, fix = f"{flag}{value}", "change the flag"
    elif flag:  # a mapping given to a section's flag: --extensions.gptq '{damp: x}'
        origin, fix = f"{problem.key}{value} in {flag}", f"change {flag}"
    elif where:
        origin, fix = f"{problem.key}{value} in {where}", "fix it in that file"
    else:
        origin, fix = f"{problem.key}{value}", f"set {problem.key}"
    if problem.reason and not problem.accepted:
        return f"{origin}: {problem.reason}; {fix} ({_help(command)})."
    accepted = " or ".join(problem.accepted) if problem.accepted else "another value"
    return f"{origin} is not valid: expected {accepted}; {fix} ({_help(command)} lists the options)."


def _flag_in(key: str, argv: Sequence[str]) -> str | None:
    """The flag of ``argv`` that set ``key`` (or the section holding it: ``--extensions.gptq '{damp: x}'``)."""
    parts = key.split(".")
    for length in range(len(parts), 0, -1):
        flag = "--" + ".".join(parts[:length])
        if any(word == flag or word.startswith(flag + "=") for word in argv):
            return flag
    return None


def _file_with(key: str, files: Sequence[str]) -> str | None:
    """The last file that sets ``key`` (or the section holding it) of the ``--config`` files and their ``base:``
    recipes, in the order they apply; None when none does."""
    for name in reversed(_applied_files(files)):
        if _holds(_mapping(Path(name)), key.split(".")):
            return name
    return None


def _applied_files(files: Sequence[str], seen: frozenset[Path] = frozenset()) -> list[str]:
    """``files`` with each recipe's ``base:`` recipes before it (relative to its folder), cycles cut."""
    applied: list[str] = []
    for name in files:
        path = Path(name)
        if path.resolve() in seen:
            continue
        targets = [str(target) for target in named_bases(path, _mapping(path))]
        applied += [*_applied_files(targets, seen | {path.resolve()}), name]
    return applied


def _mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; empty when it is missing or not a mapping."""
    return read_mapping(path) or {}


def _holds(tree: Any, parts: list[str]) -> bool:
    """Whether the YAML ``tree`` sets the dotted key ``parts``: as nested mappings, as a dotted key, or through
    a section it sets to something other than a mapping (``quant: 3`` sets ``quant.bits`` as far as errors go)."""
    if not isinstance(tree, dict) or not parts:
        return False
    if ".".join(parts) in tree:
        return True
    if parts[0] not in tree:
        return False
    inner = tree[parts[0]]
    return len(parts) == 1 or not isinstance(inner, dict) or _holds(inner, parts[1:])
