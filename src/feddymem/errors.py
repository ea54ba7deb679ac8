"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class FedDyMemError(Exception):
    """A problem with the user's input (config, data, checkpoint) rather than a bug."""


class ConfigError(FedDyMemError):
    """A config key or value is invalid."""


class DataError(FedDyMemError):
    """An image folder, file or partition is unusable."""


def every_problem(problems: list[str], what: str, shown: int = 20) -> DataError:
    """One error that lists every problem found (the first ``shown`` of them), so that a user fixes them all
    in one go; a single problem reads as it is."""
    if len(problems) == 1:
        return DataError(problems[0])
    lines = "\n".join(problems[:shown])  # one line each: the command line prints each as an error line
    more = f"\n… and {len(problems) - shown} more" if len(problems) > shown else ""
    return DataError(f"{len(problems)} problems with {what}:\n{lines}{more}")


class CheckpointError(FedDyMemError):
    """A checkpoint is missing, truncated or unsafe."""


class OutputError(FedDyMemError):
    """An output folder or file cannot be created or written (read-only, missing, full disk)."""


class PeerFailure(FedDyMemError):
    """This process of a multi-process run stopped because another one failed, or because the server
    reported an error that its own process prints: the command line prints nothing for it, so the
    failing process's one-line error is the last thing the user sees."""
