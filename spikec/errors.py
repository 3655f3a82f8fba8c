"""The one exception type users see: a single line naming the culprit."""


class SpikecError(Exception):
    """A user-facing failure. Its message is one line and names the file, node, input or argument at fault."""
