"""``osf`` (PEFT's Orthogonal Subspace Fine-tuning) against hand computations on a tiny model: the gradient
hooks are the projections away from the start weights' top singular subspace, two SGD steps through the loop
equal the hand-computed factor updates, every update stays orthogonal to that subspace (sgd, momentum; adam
would not), everything but the target matrices is frozen, the saved model is the merged full model, bad
options are refused, and ``cnl continual`` decomposes every round's own start weights with a growing share."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import run_cli
from method_helpers import (
    assert_same,
    crash_in_epoch_two,
    encode,
    in_set,
    load_weights,
    mean_grad,
    tiny,
    train,
    weights,
    without_seconds,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cnl.errors import ConfigError
from cnl.methods import get_method, validate_train_config
from cnl.methods.osf import MAX_SHARE, osf_layers, preserved_rank, preserved_share
from cnl.resolve import train_config
from cnl.scoring import batch_losses
from cnl.testing import make_mc_rows, write_jsonl

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: Orthogonal up to float32 rounding (PEFT's SVD and the factors are float32): U_hᵀ ΔW and ΔW V_h relative to
#: ΔW's largest element, measured 1e-7 to 4e-5 here; Adam reaches 0.6 (test_adam_would_leave_the_subspace...).
ORTHOGONAL = 1e-3


# ------------------------------------------------------------------------------------------------ by hand
def targets_of(w: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in w if n.endswith("_proj.weight")]


def high(w: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_h, V_h): the top ⌊share · min(out, in)⌋ left and right singular vectors of ``w`` (as columns),
    from our own SVD in float64."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = int(min(w.shape) * share)
    return u[:, :k], vh[:k].T


def low(w: torch.Tensor, share: float) -> Factors:
    """(U_l, s_l, V_l): the trainable rest of our SVD of ``w`` (V_l as rows, as PEFT holds it)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = int(min(w.shape) * share)
    return u[:, k:], s[k:], vh[k:]


