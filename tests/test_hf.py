"""CNL inside a real ``transformers.Trainer`` and a real TRL ``SFTTrainer`` (:mod:`cnl.hf`), on a tiny model, CPU.

The central check compares the first optimizer step of a protected run with the same Trainer run without
protection, from the same weights and data: elements whose update conflicts with the reference are
bit-unchanged, every other element lands where the plain optimizer puts it, and the mask froze exactly
the elements where the (accumulated, clipped) gradient disagrees with the reference (u has the sign of
g at the first step of SGD and Adam).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import cnl  # noqa: E402
from cnl.data import rows_from_dicts  # noqa: E402
from cnl.hf import LOG_KEY, CNLCallback, protect  # noqa: E402
from cnl.optimizer import MaskedOptimizer  # noqa: E402
from cnl.scoring import PromptEncoder  # noqa: E402
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer  # noqa: E402

TOK = make_tiny_tokenizer("chatml")
ROWS = make_mc_rows(20, seed=3)


def tiny() -> torch.nn.Module:
    return make_tiny_model("llama", vocab_size=len(TOK), seed=0)


def tokenized(rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    """Chat prompt + answer letter; only the letter is labelled (SPEC's loss, as a causal-LM example)."""
    enc = PromptEncoder(TOK)
    out = []
    for e in enc.encode_all(rows_from_dicts(rows)):
        ids = list(e.input_ids) + [e.target]
        out.append({"input_ids": ids, "labels": [-100] * len(e.input_ids) + [e.target]})
    return out


TRAIN = tokenized(ROWS[:8])
MASTERED = tokenized(ROWS[8:])


def collator() -> DataCollatorForSeq2Seq:
    return DataCollatorForSeq2Seq(TOK, padding=True, label_pad_token_id=-100, return_tensors="pt")


def trainer_args(out: Path, **kw: Any) -> dict[str, Any]:
    base = {
        "output_dir": str(out),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "optim": "adamw_torch",
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return {**base, **kw}


def make_trainer(out: Path, model: torch.nn.Module, train: list[dict[str, Any]] = TRAIN, **kw: Any) -> Trainer:
    return Trainer(
        model=model,
        args=TrainingArguments(**trainer_args(out, **kw)),
        train_dataset=datasets.Dataset.from_list(train),
        data_collator=collator(),
    )


class Recorder(TrainerCallback):
    """Records, around every optimizer step, the trainable weights, their gradients and (when protected)
    the signs in use; and, at every step begin, the reference the CNL callback has just set."""

    def __init__(self, cnl_callback: CNLCallback | None = None) -> None:
        self.cnl = cnl_callback
        self.steps: list[dict[str, Any]] = []
        self.references: list[tuple[int, dict[str, torch.Tensor], torch.nn.Module]] = []
        self.logs: list[dict[str, Any]] = []

    def _trainable(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.cnl is not None:
            ref = self.cnl.optimizer.reference
            signs = {n: ref.sign(p) for n, p in self._trainable(model)}
            self.references.append((state.global_step, signs, copy.deepcopy(model)))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        rec: dict[str, Any] = {
            "before": {n: p.detach().clone() for n, p in self._trainable(model)},
            "grad": {n: p.grad.detach().clone() for n, p in self._trainable(model)},
        }
        if self.cnl is not None:
            ref = self.cnl.optimizer.reference
            rec["signs"] = {n: ref.sign(p) for n, p in self._trainable(model) if p in ref}
        self.steps.append(rec)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self._trainable(model)}
        if self.cnl is not None:
            self.steps[-1]["masked"] = self.cnl.optimizer.last_masked
            self.steps[-1]["fraction"] = self.cnl.optimizer.last_masked_fraction

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs))  # what a reporting callback (TensorBoard, W&B) placed after CNL sees


