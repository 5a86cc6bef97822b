"""The recorder under ``torch.nn.parallel.DistributedDataParallel`` (any backend).

Every rank builds ``trajlab.Recorder(ddp_model, store, optimizer=opt, ...)`` the same way. The
recorder attaches to the wrapped module (layer names without DDP's ``module.`` prefix, as in a
one-process run of the same model), and each rank captures its own samples' per-sample
information in its own backward pass. At each recorded ``optimizer.step()`` (a collective
point: every rank calls it), the ranks send what they captured to rank 0
(``torch.distributed.gather_object``), which joins it in rank order as one batch, checks it
against ``.grad`` (DDP's all-reduced mean, the same on every rank) and is the only rank that
writes: it owns the store, its lock, the weights, the step rows and the commits. Its verdict
(recorded, stopped with a reason, or an error) is broadcast, so every rank raises the same
error or stops recording at the same step. Training is untouched: nothing is broadcast into
the model.

Per-sample gradients are those of the global batch: with equal per-rank batches, sample i's
recorded gradient is its own loss's gradient (DDP averages the ranks' mean gradients, which
is the mean over all samples). With unequal per-rank batches DDP's ``.grad`` weights rank r's
samples by ``1 / (R B_r)``; the joined per-sample information is scaled by
``sum(B) / (R B_r)`` per rank so that its mean is still the ``.grad`` the optimizer applied.

The Recorder's two DDP paths are here: :func:`enter` (rank 0 opens the store, every rank learns
the first step or the error) and :func:`before_step` (each recorded step's exchange and
verdict); the rest are the collectives they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError
from trajlab.record import optimizer_hooks
from trajlab.record.step import Capture, Micro

if TYPE_CHECKING:
    from trajlab.record.recorder import Recorder


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group the DDP module reduces over."""

    rank: int
    world: int
    group: Any = None

    @property
    def writes(self) -> bool:
        return self.rank == 0


def detect(model: nn.Module) -> tuple[nn.Module, Dist | None]:
    """``(module to record, Dist)`` for a DistributedDataParallel model; ``(model, None)``
    otherwise (trajlab does not import torch.distributed's DDP for plain models)."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    if ddp is None or not isinstance(model, ddp):
        return model, None
    import torch.distributed as dist

    group = getattr(model, "process_group", None)
    return model.module, Dist(dist.get_rank(group), dist.get_world_size(group), group)


def current() -> Dist | None:
    """The default process group as a Dist when torch.distributed runs several processes
    (for trainers whose callbacks see the unwrapped module: the Hugging Face Trainer and
    Lightning under DDP), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Dist(dist.get_rank(), dist.get_world_size())


def attach(recorder: Any, d: Dist | None) -> None:
    """Make a Recorder built on the unwrapped module record as the ranks of ``d`` (call before
    entering it)."""
    if d is not None:
        recorder._dist = d


def _cpu(t: Any) -> Any:
    return t.detach().cpu() if isinstance(t, Tensor) else t


def payload(layers: list[Any], micros: list[Micro], stopped: str | None) -> dict[str, Any]:
    """What a rank sends at a recorded step: each layer's captures (on the CPU), its
    micro-batches' loss, indices and sizes, and whether it stopped recording."""
    return {
        "stopped": stopped,
        "layers": {layer.name: [(c.micro, c.batch, {k: _cpu(v) for k, v in c.tensors.items()},
                                 _cpu(c.per_sample), c.eps, c.forwards_seen)
                                for c in layer.captures]
                   if layer.failed is None else repr(layer.failed) for layer in layers},
        "micros": [(_cpu(m.indices), m.loss, m.batch) for m in micros],
    }


def gather(obj: Any, d: Dist) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
    import torch.distributed as dist

    out = [None] * d.world if d.rank == 0 else None
    dst = 0 if d.group is None else dist.get_global_rank(d.group, 0)
    dist.gather_object(obj, out, dst=dst, group=d.group)
    return out


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    src = 0 if d.group is None else dist.get_global_rank(d.group, 0)
    dist.broadcast_object_list(box, src=src, group=d.group)
    return box[0]


