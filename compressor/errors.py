"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class CompressorError(Exception):
    """A problem with the user's input or request (bad file, bad option, unsupported graph)."""


class VerificationError(CompressorError):
    """The compressed model does not compute what it should; nothing is written."""
