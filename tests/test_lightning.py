"""Pruning inside Lightning, run for real: PruneCallback builds the Pruner at fit start,
steps it after every optimizer step, removes structures while the module trains, and a
fresh module (freshly prepared) resumes from Lightning's own checkpoint with the pruned
shapes, the Pruner's state and the uninterrupted run's losses."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.digits.models import resnet
from readme_blocks import run_block

L = pytest.importorskip("lightning.pytorch")
from fxprune.integrations.lightning import PruneCallback  # noqa: E402

STEPS = 24
CONFIG = fxprune.PruneConfig("both", gamma=200.0, theta_lr=2.0, warmup=0, check_every=2, patience=1, w_tol=1e3)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = fxprune.prepare(resnet(blocks=2, widths=(8, 12)), torch.randn(4, 1, 8, 8), CONFIG)
        self.losses = []

    def training_step(self, batch, i):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y) + self.pruner.penalty()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(1)
    n = 16 * STEPS // 2  # two epochs: the checkpoint at the first one's end, where Lightning resumes its data
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=16)


def trainer(tmp_path, steps, **kw):
    return L.Trainer(max_steps=steps, callbacks=[PruneCallback()], accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                     enable_checkpointing=False, **kw)


class AtResume(L.Callback):
    """What the resumed run holds when its first batch starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "model"):
            self.model = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # its tensors move on in place
            self.pruner = pl_module.pruner.state_dict()


def test_lightning_prunes_while_it_trains_and_resumes_from_its_own_checkpoint(tmp_path):
    whole = Module()
    trainer(tmp_path / "a", STEPS).fit(whole, loader())
    assert whole.pruner.steps == STEPS and whole.pruner.removals

    first = Module()
    t = trainer(tmp_path / "b", 12)
    t.fit(first, loader())
    assert first.pruner.removals, "structures are removed before the checkpoint"
    t.save_checkpoint(tmp_path / "half.ckpt")
    rng = torch.get_rng_state()  # the masks' generator, which Lightning's checkpoint does not hold

    again, seen = Module(), AtResume()  # freshly prepared: dense shapes
    torch.set_rng_state(rng)
    resumed = trainer(tmp_path / "c", STEPS)
    resumed.callbacks.append(seen)
    resumed.fit(again, loader(), ckpt_path=str(tmp_path / "half.ckpt"))
    # at the resume: the pruned model, the optimizer's state and the Pruner's state, all as they were
    saved = first.model.state_dict()
    assert seen.model.keys() == saved.keys() and all(torch.equal(seen.model[k], saved[k]) for k in saved)
    state, want = seen.optimizer["state"], t.optimizers[0].state_dict()["state"]
    assert all(torch.equal(state[i][k], want[i][k]) for i in want for k in want[i])
    assert seen.pruner == first.pruner.state_dict()
    # the first resumed step is the uninterrupted run's (Lightning then starts its data epoch again after a
    # checkpoint written at max_steps, so later batches differ), and training goes on through removals
    assert again.losses[0] == pytest.approx(whole.losses[12], rel=1e-6)
    assert again.pruner.steps == STEPS and len(again.pruner.removals) > len(first.pruner.removals)
    assert all(torch.isfinite(torch.tensor(again.losses)))


def test_the_readme_lightning_block_runs_as_written(tmp_path):
    steps, flops = run_block("### In Lightning", tmp_path).split()[-2:]
    assert int(steps) == 40 and float(flops) < 0.8
