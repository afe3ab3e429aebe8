"""The exceptions Protoscope raises for problems a user can fix.

Every message names the file or the setting and says what is wrong, so that the CLI and the app
can show it as it is (no traceback).
"""


class ProtoscopeError(Exception):
    """Base class: a problem with the user's input, data or settings."""


class StackError(ProtoscopeError):
    """A stack cannot be opened, read or written (names the file and the problem)."""


class BackboneError(ProtoscopeError):
    """A feature backbone or its weights cannot be loaded."""


class PrototypeError(ProtoscopeError):
    """A prototype file is invalid or does not fit the chosen backbone or stack."""


class CacheError(ProtoscopeError):
    """The embedding cache directory cannot be used."""
