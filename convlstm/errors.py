"""User-facing errors: every one of them ends a command with one clear line and exit status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad shape, missing file), not a library bug."""


class ConfigError(UserError, ValueError):
    """An unknown config key, a value of the wrong type, or values that conflict."""


class DataError(UserError, ValueError):
    """Missing, unreadable or malformed data."""


class ShapeError(UserError, ValueError):
    """A tensor of the wrong rank or size for the model it is given to."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, or not one of ours."""
