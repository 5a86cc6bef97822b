"""The optimizer's side of the recorder: its step hooks, ``step(closure)``, and wrappers.

A training step is one ``optimizer.step()``. :func:`hook` registers a pre-hook (the step is
assembled just before the optimizer reads ``.grad``) and a post-hook (the step is emitted once
the update is applied); with ``step(closure)`` the forward and backward run inside ``step``,
so the pre-hook wraps the closure instead (:func:`wrap_closure`). :func:`unwrap` finds the torch
optimizer inside accelerate's and Lightning's wrappers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: ``before(optimizer, args, kwargs)`` / ``after(optimizer, args, kwargs)``
StepHook = Callable[[torch.optim.Optimizer, Any, Any], None]


def hook(optimizer: torch.optim.Optimizer, *, before: StepHook, after: StepHook) -> list[Any]:
    """Register ``before`` and ``after`` around every ``optimizer.step()``; returns the
    handles (the caller removes them)."""

    def pre_hook(opt, args, kwargs):  # plain functions (see Recorder._arm)
        # args: (optimizer, closure?) as step() was called (the optimizer first)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):  # forward and backward run inside step(closure)
            closure = wrap_closure(closure, before, optimizer)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure}
            return (args[0], closure, *args[2:]), kwargs
        before(opt, args, kwargs)
        return None

    def post_hook(opt, args, kwargs):
        after(opt, args, kwargs)

    return [optimizer.register_step_pre_hook(pre_hook),
            optimizer.register_step_post_hook(post_hook)]


def wrap_closure(closure: Callable[..., Any], before: StepHook,
                 optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """``optimizer.step(closure)`` (Lightning's automatic optimisation, LBFGS): the forward
    and backward run inside ``step``, after its pre-hook. The step is assembled when the
    closure first returns (gradient clipping inside the closure included), before the
    optimizer reads ``.grad``; later evaluations of the closure (LBFGS) are not recorded."""
    done = False

    def closure_then_assemble(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        loss = closure(*args, **kwargs)
        if not done:
            done = True
            before(optimizer, (), {})
        return loss

    return closure_then_assemble


def count_params(optimizer: torch.optim.Optimizer) -> int:
    """How many parameters the optimizer steps (cheap: one length per group)."""
    return sum(len(g["params"]) for g in optimizer.param_groups)


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper that does not run torch's step hooks itself:
    accelerate's ``AcceleratedOptimizer`` (a torch Optimizer subclass that never calls its
    ``__init__``: no ``_optimizer_step_pre_hooks``) and Lightning's ``LightningOptimizer``
    hold it as ``.optimizer`` / ``._optimizer``; their ``step()`` calls its ``step()``, so the
    hooks on it see every step they apply (and none they skip)."""
    seen = 0
    while (not hasattr(optimizer, "_optimizer_step_pre_hooks") and seen < 8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


__all__ = ["count_params", "hook", "unwrap", "wrap_closure"]
