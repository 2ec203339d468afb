"""The one exception type users see: a one-line message naming the file and the problem."""


class PrivloraError(Exception):
    """A user-facing error. The CLI prints ``privlora: error: <message>`` and exits with status 2."""


class Interrupted(Exception):
    """Ctrl-C during training: the state was saved; the message says how to resume (the CLI exits with 130)."""