def run_pair(tmp_path: Path, build: Any, reference: Any, *, exact: bool, **protect_kw: Any) -> tuple[Recorder, Any]:
    """The first step of ``build(out)`` protected and unprotected; checks the step; returns (recorder, trainer)."""
    plain_trainer = build(tmp_path / "plain")
    plain = Recorder()
    plain_trainer.add_callback(plain)
    plain_trainer.train()

    trainer = build(tmp_path / "cnl")
    callback = protect(trainer, reference, **protect_kw)
    masked = Recorder(callback)
    trainer.add_callback(masked)
    trainer.train()
    check_first_step(masked.steps[0], plain.steps[0], exact=exact)
    return masked, trainer


def check_first_step(a: dict[str, Any], b: dict[str, Any], *, exact: bool) -> None:
    assert a["before"].keys() == b["before"].keys() == a["signs"].keys()
    frozen = by_gradient = 0
    for name, r in a["signs"].items():
        before = a["before"][name]
        assert torch.equal(before, b["before"][name]) and torch.equal(a["grad"][name], b["grad"][name]), (
            f"{name}: the two runs did not start their first step alike"
        )
        change = b["after"][name] - before  # the plain step: -lr * u
        conflict = change * r > 0  # u * r < 0 where the plain step moved the element
        assert torch.equal(a["after"][name][conflict], before[conflict]), f"{name}: a conflicting element moved"
        kept_a, kept_b = a["after"][name][~conflict], b["after"][name][~conflict]
        if exact:
            assert torch.equal(kept_a, kept_b), f"{name}: a kept element did not move as the plain optimizer moves it"
        else:  # cnl evaluates Adam's formula in its own (correctly rounded) order
            torch.testing.assert_close(kept_a, kept_b, rtol=1e-5, atol=1e-7)
        frozen += int(conflict.sum())
        by_gradient += int((a["grad"][name] * r < 0).sum())
    assert frozen > 0
    # first step of SGD and Adam: u has the sign of the gradient the optimizer step sees (accumulated, clipped)
    assert a["masked"] == by_gradient


