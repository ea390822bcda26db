"""Errors that the CLI and the pytest plugin turn into one line.

Every error carries where it happened (a suite's file:line, a port and the last bytes seen on a
link, a model path) so that the one-line form is enough to act on; `details` holds what goes to
the log only.
"""

from __future__ import annotations


class TinyhilError(Exception):
    """Base of every error the harness raises on purpose."""

    def __init__(self, message: str, *, where: str = "", details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.details = details

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"{self.where}: {text}" if self.where else text

    def __str__(self) -> str:
        return self.one_line()


class SuiteError(TinyhilError):
    """A suite file is missing, malformed, or names something that does not exist."""


class DatasetError(TinyhilError):
    """A data set cannot be made or read."""


class TrainingError(TinyhilError):
    """Training a model from the zoo failed."""


class ConversionError(TinyhilError):
    """Converting or quantizing a model to .tflite failed (including a converter crash)."""


class UnsupportedOpError(TinyhilError):
    """A model uses an operator the target runtime does not have."""


class ModelTooLargeError(TinyhilError):
    """A model or its tensor arena does not fit the board's memory."""


class BoardError(TinyhilError):
    """A board could not be opened, flashed or started, or it reported a failure."""


class PortUnavailableError(BoardError):
    """The board's port does not exist or cannot be opened: every case on that board fails alike."""


class PortIdentityError(PortUnavailableError):
    """The port is not an ESP32-S3 by its USB identity, and the user did not ask to use it anyway."""


class LinkError(BoardError):
    """The serial link broke: timeout, corrupt frame, unexpected answer."""


class LinkTimeoutError(LinkError):
    """A deadline passed with no complete answer: the board is silent, hung, or gone."""


class ProtocolError(LinkError):
    """Bytes on the link do not follow the wire protocol."""


class ThresholdError(TinyhilError):
    """A measured metric is past a suite's threshold."""


class ResultsError(TinyhilError):
    """A results file (a run's, or a baseline) is missing, unreadable or not tinyhil's."""


class CalibrationError(TinyhilError):
    """A cost-model calibration cannot be made from the runs given, or a calibration file is unreadable."""
