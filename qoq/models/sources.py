"""Load the FP model to quantize: the embedded default, a .gguf file, a local HF folder or a hub id.

Every failure reaches the user as a one-line `QoqError` that names the fix. The architecture is
checked from the config (or the GGUF header) before any weights are read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qoq.checks import sha256_of_files
from qoq.errors import QoqError, arg, one_line
from qoq.hub import hub_reachable
from qoq.models import smollm2
from qoq.models.arch import ARCHITECTURES
from qoq.models.gguf_check import require_complete_gguf
from qoq.models.streaming import CheckpointReader, can_stream, empty_model
from qoq.state import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUPPORTED_ARCHITECTURES = {cls: cls.removesuffix("ForCausalLM") for cls in ARCHITECTURES.values()}
_SUPPORTED_TEXT = "qoq supports Llama, Mistral and Qwen2 models"
_FILE_EXTS = {".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".onnx", ".ggml",
              ".h5", ".msgpack", ".model", ".zip", ".tar", ".gz", ".tgz", ".npz", ".npy", ".pkl"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_RECORD = "qoq_gguf_source.json"
_CACHE_FORMAT = 2  # 2: the record holds the sha256 of the converted weights
_CACHE_WEIGHTS = "model.safetensors"
_CACHE_MAX_BYTES = 4 << 30  # converted GGUFs above this (fp32, ~1B params) are not cached on disk
DEFAULT_ALIAS = "default"


@dataclass
class LoadedModel:
    model: "PreTrainedModel"  # eval mode, on CPU, requested dtype, requires_grad False
    tokenizer: "PreTrainedTokenizerBase"
    source: str  # what the user asked for
    name: str  # short name for the default output folder
    source_sha256: str  # sha256 of the weight file(s) read
    architecture: str  # "Llama" | "Mistral" | "Qwen2"
    reload_spec: str  # a spec load_model() accepts later to reload the same FP model
    reader: CheckpointReader | None = None  # streamed: `model` holds no weights, they are read from here


def load_model(spec: str | None, dtype: torch.dtype = torch.float32, stream: bool = False) -> LoadedModel:
    """Load `spec` (None/"default" = the embedded SmolLM2-135M-Instruct) for quantization.

    spec: None or "default"; a `.gguf` file; a local HF folder with config.json; or a hub id.
    `stream`: an HF folder (or hub model) with safetensors weights comes without weights, with a reader
    for them (`LoadedModel.reader`); a GGUF file is always loaded whole.
    """
    try:
        return _load(spec, dtype, stream)
    except QoqError:
        raise
    except Exception as e:  # transformers / gguf / IO: one line for the user
        raise QoqError(one_line(f"could not load model '{spec if spec is not None else DEFAULT_ALIAS}': "
                                f"{type(e).__name__}: {e}")) from e


def load_reference_model(reload_spec: str, dtype: torch.dtype = torch.float16) -> LoadedModel:
    """Reload the FP model an artifact was made from (its recorded `reload_spec`)."""
    return load_model(reload_spec, dtype)


def model_name(spec: str | None) -> str:
    """The short name `load_model(spec)` will give the model (for the default output folder), without loading it."""
    if spec is None or str(spec).strip() in ("", DEFAULT_ALIAS):
        return smollm2.MODEL_NAME
    s = str(spec).strip()
    p = Path(s).expanduser()
    if p.is_dir():
        return p.resolve().name
    if p.is_file():
        return gguf_model_name(p.resolve())
    return s.split("/")[-1]


def gguf_model_name(path: Path) -> str:
    """The file name without its quantization suffix (`model.Q4_K_M.gguf` -> `model`)."""
    return re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", path.stem, flags=re.I) or path.stem


# --------------------------------------------------------------------------------------------- dispatch

def _load(spec: str | None, dtype: torch.dtype, stream: bool = False) -> LoadedModel:
    if not isinstance(dtype, torch.dtype):
        raise QoqError(f"dtype must be a torch.dtype, got {dtype!r}")
    if spec is None or str(spec).strip() in ("", DEFAULT_ALIAS):
        path = smollm2.default_gguf_path()
        lm = _load_gguf(path, dtype, source=smollm2.SOURCE_LABEL)
        lm.name = smollm2.MODEL_NAME
        lm.reload_spec = DEFAULT_ALIAS
        return lm
    s = str(spec).strip()
    p = Path(s).expanduser()
    if p.is_dir():
        return _load_folder(p, dtype, source=s, stream=stream)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(p, dtype, source=s)
        raise QoqError(f"model path '{s}' is a file, not a model; pass an existing HF folder (with config.json), "
                       "a .gguf file, or a hub id")
    if _looks_like_path(s):
        raise QoqError(f"model path '{s}' does not exist; pass an existing HF folder, a .gguf file, or a hub id")
    return _load_hub(s, dtype, stream)


def _looks_like_path(s: str) -> bool:
    if s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or s in (".", "..") or "\\" in s:
        return True
    if s.count("/") > 1 or Path(s).suffix.lower() in _FILE_EXTS:
        return True
    return not _HUB_ID.match(s)


# ---------------------------------------------------------------------------------------- local folder

def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QoqError(f"folder '{folder}' has no config.json; pass an HF model folder, a .gguf file, or a hub id")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QoqError(one_line(f"cannot read '{cfg_path}': {e}")) from e
    if not isinstance(cfg, dict):
        raise QoqError(f"'{cfg_path}' is not a JSON object")
    return cfg


def _check_architecture(cfg: dict, where: str) -> tuple[str, str]:
    """(class name, short name) of a config dict, or QoqError when unsupported."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not archs and cfg.get("model_type") in ARCHITECTURES:
        archs = [ARCHITECTURES[cfg["model_type"]]]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a, SUPPORTED_ARCHITECTURES[a]
    shown = archs[0] if archs else (cfg.get("model_type") or "unknown")
    raise QoqError(f"unsupported architecture '{shown}' in {where}; {_SUPPORTED_TEXT}")


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files:
        files = sorted(f for f in folder.glob("*.bin") if f.is_file() and f.name != "training_args.bin")
    if not files:
        raise QoqError(f"folder '{folder}' has no weights (*.safetensors or *.bin); pass a complete HF model folder")
    return files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _check_hf_config(folder: Path) -> None:
    """transformers' own validation of config.json, reported as the config's problem (not the tokenizer's)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise QoqError(one_line(f"'{folder / 'config.json'}' is not a valid model config: {type(e).__name__}: {e}; "
                                "fix it or pass a complete HF model folder")) from e


def _load_tokenizer(folder: Path, **kw):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise QoqError(f"'{folder}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
                       "the original model into it")
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as e:
        raise QoqError(one_line(f"could not load the tokenizer from '{folder}': {type(e).__name__}: {e}")) from e


def _finish(model, dtype: torch.dtype):
    model = model.to(device="cpu", dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_folder(folder: Path, dtype: torch.dtype, *, source: str, name: str | None = None,
                 source_sha256: str | None = None, reload_spec: str | None = None, stream: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    folder = folder.resolve()
    cfg = _read_config(folder)
    _, arch = _check_architecture(cfg, f"'{folder / 'config.json'}'")
    _check_hf_config(folder)
    files = _weight_files(folder)
    tokenizer = _load_tokenizer(folder)
    reader = None
    if stream and can_stream(folder):
        model, reader = empty_model(folder, dtype), CheckpointReader(folder, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), low_cpu_mem_usage=True, dtype=dtype)
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:  # config said one thing, transformers built another
        raise QoqError(f"unsupported architecture '{type(model).__name__}' in '{folder}'; {_SUPPORTED_TEXT}")
    if reader is None:
        model = _finish(model, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, name=name or folder.name,
                       source_sha256=source_sha256 or sha256_of_files(files), architecture=arch,
                       reload_spec=reload_spec or str(folder), reader=reader)


# ------------------------------------------------------------------------------------------------ GGUF

_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` from a GGUF header, reading only the metadata before it."""
    with open(path, "rb") as f:

        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise QoqError(f"'{path}' is not a valid GGUF file (truncated header)")
            return b

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def string() -> str:
            n = u64()
            if n > 1 << 24:
                raise QoqError(f"'{path}' is not a valid GGUF file (bad string length)")
            return read(n).decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            if vtype in _GGUF_FIXED:
                f.seek(_GGUF_FIXED[vtype], os.SEEK_CUR)
            elif vtype == 8:
                f.seek(u64(), os.SEEK_CUR)
            elif vtype == 9:
                etype, count = u32(), u64()
                if etype in _GGUF_FIXED:
                    f.seek(_GGUF_FIXED[etype] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise QoqError(f"'{path}' is not a valid GGUF file (unknown value type {vtype})")

        if read(4) != b"GGUF":
            raise QoqError(f"'{path}' is not a GGUF file (bad magic)")
        version = u32()
        if version not in (2, 3):
            raise QoqError(f"'{path}' is GGUF version {version}; only versions 2 and 3 are supported")
        _n_tensors, n_kv = u64(), u64()
        for _ in range(n_kv):
            key, vtype = string(), u32()
            if key == "general.architecture" and vtype == 8:
                return string()
            skip(vtype)
    raise QoqError(f"'{path}' has no general.architecture in its GGUF header")


def _gguf_cache_dir(sha: str) -> Path:
    return cache_dir() / "gguf-hf" / sha[:32]


def _gguf_cache_valid(folder: Path, sha: str) -> bool:
    return _gguf_cache_problem(folder, sha) is None


def _gguf_cache_problem(folder: Path, sha: str) -> str | None:
    """Why the converted folder cannot be used: "stale" (another GGUF, format or transformers version:
    rebuilt silently), a description of the damage, or None when it is sound."""
    import transformers

    try:
        rec = json.loads((folder / _CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "stale"
    if not (isinstance(rec, dict) and rec.get("gguf_sha256") == sha and rec.get("format") == _CACHE_FORMAT
            and rec.get("transformers") == transformers.__version__):
        return "stale"
    weights = folder / _CACHE_WEIGHTS
    if not weights.is_file():
        return f"{_CACHE_WEIGHTS} is missing"
    if smollm2.verified_sha256(weights) != rec.get("weights_sha256"):
        return f"{_CACHE_WEIGHTS} does not match the sha256 recorded when it was written"
    return None


def _cached_gguf_model(cache: Path, sha: str, dtype: torch.dtype, common: dict) -> LoadedModel | None:
    """The converted model from the cache, or None when it must be (re)built; says so when it was damaged."""
    if not cache.exists():
        return None
    problem = _gguf_cache_problem(cache, sha)
    if problem is None:
        try:
            return _load_folder(cache, dtype, **common)
        except Exception as e:  # noqa: BLE001 - any unreadable cache file: rebuild it
            problem = one_line(f"{type(e).__name__}: {e}", 200)
    if problem != "stale":
        smollm2._console().print(f"the converted-model cache {cache} is damaged ({problem}); rebuilding it from "
                                 "the GGUF (QOQ_NO_GGUF_CACHE=1 turns this cache off)", highlight=False,
                                 soft_wrap=True)
    return None


def _load_gguf(path: Path, dtype: torch.dtype, *, source: str) -> LoadedModel:
    """Load a GGUF through transformers (dequantized to fp32), caching the converted HF folder.

    Converting costs ~15-20 s even for a 135M model (the gguf reader parses the whole tokenizer
    metadata twice); the cached safetensors folder loads in ~2.5 s. Only models up to 4 GiB in fp32
    (~1B parameters) are cached. Set QOQ_NO_GGUF_CACHE=1 to skip it.
    """
    path = path.expanduser().resolve()
    garch = gguf_architecture(path)
    if garch not in ARCHITECTURES:
        raise QoqError(f"unsupported architecture '{garch}' in GGUF '{path.name}'; {_SUPPORTED_TEXT}")
    sha = sha256_of_files([path])
    name = gguf_model_name(path)
    common = dict(source=source, name=name, source_sha256=sha, reload_spec=str(path))
    use_cache = os.environ.get("QOQ_NO_GGUF_CACHE", "").strip().lower() not in ("1", "true", "yes", "on")
    cache = _gguf_cache_dir(sha)
    if use_cache:
        cached = _cached_gguf_model(cache, sha, dtype, common)
        if cached is not None:
            return cached

    require_complete_gguf(path)
    model, tokenizer = _convert_gguf(path)
    cls_name = type(model).__name__
    if cls_name not in SUPPORTED_ARCHITECTURES:
        raise QoqError(f"unsupported architecture '{cls_name}' in GGUF '{path.name}'; {_SUPPORTED_TEXT}")
    # Drop the "this is a gguf-quantized model" markers: the weights are plain dequantized fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [cls_name]
    for attr, val in (("hf_quantizer", None), ("is_quantized", False)):
        if hasattr(model, attr):
            try:
                setattr(model, attr, val)
            except Exception:
                pass
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    if use_cache and fp32_bytes <= _CACHE_MAX_BYTES and _write_gguf_cache(model, tokenizer, cache, sha, path):
        del model
        return _load_folder(cache, dtype, **common)
    return LoadedModel(model=_finish(model, dtype), tokenizer=tokenizer, architecture=SUPPORTED_ARCHITECTURES[cls_name],
                       **common)


def _convert_gguf(path: Path):
    """(fp32 model, tokenizer) dequantized from the GGUF by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_bar_follows_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF dequantization draws a raw tqdm bar that ignores its own progress-bar switch (which
    `qoq` turns off unless --verbose): make that bar obey the switch."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=not hf_logging.is_progress_bar_enabled())
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _write_gguf_cache(model, tokenizer, cache: Path, sha: str, gguf_path: Path) -> bool:
    """Write the converted model as an HF folder (fp32 safetensors, tokenizer) atomically. Best effort."""
    import transformers
    from safetensors.torch import save_file

    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        os.chmod(tmp, 0o755)
        seen: set[tuple[int, int]] = set()
        tensors = {}
        for k, v in model.state_dict().items():  # tied weights: keep the first name (embed_tokens)
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            tensors[k] = v.detach().contiguous()
        save_file(tensors, str(tmp / _CACHE_WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            try:
                model.generation_config.save_pretrained(str(tmp))
            except Exception:
                pass
        tokenizer.save_pretrained(str(tmp))
        (tmp / _CACHE_RECORD).write_text(json.dumps({
            "format": _CACHE_FORMAT, "gguf_sha256": sha, "gguf_path": str(gguf_path),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "weights_sha256": sha256_of_files([tmp / _CACHE_WEIGHTS]),
            "note": "qoq's fp32 conversion of the GGUF above; safe to delete",
        }, indent=2) + "\n", encoding="utf-8")
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        tmp = None
        return True
    except Exception:
        return _gguf_cache_valid(cache, sha)  # e.g. another process won the race
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- hub

_WANTED_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")  # never remote code


def _load_hub(repo_id: str, dtype: torch.dtype, stream: bool = False) -> LoadedModel:
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    name = repo_id.split("/")[-1]
    if not hub_reachable():
        try:  # downloaded before? then the HF cache is enough
            local = snapshot_download(repo_id, local_files_only=True)
        except Exception:
            raise QoqError(f"cannot reach the Hugging Face hub to download '{repo_id}' (offline?); download it "
                           f"elsewhere and pass the local folder as {arg('model', 'PATH')}") from None
        return _load_folder(Path(local), dtype, source=repo_id, name=name, reload_spec=repo_id, stream=stream)
    try:
        cfg_file = hf_hub_download(repo_id, "config.json")
        _check_architecture(json.loads(Path(cfg_file).read_text(encoding="utf-8")), f"hub model '{repo_id}'")
        files = [f for f in list_repo_files(repo_id) if "/" not in f]
        wanted = [f for f in files if f.endswith(_WANTED_SUFFIXES)]
        if not any(f.endswith(".safetensors") for f in files):
            wanted += [f for f in files if f.endswith(".bin") and f != "training_args.bin"]
        local = snapshot_download(repo_id, allow_patterns=wanted)
    except GatedRepoError as e:
        raise QoqError(f"hub model '{repo_id}' is gated; accept its license on huggingface.co and log in "
                       f"(huggingface-cli login or HF_TOKEN), or pass a local folder as {arg('model', 'PATH')}") from e
    except RepositoryNotFoundError as e:
        raise QoqError(f"hub model '{repo_id}' not found (or private: log in with huggingface-cli login or "
                       f"HF_TOKEN); check the id or pass a local folder as {arg('model', 'PATH')}") from e
    return _load_folder(Path(local), dtype, source=repo_id, name=name, reload_spec=repo_id, stream=stream)


