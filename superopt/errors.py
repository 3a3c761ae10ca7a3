"""The errors superopt raises for bad input. Each message is one line naming what is wrong and where."""


class SuperoptError(Exception):
    """Base of every error caused by the user's input (the CLI prints these as one line, exit 2)."""


class IRError(SuperoptError):
    """An ill-formed graph: unknown op, wrong arity, shape or dtype mismatch, bad map."""


class SpecError(SuperoptError):
    """A program spec or graph file that cannot be read; the message starts with 'file:line:'."""


def brief(x: object) -> str:
    """A value from an untrusted file, quoted for an error message: its repr, cut to 40 characters."""
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."
