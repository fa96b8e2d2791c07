"""Recipe files that name the recipe they build on (``base:``), for ``cbq quantize --config``.

Why: the method of a scheme lives in one recipe (``configs/w4a16.yaml``: what every model gets), and a recipe
for one model or machine (``configs/smollm2_w4a16.yaml``: the demo model, its data and a CPU budget) says only
what differs. Writing a method key twice lets the two drift apart, and then the demo measures a method that
users do not get. ``base:`` keeps one copy: the base is applied first, then the file's own keys over it, exactly
as ``--config BASE --config FILE`` would (jsonargparse composes several config files in order).

``base:`` is one path or a list of paths (applied in order, e.g. the scheme's method and then a CPU budget),
each relative to the file that names it; a base may name its own bases; a cycle is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile

from cbq_lightning.moved_keys import moved_to, why_moved

#: the key a recipe names its base with (not a configuration key: it is consumed here)
BASE_KEY = "base"


def read_mapping(path: Path) -> dict[str, Any] | None:
    """The recipe's top-level mapping, or None when it is not a readable YAML mapping (left to jsonargparse,
    which reports a missing file or a YAML error in its own words)."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def named_bases(path: Path, mapping: dict[str, Any]) -> list[Path]:
    """The paths recipe ``path`` names under ``base:`` (one path or a list, in order), resolved against its folder;
    an entry that is not a path is left out (:func:`recipe_chain` refuses it, the error line reader skips it)."""
    base = mapping.get(BASE_KEY)
    names = base if isinstance(base, list) else [base]
    return [Path(name) if Path(name).is_absolute() else path.parent / name
            for name in names if isinstance(name, str) and name]


def _bases(path: Path, mapping: dict[str, Any]) -> list[Path]:
    """:func:`named_bases`, every one a path of an existing file."""
    base = mapping[BASE_KEY]
    names = base if isinstance(base, list) else [base]
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"recipe {path}: base={base!r} must name other recipes (one path or a list of paths, "
                        f"relative to {path.parent}).")
    for target in named_bases(path, mapping):
        if not target.is_file():
            raise TypeError(f"recipe {path}: its base recipe {target} does not exist; fix the 'base:' key.")
    return named_bases(path, mapping)


def _chain(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any] | None]]:
    """Each recipe ``path`` composes with its top-level mapping, read once, in the order they apply."""
    resolved = path.resolve()
    if resolved in _seen:
        cycle = " -> ".join(p.name for p in (*_seen, resolved))
        raise TypeError(f"recipe {path}: its base recipes form a cycle ({cycle}); remove one 'base:' key.")
    mapping = read_mapping(path)
    if mapping is None or BASE_KEY not in mapping:
        return [(path, mapping)]
    return [*(entry for base in _bases(path, mapping) for entry in _chain(base, (*_seen, resolved))), (path, mapping)]


def recipe_chain(path: Path) -> list[Path]:
    """The recipe files ``path`` composes, in the order they apply: each base's own chain, then ``path``.

    Raises:
        TypeError: a ``base`` that is not a path, that does not exist, or that leads back to a file already in
            the chain (jsonargparse reports a ``TypeError`` from a config action as a parse error).
    """
    return [recipe for recipe, _ in _chain(path)]


def leaves(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of ``mapping``; an empty mapping is a leaf (``gptq: {}``)."""
    found = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            found += leaves(value, f"{prefix}{key}.")
        else:
            found.append((f"{prefix}{key}", value))
    return found


def check_recipe_keys(recipe: Path, mapping: dict[str, Any], known: list[str]) -> None:
    """Refuse a key that moved (its new name given) and an empty section the parser does not know.

    Why: jsonargparse drops an empty mapping under a name it does not know (``quant: {gptq: {}}`` after the GPTQ
    start moved to ``extensions``) without a word, so an older recipe would run without the extension it asks for.
    ``known``: the parser's keys (an empty section is known when some key lies inside it); empty: not checked.
    """
    for key, value in leaves({k: v for k, v in mapping.items() if k != BASE_KEY}):
        moved = moved_to(key)
        if moved is not None:
            raise TypeError(f"recipe {recipe}: key {key} is now {moved} ({why_moved(moved)}): move it there.")
        empty_section = isinstance(value, dict)
        if empty_section and known and not any(name == key or name.startswith(key + ".") for name in known):
            raise TypeError(f"recipe {recipe}: key {key} is not an option of cbq quantize: rename or remove it.")


class RecipeFile(ActionConfigFile):
    """``--config`` that applies a recipe's ``base:`` chain first (see the module docstring), refusing keys that
    moved or that jsonargparse would drop unread (:func:`check_recipe_keys`)."""

    def __call__(self, parser, cfg, values, option_string=None) -> None:  # noqa: ANN001 - argparse's signature
        path = Path(str(values))
        known = [action.dest for action in getattr(parser, "_actions", [])]  # noqa: SLF001 - argparse's list
        for recipe, mapping in _chain(path) if path.is_file() else [(path, None)]:
            if mapping is not None:
                check_recipe_keys(recipe, mapping, known)
            if mapping is not None and BASE_KEY in mapping:  # its own keys, as YAML text without the base key
                own = {key: value for key, value in mapping.items() if key != BASE_KEY}
                self.apply_config(parser, cfg, self.dest, yaml.safe_dump(own, sort_keys=False))
                cfg[self.dest][-1] = str(recipe)  # name the file, not the text it was read as
            else:  # a file without a base (or a YAML string given to --config): jsonargparse's own behaviour
                self.apply_config(parser, cfg, self.dest, values if recipe is path else str(recipe))
