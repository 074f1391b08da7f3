"""Every error a user can cause, under one base: the command line prints its message as one line, exit code 2.

Each message is the whole story: what was wrong and what to do. The CLI catches `QloraLiteError`
alone (no traceback); anything else that escapes is a bug and keeps its traceback. The classes
keep the builtin base they had (ValueError, RuntimeError), so code that caught those still does.
They live here, not beside the code that raises them, because several modules raise each one and
this is the page that lists what can go wrong.
"""

from __future__ import annotations


class QloraLiteError(Exception):
    """An error the user can act on; the message names the cause and the fix.

    `quiet` is set on the processes other than rank 0 of a distributed run when rank 0 prints
    the same line (training/distributed.one_error_for_all): each process exits with the code,
    the user reads the line once.
    """

    exit_code = 2
    quiet = False

    def format_line(self, rank: int = 0) -> str:
        """The one line the user reads: `error: <message>` (a stopped run's message alone), with `rank N: ` before it off rank 0."""
        where = f"rank {rank}: " if rank else ""
        return f"{where}error: {self}" if self.exit_code == 2 else f"{where}{self}"


# --- the recipe and the data ------------------------------------------------------------------


class ConfigError(QloraLiteError, ValueError):
    """A recipe or override the user wrote is invalid; the message says how to fix it."""


class TrackingError(ConfigError):
    """A tracker of train.report_to is not installed or cannot start; the message names the fix."""


class LossError(ConfigError):
    """`train.loss: chunked` cannot compute this model's loss; the message says why and to use `train.loss: hf`.

    A ConfigError: the fix is a setting.
    """


class DataError(QloraLiteError, ValueError):
    """A data file, record or split the user supplied is unusable; the message says which and how to fix it."""


# --- models, methods and adapter folders --------------------------------------------------------


class ModelLoadError(QloraLiteError, RuntimeError):
    """The base model could not be loaded; the message names the cause and the fix."""


class ShardError(QloraLiteError, ValueError):
    """A safetensors file is corrupt or uses a dtype this reader does not know."""


class MethodError(QloraLiteError, ValueError):
    """A method cannot be applied or loaded as asked; the message says why and what to do."""


class LoRAError(QloraLiteError, ValueError):
    """A LoRA setting the user chose cannot be applied to this model; the message says why and what to do."""


class AdapterError(QloraLiteError, ValueError):
    """An adapter folder is missing, corrupt, or made for another base; the message says which and what to do."""


class PromptTuningError(AdapterError):
    """A soft prompt cannot be built, read or used as asked; the message says why and what to do."""


class SelectiveError(AdapterError):
    """A selective pattern or folder cannot be applied to this model; the message says why and what to do."""


class BottleneckError(AdapterError):
    """Bottleneck adapters cannot be placed in or loaded into this model; the message says why and what to do."""


# --- planning, training, watching ---------------------------------------------------------------


class PlanError(QloraLiteError, ValueError):
    """The planner cannot read the model's config; the message says what to pass instead."""


class DistributedError(QloraLiteError, RuntimeError):
    """A launch or a recipe that cannot run on several processes; the message names the cause and the fix."""


class TrainingError(QloraLiteError, RuntimeError):
    """A run stopped for a reason the user can act on; the message says what was kept and what to do."""


class TrainingStopped(TrainingError):
    """The run was asked to stop (SIGINT, SIGTERM); exit code 128 + the signal number, as shells report it.

    Not a failure: the CLI prints its message without "error:".
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class PlotError(QloraLiteError, ValueError):
    """`qlora-lite plot` cannot draw: no such run folder, no metrics.jsonl, no matplotlib."""


# --- serving and export -------------------------------------------------------------------------


class GenerationError(QloraLiteError, ValueError):
    """A generation request cannot be served as asked; the message says why and what to do."""


class ExportError(QloraLiteError, ValueError):
    """The merge cannot be done as asked; the message says why and what to do."""


class GGUFError(QloraLiteError, ValueError):
    """The GGUF export, or a GGUF as the base, cannot be done as asked; the message says why and what to do."""