def two_sided(g: torch.Tensor, uh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """P(g) = g − U Uᵀ g − g V Vᵀ + U Uᵀ g V Vᵀ = (I − U Uᵀ) g (I − V Vᵀ)."""
    g = g.double()
    return g - uh @ (uh.T @ g) - (g @ vh) @ vh.T + uh @ (uh.T @ g @ vh) @ vh.T


def factor_grads(f: Factors, g: torch.Tensor) -> Factors:
    """The plain gradients of the factors of W = W_h + U_l diag(s_l) V_l, from the gradient ``g`` of W."""
    u, s, v = f
    g = g.double()
    return g @ v.T * s, ((u.T @ g) * v).sum(1), s[:, None] * (u.T @ g)


def projected(grads: Factors, uh: torch.Tensor, vh: torch.Tensor) -> Factors:
    """PEFT's hooks: ∇U_l ← (I − U_h U_hᵀ) ∇U_l, ∇V_l ← ∇V_l (I − V_h V_hᵀ), ∇s_l as it is."""
    gu, gs, gv = grads
    return gu - uh @ (uh.T @ gu), gs, gv - (gv @ vh) @ vh.T


def high_part(dw: torch.Tensor, uh: torch.Tensor, vh: torch.Tensor) -> float:
    """The largest element of U_hᵀ ΔW and ΔW V_h, relative to ΔW's largest element."""
    dw = dw.double()
    return float(max((uh.T @ dw).abs().max(), (dw @ vh).abs().max()) / dw.abs().max())


def effective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight each OSF layer computes with: its frozen base weight plus PEFT's ΔW."""
    with torch.no_grad():
        return {
            f"{n}.weight": (m.get_base_layer().weight + m.get_delta_weight("default")).clone()
            for n, m in osf_layers(model).items()
        }


def osf(**cfg: Any) -> Any:
    cfg = train_config(method="osf", **cfg)
    validate_train_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ the hooks
def test_the_hooks_project_the_factor_gradients_away_from_the_high_subspace(sets: dict[str, Any]) -> None:
    base, tok = tiny()
    w0 = weights(base)
    (q,), pad = encode(tok, sets["rows"]["injection"][:1])
    g = mean_grad(copy.deepcopy(base), [q], pad, training=True)  # the plain gradient of each W
    model = get_method("osf").prepare_model(copy.deepcopy(base), osf())
    model.train()
    batch_losses(model, [q], pad)[0].backward()
    layers = osf_layers(model)
    assert {f"{n}.weight" for n in layers} == set(targets_of(w0)) and len(layers) == 14
    moved = 0.0
    for name, layer in layers.items():
        w = w0[f"{name}.weight"]
        uh, vh = high(w, 0.5)
        assert layer.effective_rank["default"] == uh.shape[1] == min(w.shape) // 2  # PEFT's default: half
        params = layer.osf_svd_params["default"]
        start = tuple(getattr(layer, f"_osf_{x}_low_init")["default"].double() for x in ("U", "S", "V"))
        plain = factor_grads(start, g[f"{name}.weight"])  # at the start the factors are PEFT's own SVD's
        expected = projected(plain, uh, vh)
        for x, e in zip(("U_low", "S_low", "V_low"), expected, strict=True):
            torch.testing.assert_close(
                params[x].grad.double(), e, rtol=0, atol=1e-5 * float(e.abs().max()), msg=f"{name} {x}"
            )
        moved = max(moved, float((uh.T @ plain[0]).abs().max() / plain[0].abs().max()))
    assert moved > 0.1  # the plain gradient does point into the high subspace: the projection removes something


# ------------------------------------------------------------------------------------------------ the loop
def test_two_sgd_steps_by_hand(tmp_path: Path, sets: dict[str, Any]) -> None:
    """Two SGD steps on the factors, projected by hand, give the saved merged weights; ΔW is orthogonal to the
    start weights' high subspace on both sides; nothing else moves."""
    lr, share = 0.05, 0.5
    two_rows = make_mc_rows(2, seed=21)
    two = write_jsonl(tmp_path / "two.jsonl", two_rows)
    base, tok = tiny()
    w0 = weights(base)
    (q1, q2), pad = encode(tok, two_rows)
    targets = targets_of(w0)
    subspace = {n: high(w0[n], share) for n in targets}
    factors = {n: low(w0[n], share) for n in targets}
    frozen = {n: w0[n].double() - (factors[n][0] * factors[n][1]) @ factors[n][2] for n in targets}
    theta, plain = dict(w0), copy.deepcopy(base)
    for q in (q1, q2):
        g = mean_grad(load_weights(plain, theta), [q], pad, training=True)
        for n in targets:
            steps = projected(factor_grads(factors[n], g[n]), *subspace[n])
            factors[n] = tuple(f - lr * d for f, d in zip(factors[n], steps, strict=True))  # type: ignore[assignment]
            theta[n] = (frozen[n] + (factors[n][0] * factors[n][1]) @ factors[n][2]).float()

    model = copy.deepcopy(base)
    out = tmp_path / "run"
    train(out, in_set(sets, injection=two), model=model, tok=tok, method="osf", lr=lr, save_model=True)
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert set(saved) == set(w0) - {"lm_head.weight"}  # a plain full model (the head is tied to the embedding)
    for n, w in saved.items():
        if n not in targets:  # embeddings, norms, the q/k/v biases: frozen
            assert torch.equal(w, w0[n]), n
            continue
        dw, expected = w - w0[n], theta[n] - w0[n]
        assert float(dw.abs().max()) > 1e-3, n
        torch.testing.assert_close(dw, expected, rtol=0, atol=1e-6, msg=n)
        assert high_part(dw, *subspace[n]) < ORTHOGONAL, n
        torch.testing.assert_close(two_sided(dw, *subspace[n]), dw.double(), rtol=0, atol=1e-6, msg=n)
    # the saved model computes what the trained PEFT model computes
    loaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(batch_losses(loaded, [q1], pad), batch_losses(model, [q1], pad))


@pytest.mark.parametrize(("optimizer", "share"), [("sgd", 0.25), ("momentum", 0.5)])
def test_training_stays_orthogonal_and_trains_only_the_target_matrices(
    tmp_path: Path, sets: dict[str, Any], runs: list, optimizer: str, share: float
) -> None:
    base, tok = tiny()
    w0 = weights(base)
    model = copy.deepcopy(base)
    train(
        tmp_path / "run", in_set(sets), model=model, tok=tok, method="osf", optimizer=optimizer, epochs=2,
        osf_effective_rank=share,
    )  # fmt: skip
    run = runs[-1]
    trainable = {n.split("osf_svd_params.")[-1].split(".")[-1] for n, _ in run.params}
    assert trainable == {"U_low", "S_low", "V_low"} and all(".osf_svd_params." in n for n, _ in run.params)
    sizes = [(w0[n].shape, int(min(w0[n].shape) * share)) for n in targets_of(w0)]
    assert run.info["trainable_parameters"] == sum((o + i + 1) * (min(o, i) - k) for (o, i), k in sizes)
    after = effective(model)
    for n in targets_of(w0):
        dw = after[n] - w0[n]
        assert float(dw.abs().max()) > 1e-3, n
        assert high_part(dw, *high(w0[n], share)) < ORTHOGONAL, n
    # every other parameter, and each target's frozen base weight, is where it started
    untouched = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if "osf_svd_params" not in n}
    assert set(untouched) == set(w0) - {"lm_head.weight"}
    for n, p in untouched.items():
        assert torch.equal(p, w0[n]), n


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_would_leave_the_subspace_so_it_is_refused(sets: dict[str, Any], optimizer: str) -> None:
    """PEFT projects the gradient; Adam divides it element by element by √v̂, which takes the factors' update
    out of the projected subspace (SGD's does not); the method therefore runs sgd and momentum only."""
    with pytest.raises(ConfigError, match=f"osf supports sgd, momentum .*not {optimizer}"):
        osf(optimizer=optimizer)
    base, tok = tiny()
    w0 = weights(base)
    questions, pad = encode(tok, sets["rows"]["injection"])

    def worst(make: Any) -> float:
        model = get_method("osf").prepare_model(copy.deepcopy(base), osf())
        opt = make([p for p in model.parameters() if p.requires_grad])
        model.train()
        for q in questions[:3]:
            opt.zero_grad()
            batch_losses(model, [q], pad)[0].backward()
            opt.step()
        return max(high_part(w - w0[n], *high(w0[n], 0.5)) for n, w in effective(model).items())

    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    assert worst(lambda ps: adam(ps, lr=1e-3)) > 0.1
    assert worst(lambda ps: torch.optim.SGD(ps, lr=1e-2)) < ORTHOGONAL


