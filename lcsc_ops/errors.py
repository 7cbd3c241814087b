"""The one exception the CLI turns into a one-line message and a non-zero exit."""


class LcscError(Exception):
    """A problem with the user's input or stored state, explained in one line.

    Raised for unknown runs, missing checkpoints, bad specs, hash mismatches and the
    like. The CLI prints ``error: <message>`` and exits with status 1; anything else
    that escapes is a bug and keeps its traceback.
    """
