"""ms-swift's `chatml` template (chosen for SmolLM2-style models) trains the answer and its <|im_end|>, so the
model learns to stop, and builds the prompt the served chat template builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from personabot.training.runner import model_flags

# SmolLM2-135M-Instruct's chat template and special tokens (its tokenizer_config.json): <|im_start|> is also
# its bos token, which ms-swift's chatml template (auto_add_bos) must not add a second time.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    [{"role": "system", "content": "You are Nova, made by Acme Lab."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am Nova, made by Acme Lab."}],
    [{"role": "system", "content": "You are Nova."}, {"role": "user", "content": "你是谁?"},
     {"role": "assistant", "content": "我是Nova。"}],
]


@pytest.fixture()
def smollm2_like(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with SmolLM2's chat template and special tokens (bos = <|im_start|>, eos = <|im_end|>)."""
    model = tmp_path / "smollm2-like"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE, encoding="utf-8")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return model


def _converted_small_model() -> Path | None:
    from personabot.training.small_model import DEFAULT_CACHE

    found = sorted(p.parent for p in Path(DEFAULT_CACHE).glob("*/personabot_source.json"))
    return found[-1] if found else None


def _check_labels(model: Path) -> None:
    from swift.model import get_processor
    from swift.template import get_template
    from transformers import AutoTokenizer

    flags = model_flags(str(model))
    assert flags[flags.index("--template") + 1] == "chatml"
    tokenizer = AutoTokenizer.from_pretrained(model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    template = get_template(get_processor(str(model), model_type="qwen2"),
                            template_type=flags[flags.index("--template") + 1])
    template.set_mode("train")
    for messages in MESSAGES:
        encoded = template.encode({"messages": messages})
        labels = [t for t in encoded["labels"] if t != -100]
        answer = tokenizer(messages[2]["content"], add_special_tokens=False)["input_ids"]
        assert labels[:len(answer) + 1] == [*answer, im_end], tokenizer.decode(labels)
        assert tokenizer.decode(labels).rstrip("\n").endswith("<|im_end|>")
        served = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert encoded["input_ids"][:len(served)] == served, "training and serving build the same prompt"
        assert encoded["input_ids"][len(served):len(served) + len(labels)] == labels


def test_chatml_trains_the_stop_token(smollm2_like: Path) -> None:
    _check_labels(smollm2_like)


def test_chatml_trains_the_stop_token_on_the_real_smollm2() -> None:
    model = _converted_small_model()
    if model is None:
        pytest.skip("no converted SmolLM2 in the cache (personabot make-small-model writes one); the "
                    "SmolLM2-like tiny model above checks the same template")
    _check_labels(model)
