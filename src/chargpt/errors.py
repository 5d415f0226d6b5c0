"""Errors a user can act on.

Every problem caused by input (a file, a flag, a checkpoint, a prompt) is raised as a
`ChargptError` whose message is one self-contained line; the CLI prints it as
`chargpt: error: <message>` and exits non-zero instead of showing a traceback. `warn` is the
one way to tell the user that chargpt went on differently from what was asked, and `report`
the one line for an error where no exception can reach the CLI (a watchdog thread).
"""

from chargpt.progress import write_line


class ChargptError(Exception):
    """An error caused by user input; its message is shown to the user as one line."""


class ConfigError(ChargptError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(ChargptError):
    """A corpus or prepared-data directory that cannot be used."""


class VocabError(ChargptError):
    """Text that contains characters the vocabulary does not have."""


class CheckpointError(ChargptError):
    """A run directory or checkpoint that is missing, corrupted or foreign."""


class TrainingError(ChargptError):
    """Training cannot go on (for example the loss became NaN, or the disk is full)."""


def warn(message: str) -> None:
    """Tell the user, in one line on stderr, about something chargpt did instead of what was
    asked (a damaged checkpoint passed over, a plot not drawn); the command goes on. A progress
    bar being drawn is moved out of the line's way."""
    write_line(f"chargpt: warning: {message}")


def report(error: ChargptError) -> None:
    """The line the CLI prints for `error`, for code that must end the process itself."""
    write_line(f"chargpt: error: {error}")
