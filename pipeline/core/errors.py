"""Errors that the CLI turns into a one-line message and exit code 2."""


class PipelineError(Exception):
    """A problem with the user's input or run folder, reported without a traceback."""


class ConfigError(PipelineError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(PipelineError):
    """The data folder does not follow the expected layout."""


class CacheError(PipelineError):
    """A stage's upstream output is missing or stale."""


class TrainingError(PipelineError):
    """A training that cannot go on, such as a loss that is no longer a finite number."""
