"""Filling ``{name}`` fields of user-editable prompt templates.

Templates hold LaTeX and code, whose braces ``str.format`` would take for
fields, and the values put in (problems, solutions) may themselves contain
text like ``{solution}``. ``fill`` replaces only the named fields, in one pass
over the template, so neither needs escaping.
"""

from __future__ import annotations

import re


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` for a given name replaced by its value."""
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(name) for name in values) + r")\}")
    return pattern.sub(lambda match: values[match.group(1)], template)


def require_fields(template: str, *names: str, what: str = "the template") -> None:
    """Raise ``ValueError`` naming the first ``{name}`` missing from ``template``."""
    for name in names:
        if "{" + name + "}" not in template:
            raise ValueError(f"{what} must contain {{{name}}}")
