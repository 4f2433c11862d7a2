"""How a one-line message quotes a library's error: the libraries under the project (gcsfs,
orbax, tensorstore, TFDS, torch) raise messages that run to pages (specs, remote tracebacks), and
some raise none at all."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name where the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def described(error: BaseException) -> str:
    """'TypeName: first line of the message', or the type's name alone where the message is empty."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
