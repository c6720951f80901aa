"""The one exception type the CLI turns into a single-line message and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown language, unsupported model); never a bug."""
