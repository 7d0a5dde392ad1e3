"""Exception hierarchy: every error a user can cause is a `RewardtuneError` with a one-line message."""


class RewardtuneError(Exception):
    """Base class for expected, user-facing failures (the CLI prints the message and exits 2)."""


class RecipeError(RewardtuneError):
    """A recipe or a `--set` override is malformed, names an unknown key, or has a wrong type or value."""


class PluginNotFoundError(RewardtuneError):
    """A backbone, reward, value, data or algorithm name resolves to nothing."""


class PluginError(RewardtuneError):
    """A plugin failed to import, or returned something that breaks the contract (shape, NaN, ...)."""


class CheckpointError(RewardtuneError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the recipe."""


class NonFiniteError(RewardtuneError):
    """A loss, reward or value became NaN or infinite during training."""


class DisagreementError(RewardtuneError):
    """The processes of a multi-process run reached different collectives, or hold different values they must share
    (some code ran a rank-dependent branch); every rank raises it instead of waiting forever."""


class Interrupted(RewardtuneError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
