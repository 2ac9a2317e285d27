"""The pipeline's error hierarchy: every error a user can cause names the thing and says what to do."""


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose; its message is one line meant for the user."""


class InvalidReference(PipelineError):
    """An image reference does not follow Docker's reference grammar."""


class StorageError(PipelineError):
    """The container storage is missing, malformed or points outside its root."""


class ContainerNotFound(StorageError):
    """No container, or more than one, matches the id the user gave."""


class LayerError(PipelineError):
    """A layer directory holds something that cannot be packed faithfully."""


class SourceChanged(LayerError):
    """A file changed while it was being packed, so the bytes written would not match what was hashed."""


class OutputError(PipelineError):
    """An output or cache path cannot be written."""


class InvalidChange(PipelineError):
    """A --change instruction is not one docker commit accepts, or is malformed."""


class RegistryError(PipelineError):
    """A registry refused a push or a check, or could not be reached."""


class FreezerError(PipelineError):
    """A container's cgroup cannot be frozen or thawed, or a freeze marker cannot be read."""
