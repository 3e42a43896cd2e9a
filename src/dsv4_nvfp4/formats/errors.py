"""The one error type of the formats package."""


class FormatError(ValueError):
    """A tensor has the wrong shape, dtype or content for the format asked for.

    Messages name the argument, what was expected and what was found, so the
    CLI can print them as one line without a stack trace.
    """


def expect(cond: bool, name: str, expected: str, found: object) -> None:
    """Raise :class:`FormatError` ``"<name>: expected <expected>, found <found>"`` unless cond."""
    if not cond:
        raise FormatError(f"{name}: expected {expected}, found {found}")
