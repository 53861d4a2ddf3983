"""jinja2 rendering of the per-format templates, with one escaping filter per target language.

Templates fail on an undefined name (StrictUndefined). XML-like templates (.wxs, .xml, .plist,
.dist) are autoescaped; NSIS and shell templates must pipe every value through `nsis` or `sh`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import jinja2

from builder.config import TEMPLATES_DIR

_XML_SUFFIXES = (".wxs.j2", ".xml.j2", ".plist.j2", ".dist.j2")


def nsis_string(value: str) -> str:
    """A value for inside an NSIS double-quoted string: `$` and `"` and newlines escaped.

    makensis expands `$%NAME%` (a build-machine environment variable) and `${NAME}` (a define)
    before it reads `$$`, so `$$%X%` would still leak the builder's environment: after `$`
    becomes `$$`, the `%` or `{` that follows is written as its `${U+..}` character define.
    """
    if "\0" in value:
        raise ValueError("NUL cannot be carried in an NSIS string")
    return (
        value.replace("$", "$$")
        .replace("$$%", "$$${U+25}")
        .replace("$${", "$$${U+7B}")
        .replace('"', '$\\"')
        .replace("\r", "$\\r")
        .replace("\n", "$\\n")
        .replace("\t", "$\\t")
    )


def sh_quote(value: str) -> str:
    """A single shell word, for POSIX sh templates."""
    if "\0" in value:
        raise ValueError("NUL cannot be carried in a shell word")
    return shlex.quote(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=lambda name: bool(name) and name.endswith(_XML_SUFFIXES),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["nsis"] = nsis_string
    env.filters["sh"] = sh_quote
    return env


_ENV = _environment()


def render(template: str, **context) -> str:
    return _ENV.get_template(template).render(**context)


def write_private(path: Path, text: str | bytes) -> Path:
    """Write a file only the current user can read (rendered sources carry the token)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path
