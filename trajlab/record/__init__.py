"""Recording training runs: the Recorder, its layer rules, background writer and probe."""

from trajlab.errors import RecorderError, SelfCheckError
from trajlab.record.options import RecorderOptions
from trajlab.record.probe import FullGradientProbe
from trajlab.record.recorder import Recorder

__all__ = ["FullGradientProbe", "Recorder", "RecorderError", "RecorderOptions", "SelfCheckError"]
