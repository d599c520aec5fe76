"""CNL in a plain PyTorch training loop: ``cnl.reference_from`` and ``cnl.MaskedOptimizer``.

Runs offline on the embedded SmolLM2-135M-Instruct, about a minute on a 2-core CPU:

    .venv/bin/python examples/own_loop.py               # with CNL
    .venv/bin/python examples/own_loop.py --no-cnl      # plain fine-tuning, for contrast

The questions of an ARC-Challenge slice that the model answers correctly are the mastered set M; some
of the others are the injection set I (``_demo.py`` makes the split). The loop trains on I, one question
per step. CNL adds two lines: the optimizer is wrapped in ``cnl.MaskedOptimizer``, and at the start of
every epoch ``cnl.reference_from`` computes the signs of M's mean gradient; every step then leaves alone
the weights whose update would go against them. Prints learned (of I) and forgotten (of M) before and after.
"""

from __future__ import annotations

import torch
from _demo import as_example, load_demo

import cnl


def main() -> None:
    demo = load_demo(__doc__.split("\n\n")[0])
    model, args = demo.model, demo.args
    protected = None  # what the reference is computed on (None: plain fine-tuning)
    if args.reference == "mastered":
        protected = [as_example(q) for q in demo.mastered]
    elif args.reference == "self":  # no labelled M: the model's own answers to general questions, before training
        protected = cnl.self_reference(model, demo.tokenizer, demo.self_prompts())
    # Any torch SGD (with or without momentum), Adam or AdamW, wrapped: schedulers, clipping, state_dict work as usual.
    optimizer = cnl.MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0))
    fractions = []
    for epoch in range(1, args.epochs + 1):
        if protected is not None:
            # signs of the protected examples' mean gradient at the current weights (clears .grad: between steps)
            optimizer.reference = cnl.reference_from(model, protected)
        model.train()
        total = 0.0
        for question in demo.injection:
            batch = {k: torch.tensor([v]) for k, v in as_example(question).items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()  # conflicting elements stay where they are; the others move as AdamW moves them
            optimizer.zero_grad()
            total += loss.item()
        frozen = optimizer.pop_masked_fraction() if protected is not None else None  # share the mask froze this epoch
        if frozen is not None:
            fractions.append(frozen)
        masked = f", masked {frozen:.0%} of the updates" if frozen is not None else ""
        print(f"epoch {epoch}: mean loss {total / len(demo.injection):.3f}{masked}")
    demo.report(sum(fractions) / len(fractions) if fractions else None)


if __name__ == "__main__":
    main()