def test_resume_decomposes_the_start_weights_again_and_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {"method": "osf", "optimizer": "momentum", "epochs": 2}
    ma, tok = tiny()
    rows_a = train(tmp_path / "a", in_set(sets), model=ma, tok=tok, **cfg)
    undo = crash_in_epoch_two(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", in_set(sets), model=tiny()[0], tok=tok, **cfg)
    undo()
    checkpoint = load_file(str(next((tmp_path / "b" / "checkpoint").glob("epoch_*/rank_0.safetensors"))))
    saved = [k for k in checkpoint if "/weights/" in k]
    assert len(saved) == 3 * 14 and all(".osf_svd_params." in k for k in saved)  # the trainable factors only
    mb, _ = tiny()  # as a new process loads it: the start weights, decomposed again
    rows_b = train(tmp_path / "b", in_set(sets), model=mb, tok=tok, resume=True, **cfg)
    assert without_seconds(rows_a) == without_seconds(rows_b)
    assert_same(effective(mb), effective(ma))


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"osf_effective_rank": 0.0}, r"osf_effective_rank .* must be in \(0, 1\)"),
        ({"osf_effective_rank": 1.0}, r"osf_effective_rank .* must be in \(0, 1\)"),
        ({"osf_effective_rank": 16.0}, r"osf_effective_rank .* must be in \(0, 1\)"),
        ({"osf_effective_rank": -0.5}, r"osf_effective_rank .* must be in \(0, 1\)"),
        ({"osf_effective_rank": math.nan}, r"osf_effective_rank .* must be in \(0, 1\)"),
        ({"osf_rank_growth": -0.1}, r"osf_rank_growth must be in \[0, 1\)"),
        ({"osf_rank_growth": 1.0}, r"osf_rank_growth must be in \[0, 1\)"),
        ({"osf_rank_growth": math.nan}, r"osf_rank_growth must be in \[0, 1\)"),
        ({"osf_targets": " , "}, "osf_targets names no module"),
        ({"optimizer": "adamw"}, "osf supports sgd, momentum"),
    ],
)
def test_bad_options_refused_before_any_work(
    tmp_path: Path, sets: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        osf(**fields)
    model, tok = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="osf", **fields)
    assert not (tmp_path / "run").exists()
    assert_same(weights(model), before)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"osf_targets": "q_proj,nonexistent"}, r"osf_targets \['nonexistent'\] are not module names"),
        ({"osf_targets": "q_proj,input_layernorm"}, "input_layernorm is a Qwen2RMSNorm; OSF decomposes linear"),
        ({"osf_effective_rank": 0.05}, r"0.05 preserves no direction of model.layers.0.self_attn.k_proj \(16×32\)"),
    ],
)
def test_options_the_model_cannot_take_refused_by_prepare_model(fields: dict[str, Any], message: str) -> None:
    model, _ = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        get_method("osf").prepare_model(model, osf(**fields))
    assert_same(weights(model), before)  # not wrapped, nothing frozen half-way: the model is as it was
    assert all(p.requires_grad for p in model.parameters())


