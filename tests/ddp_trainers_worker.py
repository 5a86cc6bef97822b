"""One process of tests/integrations/test_integrations_ddp.py's trainer tests, started by torchrun with 2
processes: the Hugging Face Trainer (GPT-2 2x32, accumulation 2, clipping) or Lightning
(digits MLP, strategy="ddp", accumulation 2, clipping), each with its RecorderCallback. Rank 0
saves the weight of one layer before every optimizer step (its own step hook) to SNAPSHOTS.

Usage: torchrun --nproc-per-node 2 ddp_trainers_worker.py hf|lightning STORE SNAPSHOTS"""

from __future__ import annotations

import faulthandler
import sys
import warnings

import torch

faulthandler.enable()  # a native abort (SIGABRT) prints every thread's Python stack

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def spy(optimizer, weight, out):
    seen = []

    def pre(o, args, kwargs):
        seen.append(weight.detach().clone())

    optimizer.register_step_pre_hook(pre)
    return seen


def hf(store, snapshots):
    import torch.distributed as dist
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)

    from trajlab.integrations.hf import RecorderCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            inner = getattr(optimizer, "optimizer", optimizer)
            seen.append(spy(inner, model.transformer.h[0].mlp.c_fc.weight, snapshots))

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=f"{store}.out", per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=2,
                             max_grad_norm=0.5, max_steps=4, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
    Trainer(model=model, args=args, train_dataset=Tokens(),
            callbacks=[RecorderCallback(store), Spy()]).train()
    if dist.get_rank() == 0:
        torch.save([w.T.clone() for w in seen[0]], snapshots)  # Conv1D: (in, out) -> (out, in)


def lightning(store, snapshots):
    import lightning as L
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trajlab.data.digits import load_digits
    from trajlab.integrations.lightning import RecorderCallback

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    seen = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            seen.append(spy(trainer.optimizers[0], module.net[0].weight, snapshots))

    L.seed_everything(0, verbose=False)
    X, Y = load_digits(flatten=True, split="train")
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5,
                        strategy="ddp", accelerator="cpu", devices=2,
                        callbacks=[RecorderCallback(store, loss_fn=F.cross_entropy), Spy()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(MLP(), DataLoader(TensorDataset(X[:256], Y[:256]), batch_size=16, shuffle=True))
    if trainer.global_rank == 0:
        torch.save(seen[0], snapshots)


if __name__ == "__main__":
    {"hf": hf, "lightning": lightning}[sys.argv[1]](sys.argv[2], sys.argv[3])
