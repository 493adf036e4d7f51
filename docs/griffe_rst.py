"""Griffe extension for the API reference: the docstrings' reST markup, shown as Markdown.

anypool's docstrings use reST inline markup (``code``, :func:`name`, a paragraph ending
in ``::`` before an indented block); Markdown reads ``code`` already, and this turns the
roles into code spans and ``::`` into ``:`` so the indented block shows as code.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|obj|exc|py:\w+):`~?([^`]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::\n", re.M)


def markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = _LITERAL_BLOCK.sub(r"\1:\n", text)
    return re.sub(r"^::\n", "\n", text, flags=re.M)


class RstRolesToMarkdown(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
