"""Griffe extension: turn the docstrings' Sphinx roles into checked cross-references.

The docstrings write ``:class:`Trainer``` and ``:func:`~jaxae.loop.fit``` as Sphinx does.
mkdocstrings links with autorefs' ``[title][identifier]`` instead, so this rewrites each role
into that form with the name resolved from where the docstring stands (its module, its class).
A name that resolves nowhere is left for autorefs, whose warning fails the strict build: a
docstring cannot point at something that does not exist.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(?P<body>[^`]+)`")


def _canonical(obj: Any, loader: Any, name: str) -> str:
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head) if head != "jaxae" else "jaxae"
    except Exception:  # griffe raises NameResolutionError; anything unresolved is autorefs' to report
        return name
    full = f"{path}.{rest}" if rest else path
    try:
        target = loader.modules_collection[full]
    except KeyError:
        return full
    return target.target_path if target.is_alias else target.path


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: Any, loader: Any, **kwargs: Any) -> None:
        if obj.docstring is None:
            return

        def link(match: re.Match) -> str:
            body = match.group("body")
            explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
            if explicit:
                title, target = explicit.group("title"), explicit.group("target")
            else:
                target = body.lstrip("~")
                title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
            return f"[`{title}`][{_canonical(obj, loader, target)}]"

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
