"""The one exception type users see: what is wrong and how to fix it, in one line. The CLI exits 2 on it."""


class UsageError(ValueError):
    """Bad input: a model, option, recipe or path the tool cannot use. The message names the fix."""
