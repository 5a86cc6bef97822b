"""Recording training runs: the Recorder, its layer rules, background writer and probe."""

from trajlab.record.probe import FullGradientProbe
from trajlab.record.recorder import Recorder, RecorderError, SelfCheckError

__all__ = ["FullGradientProbe", "Recorder", "RecorderError", "SelfCheckError"]
