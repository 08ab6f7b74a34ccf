"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class CompressorError(Exception):
    """A problem with the user's input or request (bad file, bad option, unsupported graph)."""


class VerificationError(CompressorError):
    """The compressed model does not compute what it should; nothing is written."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
