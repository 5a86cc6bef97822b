"""DistributedDataParallel support: the Recorder handles a DDP-wrapped model itself (rank 0
writes, every rank's samples join in rank order; docs/integrations.md). The implementation lives
in :mod:`trajlab.record.ddp`, beside the Recorder that uses it; this module keeps the path."""

from trajlab.record.ddp import Dist, attach, broadcast, current, detect, gather, merge, payload

__all__ = ["Dist", "attach", "broadcast", "current", "detect", "gather", "merge", "payload"]
