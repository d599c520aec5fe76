"""Teach a model new answers with ``transformers.Trainer`` while CNL protects the answers it already knows.

Runs offline on the embedded SmolLM2-135M-Instruct, about a minute on a 2-core CPU:

    .venv/bin/python examples/hf_trainer.py               # with CNL
    .venv/bin/python examples/hf_trainer.py --no-cnl      # plain fine-tuning, for contrast
    .venv/bin/python examples/hf_trainer.py --reference self   # protect its own answers to 50 MMLU questions

1. Score a slice of ARC-Challenge (``_demo.py``); the questions the model answers correctly are the
   mastered set M, some of the others are the injection set I: the new facts to teach.
2. Fine-tune on I with an ordinary ``Trainer``. ``cnl.protect(trainer, M)`` is the only CNL line: every
   optimizer step then leaves alone the weights whose update would go against M's gradient.
3. Print, before and after: learned (questions of I now answered correctly) and forgotten (questions of M
   now answered wrongly).
"""

from __future__ import annotations

import tempfile

from _demo import as_example, load_demo
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

import cnl


def main() -> None:
    demo = load_demo(__doc__.split("\n\n")[0])
    args, tokenizer = demo.args, demo.tokenizer
    tokenizer.padding_side = "right"  # training batches: right padding keeps every token's position
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=demo.model,
            args=TrainingArguments(**demo.trainer_args(out)),
            train_dataset=Dataset.from_list([as_example(q) for q in demo.injection]),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        if args.reference == "mastered":
            cnl.protect(trainer, [as_example(q) for q in demo.mastered])  # reference recomputed every epoch
        elif args.reference == "self":  # no labelled M: keep the model's present answers to general questions
            cnl.protect(trainer, "self", prompts=demo.self_prompts(), tokenizer=tokenizer)
        trainer.train()
    demo.report_trainer(trainer)


if __name__ == "__main__":
    main()
