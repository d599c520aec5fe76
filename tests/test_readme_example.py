"""The library snippets of the documentation, run as published on a tiny model.

The code is not re-typed here: each snippet is extracted from the page that holds it (the first ```python
block of a section, see :data:`RULE_SNIPPET` and :data:`LOOP_SNIPPETS`) and executed with the free names it
expects bound to tiny, offline data. For the rule itself (``## The rule itself: `cnl.mask``` in
docs/own-training.md, names :data:`SNIPPET_NAMES`) the test checks what the snippet claims:

* part 1 builds a reference whose signs are those of the mean mastered-set gradient;
* part 2a (plain SGD): every element where ``grad · reference < 0`` stays exactly where it was, every other
  element moves by exactly ``-lr * grad`` (as ``torch.optim.SGD`` computes it), and the mask does block some
  elements that would otherwise have moved;
* part 2b: the optimizer it builds is executed as part of the block; one step of it moves no element
  against the reference (the change agrees with a plain step of the same optimizer where kept).

The steps of part 2a are observed without touching the snippet: ``torch.optim.SGD`` is replaced, for the
duration of the ``exec``, by a subclass that records each step, and a post-accumulate-grad hook on every
parameter records the raw (unmasked) gradient of each backward pass.

The own-loop example (``cnl.MaskedOptimizer`` + ``cnl.reference_from``, names :data:`LOOP_NAMES`) is the first
```python block of the README's ``## Use CNL in your own training`` and of docs/own-training.md's
``## Your own loop``; both copies run, and every step they take is checked against the reference in use.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from cnl.data import rows_from_dicts
from cnl.scoring import Encoded, PromptEncoder, batch_losses, predict
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OWN_TRAINING = ROOT / "docs" / "own-training.md"
HEADING = "## The rule itself: `cnl.mask`"
#: Where the rule's snippet is: the first python block of this section of this page.
RULE_SNIPPET = (OWN_TRAINING, HEADING)
#: The sections whose first python block is the own-loop example (cnl.MaskedOptimizer + cnl.reference_from).
LOOP_HEADING = "## Use CNL in your own training"
LOOP_SNIPPETS = [(README, LOOP_HEADING), (OWN_TRAINING, "## Your own loop")]

#: The free names the rule's snippet uses (what a reader must already have), with what each is here.
#: If the snippet starts using another name, ``exec`` fails with a NameError naming it: add it here.
SNIPPET_NAMES = {
    "model": "a tiny causal LM (cnl.testing.make_tiny_model, llama arch, chatml tokenizer)",
    "loss_fn": "loss_fn(model, batch) -> per-question SPEC losses (cnl.scoring.batch_losses)",
    "mastered_batches": "batches (lists of Encoded) of the questions the tiny model answers correctly",
    "n_mastered": "how many questions mastered_batches holds in all",
    "new_facts": "batches of one question each, of questions the tiny model answers wrongly",
}


# ------------------------------------------------------------------------------------------ extraction


def doc_snippet(doc: Path, heading: str) -> tuple[str, int]:
    """The first ```python block of the section under ``heading`` of the Markdown file ``doc``:
    ``(code, line of its first code line)``.

    The section runs from the heading to the next heading of the same or a higher level. Fails the test
    with a clear message when the file, the heading or the block is missing.
    """
    if not doc.is_file():
        pytest.fail(f"{doc} not found")
    name = doc.name
    lines = doc.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == heading]
    if not starts:
        pytest.fail(f"{name} has no heading {heading!r}: the library example this test runs is gone or renamed")
    level = len(heading) - len(heading.lstrip("#"))
    section_end = len(lines)
    in_fence = False
    for i in range(starts[0] + 1, len(lines)):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        m = re.match(r"(#+)\s", lines[i])
        if not in_fence and m and len(m.group(1)) <= level:
            section_end = i
            break
    for i in range(starts[0] + 1, section_end):
        if re.fullmatch(r"\s*```\s*python\s*", lines[i]):
            for j in range(i + 1, section_end):
                if lines[j].strip() == "```":
                    return "\n".join(lines[i + 1 : j]) + "\n", i + 2
            pytest.fail(f"{name}:{i + 1}: the ```python block under {heading!r} is not closed")
    pytest.fail(f"{name}: the section {heading!r} (line {starts[0] + 1}) has no ```python block")