def references_equal(a: dict[str, torch.Tensor], b: cnl.SignReference, model: torch.nn.Module) -> bool:
    return all(torch.equal(a[n], b.sign(p)) for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ transformers.Trainer


@pytest.mark.parametrize(("optim", "lr", "exact"), [("adamw_torch", 1e-3, False), ("sgd", 0.5, True)])
def test_trainer_step_is_masked_exactly(tmp_path: Path, optim: str, lr: float, exact: bool) -> None:
    masked, trainer = run_pair(
        tmp_path, lambda out: make_trainer(out, tiny(), optim=optim, learning_rate=lr), MASTERED, exact=exact
    )
    # the reference is the mean per-example gradient of the mastered set at the starting weights
    step, signs, _ = masked.references[0]
    fresh = tiny()
    assert step == 0
    assert references_equal(signs, cnl.reference_from(fresh, MASTERED), fresh)
    # the Trainer's optimizer is accelerate's wrapper around the MaskedOptimizer, sharing the param groups
    assert isinstance(trainer.optimizer.optimizer, MaskedOptimizer)
    assert trainer.optimizer.optimizer.param_groups is trainer.lr_scheduler.optimizer.param_groups
    logged = [e for e in trainer.state.log_history if LOG_KEY in e]
    assert logged and logged[0][LOG_KEY] == pytest.approx(masked.steps[0]["fraction"])
    assert 0 < logged[0][LOG_KEY] < 1


def test_gradient_accumulation_batches_and_refresh_every_step(tmp_path: Path) -> None:
    def build(out: Path) -> Trainer:
        return make_trainer(out, tiny(), max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)

    masked, trainer = run_pair(tmp_path, build, MASTERED, exact=False, refresh=1, batch_size=3)
    assert len(masked.steps) == 3  # 3 optimizer steps of 2 micro-batches of 2 examples
    callback = trainer.callback_handler.callbacks[0]
    assert isinstance(callback, CNLCallback) and callback.refreshes == [0, 1, 2]
    for step, signs, model_then in masked.references:  # recomputed on the weights of each step
        assert references_equal(signs, cnl.reference_from(model_then, MASTERED), model_then), step
    assert not references_equal(masked.references[0][1], cnl.reference_from(model_then, MASTERED), model_then)
    logged = [e[LOG_KEY] for e in trainer.state.log_history if LOG_KEY in e]
    assert logged == pytest.approx([s["fraction"] for s in masked.steps])
    for rec in masked.steps:  # every step, not only the first: nothing moved against the reference
        for name, r in rec["signs"].items():
            change = rec["after"][name] - rec["before"][name]
            assert not bool((change * r > 0).any()), name


def test_refresh_every_epoch_and_every_k_steps(tmp_path: Path) -> None:
    epochs = make_trainer(tmp_path / "e", tiny(), max_steps=-1, num_train_epochs=2, train=TRAIN[:4])
    per_epoch = protect(epochs, MASTERED)
    epochs.train()
    assert per_epoch.refreshes == [0, 2]  # 2 steps per epoch
    steps = make_trainer(tmp_path / "k", tiny(), max_steps=5)
    every_two = protect(steps, MASTERED, refresh=2)
    steps.train()
    assert every_two.refreshes == [0, 2, 4]


def test_logs_reach_the_reporting_callbacks_and_protect_checks(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, tiny(), max_steps=2)
    reporter = Recorder()  # appended last, like report_to's callbacks (which follow the default flow callback)
    trainer.add_callback(reporter)
    callback = protect(trainer, MASTERED)
    assert trainer.callback_handler.callbacks[0] is callback
    with pytest.raises(ValueError, match="already protected"):
        protect(trainer, MASTERED)
    trainer.train()
    train_logs = [log for log in reporter.logs if "loss" in log]
    assert len(train_logs) == 2 and all(0 < log[LOG_KEY] < 1 for log in train_logs)
    with pytest.raises(ValueError, match="no input_ids"):
        protect(make_trainer(tmp_path / "raw", tiny()), [{"text": "hello"}])
    for bad in (0, "weekly", True):
        with pytest.raises(ValueError, match="refresh"):
            CNLCallback(MASTERED, refresh=bad)


def test_peft_lora_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    def lora() -> torch.nn.Module:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the same adapter initialisation in both runs
            return peft.get_peft_model(tiny(), config)

    masked, trainer = run_pair(tmp_path, lambda out: make_trainer(out, lora(), max_steps=2), MASTERED, exact=False)
    model = trainer.model
    trainable = {p for p in model.parameters() if p.requires_grad}
    reference = trainer.callback_handler.callbacks[0].optimizer.reference
    assert set(reference.keys()) == trainable and all("lora_" in n for n in masked.steps[0]["signs"])
    base = dict(tiny().named_parameters())
    for name, p in model.get_base_model().named_parameters():
        if not p.requires_grad:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), f"{name}: a frozen base weight moved"
    assert any(LOG_KEY in e for e in trainer.state.log_history)


# ------------------------------------------------------------------------------------------ TRL's SFTTrainer


def conversations(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Chat-formatted data: the question as the user's message, the answer letter as the assistant's."""
    return [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["label"]}],
        }
        for r in rows
    ]


def test_sft_trainer(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'cnl[hf]')")

    def build(out: Path) -> Any:
        config = trl.SFTConfig(
            **trainer_args(out, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2),
            bf16=False,
        )
        return trl.SFTTrainer(
            model=tiny(),
            args=config,
            train_dataset=datasets.Dataset.from_list(conversations(ROWS[:8])),
            processing_class=TOK,
        )

    masked, trainer = run_pair(tmp_path, build, conversations(ROWS[8:]), exact=False)
    callback = trainer.callback_handler.callbacks[0]
    assert callback.refreshes == [0]
    # the raw conversations were tokenized by the trainer itself: prompt masked (-100), completion labelled
    batch = callback._batches[0]
    assert bool((batch["labels"] == -100).any()) and bool((batch["labels"] != -100).any())
    assert len(masked.steps) == 2
    assert sum(LOG_KEY in e for e in trainer.state.log_history) == 2
