"""What the three examples share and is not about CNL: the command line, the split of a dataset slice into
the mastered set M (answered correctly) and the injection set I (answered wrongly), and the before/after
counts. Each example imports it from its own folder and keeps only its training code.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from cnl.data import MCRow, resolve_dataset, resolve_general
from cnl.models import load_model_and_tokenizer
from cnl.scoring import Encoded, PromptEncoder, predict


@dataclass
class Demo:
    """The embedded model and a scored slice of a dataset."""

    args: argparse.Namespace
    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    mastered_rows: list[MCRow]
    injection_rows: list[MCRow]
    mastered: list[Encoded]
    injection: list[Encoded]

    #: The general-knowledge questions of ``--general`` (empty without it).
    general: list[Encoded] = field(default_factory=list)

    def count_correct(self, questions: list[Encoded]) -> int:
        return predict(self.model, questions, pad_id=self.pad_id, progress=False).n_correct if questions else 0

    def self_prompts(self) -> list[MCRow]:
        """The prompts whose present answers ``--reference self`` protects (a general set's questions)."""
        rows, _ = resolve_general(self.args.self_prompts)
        return rows

    def general_line(self) -> str:
        if not self.general:
            return ""
        return f", general {self.count_correct(self.general) / len(self.general):.1%} ({self.args.general})"

    def trainer_args(self, output_dir: str) -> dict[str, Any]:
        """The (SFT)TrainingArguments both Trainer examples share: the loop of ``own_loop.py`` (one question
        per step, constant lr, AdamW), CPU, nothing saved, and one log line (with CNL's fraction) per epoch."""
        return {
            "output_dir": output_dir,
            "num_train_epochs": self.args.epochs,
            "per_device_train_batch_size": 1,
            "optim": "adamw_torch",
            "learning_rate": self.args.lr,
            "lr_scheduler_type": "constant",
            "logging_steps": len(self.injection),
            "report_to": [],
            "save_strategy": "no",
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
        }

    def report_trainer(self, trainer: Any) -> None:
        """:meth:`report` with the mean of the ``cnl_masked_fraction`` values the Trainer logged."""
        fractions = [e["cnl_masked_fraction"] for e in trainer.state.log_history if "cnl_masked_fraction" in e]
        self.report(sum(fractions) / len(fractions) if fractions else None)

    def report(self, masked_fraction: float | None) -> None:
        """Print the after line: learned (of I), forgotten (of M) and the share of updates CNL froze."""
        learned = self.count_correct(self.injection)
        forgotten = len(self.mastered) - self.count_correct(self.mastered)
        frozen = " (no CNL)" if masked_fraction is None else f" (CNL froze {masked_fraction:.0%} of the updates)"
        print(
            f"after:  learned {learned}/{len(self.injection)}, forgotten {forgotten}/{len(self.mastered)}"
            f"{self.general_line()}{frozen}"
        )


def as_example(question: Encoded) -> dict[str, list[int]]:
    """A causal-LM example: the chat prompt followed by the answer letter; only the letter is a label
    (SPEC's loss: the cross-entropy of the answer letter after the prompt)."""
    prompt = list(question.input_ids)
    return {"input_ids": prompt + [question.target], "labels": [-100] * len(prompt) + [question.target]}


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="arc_c", help="a named dataset available offline (arc_c, csqa, mmlu)")
    parser.add_argument("--limit", type=int, default=60, help="questions of the dataset to score")
    parser.add_argument("--inject", type=int, default=16, help="wrongly answered questions to teach")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-6)
    parser.add_argument(
        "--reference",
        choices=("mastered", "self", "none"),
        default="mastered",
        help="what CNL protects: M (the questions answered correctly), the model's own answers to --self-prompts "
        "(no labelled data), or nothing (plain fine-tuning)",
    )
    parser.add_argument("--no-cnl", action="store_true", help="plain fine-tuning, for contrast (--reference none)")
    parser.add_argument(
        "--self-prompts", default="mmlu:50", metavar="SET:N", help="the prompts of --reference self (default mmlu:50)"
    )
    parser.add_argument(
        "--general", default=None, metavar="SET:N", help="also print the accuracy on a general set, e.g. csqa:200"
    )
    args = parser.parse_args()
    if args.no_cnl:
        args.reference = "none"
    return args


def load_demo(description: str) -> Demo:
    """Parse the command line, load the embedded model, score the slice, split it and print the before line."""
    args = parse_args(description)
    model, tokenizer, _ = load_model_and_tokenizer(None, device="cpu")
    encoder = PromptEncoder(tokenizer)
    rows, _ = resolve_dataset(args.dataset, limit=args.limit)
    questions = encoder.encode_all(rows)
    correct = predict(model, questions, pad_id=encoder.pad_id, progress=False).correct
    m = [i for i, ok in enumerate(correct) if ok]
    i_ = [i for i, ok in enumerate(correct) if not ok][: args.inject]
    demo = Demo(
        args=args,
        model=model,
        tokenizer=tokenizer,
        pad_id=encoder.pad_id,
        mastered_rows=[rows[i] for i in m],
        injection_rows=[rows[i] for i in i_],
        mastered=[questions[i] for i in m],
        injection=[questions[i] for i in i_],
    )
    if args.general:
        demo.general = encoder.encode_all(resolve_general(args.general)[0])
    print(f"{args.dataset}, {len(questions)} questions: M = {len(m)} answered correctly,", end=" ")
    print(f"I = {len(i_)} answered wrongly, to teach; protecting: {args.reference}")
    print(f"before: learned 0/{len(i_)}, forgotten 0/{len(m)}{demo.general_line()}")
    return demo
