"""Exceptions of the converter. The CLI turns them into a message and a non-zero exit code."""

from __future__ import annotations

MAX_LISTED = 40  # problems shown in one message; the rest are counted


class ConversionError(ValueError):
    """The input cannot be converted as given (bad key, shape, dtype, config, or file).

    Carries one line per problem (`problems`), so the checks of several files and fields can be
    reported together; `title` heads a multi-problem report.
    """

    def __init__(self, *problems: str, title: str = ""):
        self.problems = [str(p) for p in problems]
        self.title = title
        super().__init__(format_problems(self.problems, title))


class UnsupportedFormatError(ConversionError, NotImplementedError):
    """The input is a recognised format this converter does not implement yet."""


def format_problems(problems: list[str], title: str = "") -> str:
    """`title:` then one `  - problem` line each (a lone problem without a title is the message)."""
    if len(problems) == 1 and not title:
        return problems[0]
    shown = problems[:MAX_LISTED]
    lines = [f"{title or f'{len(problems)} problems'}:"] + [f"  - {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  (+{len(problems) - len(shown)} more)")
    return "\n".join(lines)


def raise_if_any(problems: list[str], title: str = "", error: type[ConversionError] = ConversionError):
    if problems:
        raise error(*problems, title=title)
