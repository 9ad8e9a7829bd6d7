"""A helper module: edits here are picked up by a reload too."""

from __future__ import annotations


def loud(text: str) -> str:
    return text.upper() + "!!"
