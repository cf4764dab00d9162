"""The exceptions a user can cause; the CLI turns them into one clear line and a non-zero exit."""


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
