"""Pruning inside the Hugging Face Trainer, run for real on a tiny Llama: PruneTrainer adds
the penalty to training steps only (eval_loss is the task's), removes structures while it
trains, writes its own checkpoints (safetensors) with the pruned shapes, and a fresh
Trainer on a freshly prepared model resumes from one on the uninterrupted run's losses."""

import warnings

import pytest
import torch

import fxprune
from readme_blocks import run_block

transformers = pytest.importorskip("transformers")
from fxprune.integrations.hf import PruneTrainer  # noqa: E402

STEPS = 24
#: 24 steps are too few to land on the budget: the decision says so, and the tests check what it reaches
pytestmark = pytest.mark.filterwarnings("ignore:the decision at step")


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": i, "labels": i} for i in ids]


def gated_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.prepare(transformers.LlamaForCausalLM(cfg), (), fxprune.PruneConfig(total_steps=STEPS),
                               kwargs={"input_ids": ids, "labels": ids})


def trainer(tmp_path, model, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_steps=16, save_strategy="steps", report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, **kw)
    return PruneTrainer(model=model, args=args, train_dataset=data(64, 1), eval_dataset=data(8, 2))


def losses(t):
    return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}


def test_the_trainer_prunes_while_it_trains_and_reports_the_task_loss_in_evaluation(tmp_path):
    gated = gated_llama()
    t = trainer(tmp_path, gated)
    t.train()
    pruner = t.prune.pruner
    assert pruner.steps == STEPS and pruner.removals, "the budget is reached by removing structures"
    assert pruner.live_flops < 0.8 * pruner.dense_flops
    metrics = t.evaluate()
    gated.eval()
    with torch.no_grad():
        task = torch.stack([gated(input_ids=b["input_ids"][None], labels=b["labels"][None]).loss for b in data(8, 2)])
    assert metrics["eval_loss"] == pytest.approx(float(task.mean()), rel=1e-4)


def test_a_fresh_trainer_resumes_from_the_trainers_own_checkpoint(tmp_path):
    whole = trainer(tmp_path / "a", gated_llama())
    whole.train()
    ckpt = tmp_path / "a" / "checkpoint-16"
    assert (ckpt / "model.safetensors").exists()
    assert whole.prune.pruner.removals and whole.prune.pruner.removals[0].step <= 16
    again = trainer(tmp_path / "b", gated_llama())
    again.train(resume_from_checkpoint=str(ckpt))
    assert again.prune.pruner.steps == STEPS
    assert again.prune.pruner.live_flops == whole.prune.pruner.live_flops < whole.prune.pruner.dense_flops
    assert [r.keep for r in again.prune.pruner.removals] == [r.keep for r in whole.prune.pruner.removals]
    a, b = losses(whole), losses(again)
    assert [b[s] for s in range(17, STEPS + 1)] == pytest.approx([a[s] for s in range(17, STEPS + 1)], rel=1e-3)


def test_the_readme_trainer_block_runs_as_written(tmp_path):
    loss, flops = map(float, run_block("### In the Hugging Face Trainer", tmp_path).split()[-2:])
    assert loss > 0 and flops < 0.8