def merge(layers: list[Any], micros: list[Micro], gathered: list[dict[str, Any]]) -> str | None:
    """Join every rank's captures into rank 0's layers and micro-batches, in rank order (rank
    0's own entries are ``layers`` and ``micros``, replaced in place). Returns the first
    rank's reason to stop, if any rank stopped."""
    for r, g in enumerate(gathered):
        if g["stopped"]:
            return f"rank {r}: {g['stopped']}"
    n_micro = {len(g["micros"]) for g in gathered}
    for layer in layers:
        got = [g["layers"].get(layer.name, "not captured on this rank") for g in gathered]
        failed = next((c for c in got if isinstance(c, str)), None)
        if failed is not None:
            if layer.failed is None:
                layer.failed = RuntimeError(f"on another rank: {failed}")
            continue
        device = layer.target.param.device
        per_rank = [{c[0]: c for c in caps} for caps in got]
        keys = sorted(per_rank[0])
        if any(sorted(p) != keys for p in per_rank):
            layer.failed = RuntimeError("the ranks ran different numbers of forward passes "
                                        "through this layer in one step")
            continue
        joined = []
        for k in keys:
            parts = [p[k] for p in per_rank]
            sizes = [c[1] for c in parts]
            total = sum(sizes)
            # DDP's .grad = (1/R) sum_r mean_r: rank r's samples weigh 1 / (R B_r)
            factors = [total / (len(parts) * b) for b in sizes]
            tensors = [c[2] if f == 1.0 else layer.kind.rescale(c[2], f)
                       for c, f in zip(parts, factors)]
            joined_t = {key: v.to(device) if isinstance(v, Tensor) else v
                        for key, v in layer.kind.concat(tensors).items()}
            dense = None
            if all(c[3] is not None for c in parts):
                dense = torch.cat([c[3] * f for c, f in zip(parts, factors)]).to(device)
            joined.append(Capture(k, total, joined_t, dense, max(c[4] for c in parts),
                                  max(c[5] for c in parts)))
        layer.captures = joined
    if len(n_micro) == 1:
        for k, m in enumerate(micros):
            rows = [g["micros"][k] for g in gathered]
            idx = [r[0] for r in rows]
            m.indices = torch.cat(idx) if all(i is not None for i in idx) else None
            losses = [r[1] for r in rows]
            m.loss = sum(losses) / len(losses) if all(v is not None for v in losses) else None
            sizes = [r[2] for r in rows]
            m.batch = sum(sizes) if all(s is not None for s in sizes) else None
    return None


# ----------------------------------------------------------------------------- the Recorder
def enter(rec: Recorder) -> Recorder:
    """DDP: rank 0 opens the store (lock, resume) and tells every rank the next step's
    index, or why it could not start, so that all ranks start or fail together."""
    d = rec._dist
    if d.writes:
        try:
            rec._enter()
        except BaseException as e:
            broadcast(("error", f"{type(e).__name__}: {e}"), d)
            raise
        broadcast(("ok", rec._step), d)
        return rec
    what, value = broadcast(None, d)
    if what == "error":
        raise RecorderError(f"trajlab: rank 0 could not start recording: {value}")
    rec._step = int(value)
    rec._step_handles.extend(optimizer_hooks.hook(
        rec.optimizer, before=rec._before_step, after=rec._after_step))
    rec._active = True
    if rec.recording:
        rec._arm()
    return rec


def before_step(rec: Recorder) -> None:
    """DDP, at a recorded step (every rank): the captures go to rank 0, which joins them
    (rank order), assembles and checks the step as one batch; its verdict reaches every
    rank, so all record, stop or raise together (trajlab.record.ddp)."""
    d = rec._dist
    if (not rec._active or rec._suspended or rec._ddp_stopped
            or rec._step % rec.every != 0):
        return
    if rec._resume_check is not None:
        rec._check_continuity()
    gathered = gather(payload(rec._layers, rec._micro, rec._stopped_reason), d)
    verdict, error = None, None
    if d.writes:
        try:
            if rec.options.per_sample and rec._n_recorded == 0 and rec._run_meta is None:
                rec._drop_broadcast()  # on this rank's own batch sizes, before joining
            stopped = merge(rec._layers, rec._micro, gathered)
            if stopped is not None and rec._stopped_reason is None:
                rec._stop(RecorderError(f"recording stopped on {stopped}"), where="step")
            rec._before_step_local()
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            verdict = ("SelfCheckError" if isinstance(e, SelfCheckError) else
                       "RecorderError", f"{type(e).__name__}: {e}")
        if verdict is None and rec._stopped_reason is not None:
            verdict = ("stop", rec._stopped_reason)
    verdict, kept = broadcast((verdict, rec.layer_names if d.writes else None), d)
    if verdict is not None and verdict[0] == "stop":
        rec._ddp_stopped = True
    if d.writes:
        if error is not None:
            raise error
        return
    if kept != rec.layer_names:  # rank 0 left layers out (broadcast over the batch)
        for layer in rec._layers:
            layer.dropped = layer.name not in kept
        rec._layers = [layer for layer in rec._layers if not layer.dropped]
    rec._reset_step()  # this rank's captures are on rank 0 now
    if verdict is None:
        return
    kind, msg = verdict
    if kind == "stop":
        rec._stopped_reason = f"rank 0 stopped recording: {msg}"
        rec._remove(rec._layer_handles)
        return
    cls = SelfCheckError if kind == "SelfCheckError" else RecorderError
    raise cls(f"trajlab (rank 0): {msg}")
