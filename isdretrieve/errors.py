"""The exceptions a user can cause; the CLI turns them into one clear line and a non-zero exit."""

import signal


class IsdError(Exception):
    """Base class for every error caused by user input (bad path, bad recipe, bad checkpoint, ...)."""


class DataError(IsdError):
    """A data SPEC, data root or image file is unusable."""


class CheckpointError(IsdError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class RecipeError(IsdError):
    """A training recipe has an unknown key, a wrong type or an invalid value."""


class TrainingDiverged(IsdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class BankError(IsdError):
    """A feature bank is missing, incomplete, corrupt or does not match."""


class DamagedFile(BankError):
    """A file of a finished index (or a build's saved progress) is not what was written: truncated,
    grown, replaced or unreadable. It is refused before it is memory-mapped; the service answers 503."""


class EmbeddingsError(BankError, ValueError):
    """An embeddings file or array is unreadable, of the wrong shape, or holds NaN / zero rows."""


class NotAnImage(DataError):
    """Uploaded bytes are not an image in one of the accepted formats, or are corrupt."""


class ImageTooLarge(DataError):
    """An uploaded image over the byte or pixel cap."""


class QueryError(IsdError):
    """A neighbour query names no bank row, or asks for an impossible number of neighbours."""


class BindError(IsdError):
    """The service would listen beyond loopback without a token, or with a guessable one."""


class InvalidArgument(IsdError, ValueError):
    """An argument of a library call is outside what it accepts (a batch size of 0, an unknown choice)."""


class MissingExtra(IsdError):
    """A feature needs an optional dependency (an extra such as ``isdretrieve[timm]``) not installed."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, checkpoint: object) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: checkpoint saved to {checkpoint}; continue with --resume")
