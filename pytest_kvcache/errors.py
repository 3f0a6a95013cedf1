"""One exception family for bad user input, so the plugin can report it in one line."""


class KVConfigError(ValueError):
    """A setting, file or name the user gave that cannot be used; the message says what to fix."""
