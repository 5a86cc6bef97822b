"""``trajlab estimate``: what recording a run would cost (disk, time), before training, on one of
trajlab's models; for your own model, :func:`trajlab.estimate`."""

from __future__ import annotations

import argparse

from trajlab.cli._args import batch_size, positive_float, positive_int

MODELS = ("mlp", "digits-convnet", "cifar-convnet")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "estimate", help="bytes and time per recorded step, the whole run's disk and wall time, "
        "and the `every` that fits a disk budget (measured on a few steps; your own model: "
        "trajlab.estimate)")
    p.add_argument("--model", choices=MODELS, default="cifar-convnet",
                   help="mlp: 784-512-512-10; digits-convnet: the demo's; cifar-convnet: the "
                   "paper's five-layer ConvNet on 3x32x32 (default: %(default)s)")
    p.add_argument("--batch-size", type=batch_size, default=128)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=positive_float, default=0.01)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps of the whole run (for the projection)")
    p.add_argument("--every", type=positive_int, default=1, help="record every k-th step")
    p.add_argument("--budget", default=None,
                   help="disk budget, e.g. 50GB or 1.5TiB: prints the every that fits")
    p.add_argument("--out", default=None,
                   help="where the store would go (its free space is checked)")
    p.add_argument("--writer", choices=("thread", "process"), default="thread")
    p.add_argument("--measure-steps", type=positive_int, default=16,
                   help="recorded steps measured (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's)")
    p.set_defaults(func=run)


def build(name: str, batch: int, seed: int = 0):
    """(model, inputs, targets) of one of the built-in models on random data of its shape."""
    import torch

    from trajlab import models

    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        model, shape = models.mlp(784, (512, 512), 10, seed=seed), (784,)
    elif name == "digits-convnet":
        model, shape = models.digits_convnet(seed=seed), (1, 8, 8)
    else:
        model, shape = models.cifar_convnet(seed=seed), (3, 32, 32)
    return model, torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,),
                                                                          generator=g)


def run(args: argparse.Namespace) -> int:
    import torch

    from trajlab.cost import estimate, parse_bytes

    if args.budget is not None:
        parse_bytes(args.budget)  # a bad budget fails before any measurement
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = build(args.model, args.batch_size)
    opts = {"sgd": (torch.optim.SGD, {}), "momentum": (torch.optim.SGD, {"momentum": 0.9}),
            "adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {})}
    cls, kw = opts[args.optimizer]
    opt = cls(model.parameters(), lr=args.lr, **kw)
    print(f"measuring {args.measure_steps} plain and {args.measure_steps} recorded steps of "
          f"{args.model} (batch {args.batch_size}, {args.optimizer}, {args.writer} writer, "
          f"{torch.get_num_threads()} torch threads) ...", flush=True)
    plan = estimate(model, (x, y), optimizer=opt, steps=args.steps, every=args.every,
                    budget=args.budget, target=args.out, measure_steps=args.measure_steps,
                    writer=args.writer)
    print(plan)
    return 0
