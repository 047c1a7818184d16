"""User-facing errors: one exception type whose message is the one line the CLI prints."""


class BridgeError(Exception):
    """A problem with the user's input or environment, not a bug in bridge.

    The message must say what is wrong and what to do; the CLI prints it as one line and
    exits non-zero without a traceback.
    """
