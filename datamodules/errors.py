"""The errors a user can fix, each raised with one sentence naming the file or key and what was expected.

experiments.run prints these as that one sentence without a traceback; anything else is a bug and keeps its
traceback.
"""


class DatasetLayoutError(RuntimeError):
    """A dataset root, file or label that does not match the expected layout."""


class ConfigError(ValueError):
    """A config key whose value the code cannot use (wrong type, unknown choice, inconsistent settings)."""


class CheckpointError(RuntimeError):
    """A checkpoint or weight file that is missing, unreadable, corrupt, or written for another network."""


def require_choice(key: str, value, choices: tuple) -> None:
    """Refuse a config value outside its fixed set of choices, naming the key and the choices."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; expected one of {choices}")
