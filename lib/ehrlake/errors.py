"""The project's exceptions. Bad *records* never raise: they go to quarantine. These are for bad
configuration, unusable environments and refused operations, each with one clear sentence."""


class EhrlakeError(Exception):
    """Base class: the CLI prints ``str(error)`` as its one-line failure message."""


class ConfigError(EhrlakeError):
    """A configuration file or argument is invalid; the message names the bad key."""


class EnvironmentProblem(EhrlakeError):
    """The machine cannot run the job (no Java runtime, unreadable lake, missing input)."""


class TableNotFound(EhrlakeError):
    """A logical table name has no Delta table under the lake root."""


class CommitConflict(EhrlakeError):
    """Another writer committed a conflicting change first; nothing of this write was committed."""


class SchemaMismatch(EhrlakeError):
    """A write's schema does not match the table and schema evolution was not requested."""


class KeyAccessError(EhrlakeError):
    """An encryption key is missing or wrong for the table it is needed for."""


class AccessDenied(EhrlakeError):
    """The role's access policy does not allow the requested read."""


class JobRunning(EhrlakeError):
    """Another run of a job that must run alone on a lake holds it; nothing was done."""
