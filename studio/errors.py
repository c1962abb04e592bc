"""User-facing errors: one clear message naming the input and the fix (CLI exit code 2, no traceback)."""


class UserError(ValueError):
    """Bad input from a user (file, prompt, option). Its message names the input and the fix."""