def run_snippet(code: str, first_line: int, names: dict[str, Any], doc: Path = RULE_SNIPPET[0]) -> dict[str, Any]:
    """Execute ``code`` with ``names`` bound; tracebacks point at ``doc``'s own line numbers."""
    missing = set(SNIPPET_NAMES) - set(names)
    assert not missing, f"test bug: no value for {sorted(missing)}"
    namespace: dict[str, Any] = {"__name__": "readme_snippet", **names}
    compiled = compile("\n" * (first_line - 1) + code, str(doc), "exec")
    try:
        exec(compiled, namespace)  # noqa: S102 -- the documentation's own example, the point of this test
    except NameError as e:
        pytest.fail(
            f"the snippet of {doc.name} uses a name the test does not provide ({e}). It provides "
            f"{sorted(SNIPPET_NAMES)}; if the snippet now expects another name from the reader, add it to "
            "SNIPPET_NAMES (and its value) in tests/test_readme_example.py"
        )
    return namespace


def test_snippet_extraction_fails_clearly(tmp_path: Path) -> None:
    code, first = doc_snippet(*RULE_SNIPPET)
    assert "SignReference" in code and first > 1
    for doc, heading in LOOP_SNIPPETS:
        code, first = doc_snippet(doc, heading)
        assert "cnl.MaskedOptimizer" in code and "cnl.reference_from" in code and first > 1
    with pytest.raises(pytest.fail.Exception, match="not found"):
        doc_snippet(tmp_path / "missing.md", HEADING)
    no_heading = tmp_path / "a.md"
    no_heading.write_text("# x\n\n## Other\n```python\nprint(1)\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="a.md has no heading"):
        doc_snippet(no_heading, HEADING)
    # a python block only after the section ends does not count
    no_block = tmp_path / "b.md"
    no_block.write_text(f"{HEADING}\n\ntext\n\n## Next\n```python\nprint(1)\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="has no ```python block"):
        doc_snippet(no_block, HEADING)
    found = tmp_path / "c.md"
    found.write_text(
        f"{HEADING}\n```bash\nls\n```\n#### sub\n```python\nx = 1\ny = 2\n```\n```python\nz\n```\n", encoding="utf-8"
    )
    assert doc_snippet(found, HEADING) == ("x = 1\ny = 2\n", 7)
    with pytest.raises(pytest.fail.Exception, match="SNIPPET_NAMES"):
        run_snippet("undefined_name_in_readme + 1\n", 1, dict.fromkeys(SNIPPET_NAMES))


# ------------------------------------------------------------------------------------------ tiny data


@dataclass
class Data:
    model: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, list[Encoded]], torch.Tensor]
    mastered_batches: list[list[Encoded]]
    n_mastered: int
    new_facts: list[list[Encoded]]


def make_data() -> Data:
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("llama", vocab_size=len(tok), seed=0)
    pad_id = tok.pad_token_id

    def loss_fn(model: torch.nn.Module, batch: list[Encoded]) -> torch.Tensor:
        return batch_losses(model, batch, pad_id)

    encoded = PromptEncoder(tok).encode_all(rows_from_dicts(make_mc_rows(24, seed=0)))
    preds = predict(model, encoded, batch_size=8, pad_id=pad_id, progress=False)
    mastered = [e for e, ok in zip(encoded, preds.correct, strict=True) if ok]
    injection = [e for e, ok in zip(encoded, preds.correct, strict=True) if not ok]
    assert len(mastered) >= 3 and len(injection) >= 3, (len(mastered), len(injection))
    return Data(
        model=model,
        loss_fn=loss_fn,
        mastered_batches=[mastered[i : i + 2] for i in range(0, len(mastered), 2)],
        n_mastered=len(mastered),
        new_facts=[[e] for e in injection[:3]],
    )


def mean_mastered_gradient(data: Data) -> dict[torch.nn.Parameter, torch.Tensor]:
    """g_M computed here, independently of the snippet, on a copy of the model."""
    model = copy.deepcopy(data.model)
    model.zero_grad()
    for batch in data.mastered_batches:
        (data.loss_fn(model, batch).sum() / data.n_mastered).backward()
    by_name = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {p: by_name[n] for n, p in data.model.named_parameters() if n in by_name}


# ------------------------------------------------------------------------------------------ recording


@dataclass
class SgdStep:
    lr: float
    before: dict[torch.nn.Parameter, torch.Tensor]
    after: dict[torch.nn.Parameter, torch.Tensor]
    raw_grad: dict[torch.nn.Parameter, torch.Tensor]
    grad_at_step: dict[torch.nn.Parameter, torch.Tensor | None]


@dataclass
class Recorder:
    raw_grad: dict[torch.nn.Parameter, torch.Tensor] = field(default_factory=dict)
    steps: list[SgdStep] = field(default_factory=list)

    def sgd_class(self) -> type[torch.optim.SGD]:
        recorder = self

        class RecordingSGD(torch.optim.SGD):
            @torch.no_grad()
            def step(self, closure: Any = None) -> Any:  # type: ignore[override]
                assert closure is None
                (group,) = self.param_groups
                extras = {k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov", "maximize")}
                if any(extras.values()):
                    pytest.fail(f"the snippet's plain SGD now uses {extras}: update tests/test_readme_example.py")
                params = [p for p in group["params"] if p.grad is not None]
                before = {p: p.detach().clone() for p in params}
                grads = {p: (None if p.grad is None else p.grad.clone()) for p in group["params"]}
                out = super().step()
                recorder.steps.append(
                    SgdStep(
                        lr=float(group["lr"]),
                        before=before,
                        after={p: p.detach().clone() for p in params},
                        raw_grad={p: recorder.raw_grad[p] for p in params},
                        grad_at_step=grads,
                    )
                )
                return out

        return RecordingSGD

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator[None]:
        def hook(p: torch.Tensor) -> None:
            self.raw_grad[p] = p.grad.detach().clone()

        handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.optim, "SGD", self.sgd_class())
                yield
        finally:
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------------------------ the snippet


@dataclass
class Run:
    data: Data
    g_m: dict[torch.nn.Parameter, torch.Tensor]
    recorder: Recorder
    namespace: dict[str, Any]


@pytest.fixture(scope="module")
def run() -> Run:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_data()
        g_m = mean_mastered_gradient(data)
        code, first_line = doc_snippet(*RULE_SNIPPET)
        names = {
            "model": data.model,
            "loss_fn": data.loss_fn,
            "mastered_batches": data.mastered_batches,
            "n_mastered": data.n_mastered,
            "new_facts": data.new_facts,
        }
        recorder = Recorder()
        with recorder.watching(data.model):
            namespace = run_snippet(code, first_line, names, RULE_SNIPPET[0])
    finally:
        torch.set_num_threads(before)
    return Run(data, g_m, recorder, namespace)


def test_reference_covers_every_parameter(run: Run) -> None:
    params = list(run.data.model.parameters())
    assert set(run.g_m) == set(params), "every parameter of the tiny model gets a mastered-set gradient"
    # The snippet leaves no gradient behind after part 1 / part 2a (zero_grad at the end of each).
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_plain_sgd_freezes_exactly_the_conflicting_elements(run: Run) -> None:
    steps = run.recorder.steps
    n_facts = len(run.data.new_facts)
    assert len(steps) == n_facts, f"part 2a should take one SGD step per new fact ({n_facts}), took {len(steps)}"
    frozen_by_mask = moved = 0
    for k, step in enumerate(steps):
        assert set(step.before) == set(run.g_m), f"step {k}: not every parameter had a gradient"
        for p, before in step.before.items():
            raw, g_m = step.raw_grad[p], run.g_m[p]
            conflict = raw * g_m < 0
            # the gradient the optimizer saw: raw, zeroed exactly where grad · reference < 0
            torch.testing.assert_close(step.grad_at_step[p], raw.masked_fill(conflict, 0), rtol=0, atol=0)
            after = step.after[p]
            # conflicting elements did not move at all ...
            assert torch.equal(after[conflict], before[conflict]), f"step {k}: a conflicting element moved"
            # ... and every other element moved by exactly -lr * grad (SGD's own arithmetic)
            keep = ~conflict
            expected = before.add(raw, alpha=-step.lr)
            assert torch.equal(after[keep], expected[keep]), f"step {k}: a kept element did not move by -lr*grad"
            frozen_by_mask += int((conflict & (expected != before)).sum())
            moved += int((after != before).sum())
    # the test can tell masking from not masking: without the mask these elements would have moved
    assert frozen_by_mask > 0
    assert moved > 0


def test_any_optimizer_part_moves_nothing_against_the_reference(run: Run) -> None:
    from cnl import MaskedOptimizer

    opt = run.namespace.get("opt")
    if not isinstance(opt, MaskedOptimizer):
        pytest.fail(f"part 2b of the rule's snippet should leave a MaskedOptimizer in `opt`, got {type(opt)}")
    model = run.data.model
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    run.data.loss_fn(model, run.data.new_facts[0]).sum().backward()
    raw = {p: p.grad.detach().clone() for p in model.parameters()}
    opt.step()
    opt.zero_grad()
    moved = frozen = 0
    for p in model.parameters():
        change = p.detach() - before[p]
        # a step of -lr*u with u · reference < 0 would change the element in the reference's direction
        against = change * run.g_m[p] > 0
        assert not bool(against.any()), f"{int(against.sum())} elements moved against the reference"
        moved += int((change != 0).sum())
        frozen += int(((change == 0) & (raw[p] * run.g_m[p] < 0)).sum())
    assert moved > 0 and frozen > 0, (moved, frozen)


# ------------------------------------------------------------------------------------------ the own-loop snippet

#: The free names of the own-loop snippet (the first python block of each of LOOP_SNIPPETS).
LOOP_NAMES = {
    "model": "a tiny causal LM (llama arch)",
    "new_facts": "HF-style batches (input_ids, labels with -100 on the prompt) of questions to teach",
    "mastered_examples": "HF-style examples (dicts of lists) of the questions to protect",
    "epochs": "2",
}


def as_lm_example(e: Encoded) -> dict[str, list[int]]:
    ids = list(e.input_ids)
    return {"input_ids": [*ids, e.target], "labels": [-100] * len(ids) + [e.target]}


@pytest.mark.parametrize("where", LOOP_SNIPPETS, ids=lambda w: w[0].name if isinstance(w, tuple) else "")
def test_own_loop_snippet_masks_every_step_against_the_current_reference(
    where: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snippet runs as printed; every step it takes moves nothing against the reference then in use,
    each epoch's reference is the one of the weights at that epoch's start, and the scheduler drove the lr."""
    import cnl
    from cnl import MaskedOptimizer

    data = make_data()
    model = data.model
    torch.manual_seed(0)
    mastered = [as_lm_example(e) for batch in data.mastered_batches for e in batch]
    new_facts = [{k: torch.tensor([v]) for k, v in as_lm_example(b[0]).items()} for b in data.new_facts]
    steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    references: list[tuple[torch.nn.Module, cnl.SignReference]] = []
    real_reference_from = cnl.reference_from

    def recording_reference_from(m: torch.nn.Module, *args: Any, **kw: Any) -> cnl.SignReference:
        snapshot = copy.deepcopy(m)
        ref = real_reference_from(m, *args, **kw)
        references.append((snapshot, ref))
        return ref

    class RecordingMasked(MaskedOptimizer):
        def step(self, closure: Any = None) -> Any:
            named = list(model.named_parameters())
            before = {n: p.detach().clone() for n, p in named}
            signs = {n: self.reference.sign(p) for n, p in named}
            out = super().step(closure)
            steps.append((before, {n: p.detach().clone() for n, p in named}, signs))
            return out

    monkeypatch.setattr(cnl, "MaskedOptimizer", RecordingMasked)
    monkeypatch.setattr(cnl, "reference_from", recording_reference_from)
    doc, heading = where
    code, first_line = doc_snippet(doc, heading)
    names = {"model": model, "new_facts": new_facts, "mastered_examples": mastered, "epochs": 2}
    assert set(names) == set(LOOP_NAMES)
    namespace: dict[str, Any] = {"__name__": "readme_snippet", **names}
    exec(compile("\n" * (first_line - 1) + code, str(doc), "exec"), namespace)  # noqa: S102

    assert len(steps) == 2 * len(new_facts) and len(references) == 2
    frozen = moved = 0
    for before, after, signs in steps:
        for name, r in signs.items():
            change = after[name] - before[name]
            assert not bool((change * r > 0).any()), f"{name}: an element moved against the reference"
            moved += int((change != 0).sum())
            frozen += int(((change == 0) & (r != 0)).sum())
    assert moved > 0 and frozen > 0
    for snapshot, ref in references:  # each epoch's reference: M's mean gradient at that epoch's start
        fresh = real_reference_from(snapshot, mastered)
        by_name = dict(snapshot.named_parameters())
        keyed = dict(model.named_parameters())
        assert all(torch.equal(fresh.sign(by_name[n]), ref.sign(keyed[n])) for n in by_name)
    first, second = (ref for _, ref in references)
    assert not all(torch.equal(first.sign(p), second.sign(p)) for p in model.parameters()), "refreshed per epoch"
    opt = namespace["opt"]
    assert opt.param_groups[0]["lr"] < 3e-6, "the scheduler lowered the learning rate"