def test_cli_trains_osf_and_saves_a_plain_model(tmp_path: Path, sets: dict[str, Any], tiny_qwen2_dir: Path) -> None:
    out = tmp_path / "run"
    files = [x for name, path in in_set(sets).items() for x in (f"--{name}", str(path))]
    argv = ["train", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--out", str(out), *files]
    flags = ["--method", "osf", "--optimizer", "momentum", "--lr", "0.01", "--epochs", "1", "--save-model"]
    assert run_cli([*argv, *flags, "--osf-effective-rank", "0.25", "--osf-targets", "q_proj,down_proj"]) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (info["status"], info["method"], info["optimizer"]) == ("finished", "osf", "momentum")
    assert info["roles"]["reference"] is None
    assert info["trainable_parameters"] == 2 * ((32 + 32 + 1) * (32 - 8) + (32 + 64 + 1) * (32 - 8))
    resolved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train"]
    assert resolved["osf"] == {"effective_rank": 0.25, "targets": "q_proj,down_proj", "rank_growth": 0.2}
    start = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    saved = AutoModelForCausalLM.from_pretrained(out / "model")  # plain Hugging Face, no PEFT
    assert not (out / "model" / "adapter_config.json").exists()
    for n, p in saved.named_parameters():
        if n.endswith(("q_proj.weight", "down_proj.weight")):
            assert high_part(p.detach() - start[n], *high(start[n], 0.25)) < ORTHOGONAL, n
        elif n in start:
            assert torch.equal(p.detach(), start[n]), n


# ------------------------------------------------------------------------------------------------ continual
def test_preserved_share_grows_geometrically() -> None:
    assert [round(preserved_share(0.5, 0.2, k), 6) for k in (1, 2, 3, 4)] == [0.5, 0.6, 0.68, 0.744]
    assert preserved_share(0.5, 0.0, 7) == 0.5
    assert preserved_share(0.9, 0.5, 60) == MAX_SHARE < 1  # approaches 1, never reaches it
    assert preserved_rank(MAX_SHARE, (576, 1536)) == 575  # all but one direction
    assert preserved_rank(0.6, (16, 32)) == 9 and preserved_rank(0.5, (64, 32)) == 16


def test_continual_decomposes_each_rounds_start_weights_with_a_growing_share(
    tmp_path: Path, tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_mc_rows(8, seed=5)
    files = {
        k: write_jsonl(tmp_path / f"{k}.jsonl", part)
        for k, part in (("m", rows[:2]), ("a", rows[2:5]), ("b", rows[5:]))
    }
    cls = type(get_method("osf"))
    orig = cls.prepare_model
    seen: list[dict[str, Any]] = []

    def spy(self: Any, model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
        start = {n: t for n, t in weights(model).items() if n.endswith("_proj.weight")}
        wrapped = orig(self, model, cfg)
        seen.append({"start": start, "share": cfg.options.effective_rank, "layers": osf_layers(wrapped)})
        return wrapped

    monkeypatch.setattr(cls, "prepare_model", spy)
    out = tmp_path / "continual"
    argv = ["continual", "--out", str(out), "--model", str(tiny_qwen2_dir), "--device", "cpu"]
    argv += ["--mastered", str(files["m"]), "--rounds", f"{files['a']},{files['b']}"]
    assert run_cli([*argv, "--method", "osf", "--lr", "0.05", "--epochs", "1"]) == 0
    assert len(seen) == 2 and [s["share"] for s in seen] == [0.5, 0.6]
    two = yaml.safe_load((out / "rounds" / "02" / "config.yaml").read_text(encoding="utf-8"))
    assert two["train"]["osf"]["effective_rank"] == 0.6  # the round's record says what it preserved
    assert two["model"]["model"] == str((out / "rounds" / "01" / "model").resolve())

    original = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    ends = [load_file(str(out / "rounds" / f"{k:02d}" / "model" / "model.safetensors")) for k in (1, 2)]
    assert all(torch.equal(seen[0]["start"][n], original[n]) for n in seen[0]["start"])
    for n, w in seen[1]["start"].items():  # round 2 starts from round 1's merged weights
        assert torch.equal(w, ends[0][n]), n
    for (s, end), share in zip(zip(seen, ends, strict=True), (0.5, 0.6), strict=True):
        for n, w in s["start"].items():
            layer = s["layers"][n.removesuffix(".weight")]
            uh, vh = high(w, share)
            k = int(min(w.shape) * share)
            assert layer.effective_rank["default"] == k == uh.shape[1], n
            # PEFT's trainable part is exactly the complement of this round's own high subspace
            u_low = layer._osf_U_low_init["default"].double()
            assert u_low.shape[1] == min(w.shape) - k
            assert float((uh.T @ u_low).abs().max()) < ORTHOGONAL, n
            assert high_part(end[n] - w, uh, vh) < ORTHOGONAL, n  # and the round's update stays out of it
    # round 2's update is orthogonal to the subspace of its own start, not to the original weights' one
    for n in seen[1]["start"]:
        dw2 = ends[1][n] - ends[0][n]
        assert high_part(dw2, *high(ends[0][n], 0.6)) < ORTHOGONAL < 0.1 < high_part(dw2, *high(original[n], 0.6)), n
