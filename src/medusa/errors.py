"""One exception type for mistakes a user can fix, so the CLI and server can show them without a traceback."""


class MedusaError(ValueError):
    """Bad input: the message names what is wrong and what was expected."""
