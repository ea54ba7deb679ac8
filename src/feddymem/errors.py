"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class FedDyMemError(Exception):
    """A problem with the user's input (config, data, checkpoint) rather than a bug."""


class ConfigError(FedDyMemError):
    """A config key or value is invalid."""


class DataError(FedDyMemError):
    """An image folder, file or partition is unusable."""


class CheckpointError(FedDyMemError):
    """A checkpoint is missing, truncated or unsafe."""
