"""The one error type users can cause: a bad config value, flag, prompt, checkpoint or data path.

CLIs print its message on one line and exit non-zero (spark/cli.py: main_guard)."""


class ConfigError(ValueError):
    """A bad user-supplied value. The message says which field or flag and why."""
