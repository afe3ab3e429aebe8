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


class OptionError(ProtoscopeError, ValueError):
    """A setting or command-line option has a bad value (names the option, the value and the valid range)."""


class ZSpecError(OptionError):
    """A slice selection (``--z 0:40``, ``all``, ``5,7,9``) cannot be parsed or lies outside the stack."""


class ThresholdError(OptionError):
    """A threshold specification (``top:10``, ``score:0.3``, ``otsu``, ``calibrated``) is invalid."""


class PrototypeFileError(PrototypeError):
    """A prototype ``.npz`` file is unreadable, pickled, or has missing or ill-typed contents."""


class RefineError(ProtoscopeError):
    """U-Net refinement cannot run with these inputs or settings."""


class ModelFileError(RefineError):
    """A refinement model file (safetensors) is unreadable or its metadata is missing or ill-typed."""


class OutputError(StackError):
    """An output path cannot be used: it exists, it is an input of the same command, or it is not writable."""


class WorkspaceError(ProtoscopeError):
    """A workspace cannot be read, saved or imported (names the file or archive member and what to do)."""


class WorkspaceConflict(WorkspaceError):
    """Another session holds the workspace, or saved it since this session loaded it.

    lease : the other owner's Lease when a live lease is the reason, else None.
    """

    def __init__(self, message: str, lease: "object | None" = None) -> None:
        super().__init__(message)
        self.lease = lease


class ClusterError(ProtoscopeError):
    """The Dask scheduler cannot be reached, or workers died running a block again and again."""
