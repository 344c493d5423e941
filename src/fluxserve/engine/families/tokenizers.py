"""Tokenizers built offline for the tiny models and the full-size builders (no hub access needed).

transformers 5 tokenizers accept a ``vocab`` and ``merges`` directly, so each is a byte-level vocabulary with the
special tokens and chat-template shape the real one has: CLIP and T5 (FLUX.1), Qwen2 (Qwen-Image), Qwen3 (klein,
Z-Image) and Mistral 3 (FLUX.2 dev).
"""

from __future__ import annotations

from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte→printable-character map used by byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _byte_level_vocab() -> dict[str, int]:
    return {ch: i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))}


def clip_tokenizer(max_length: int = 77) -> Any:
    from transformers import CLIPTokenizer

    vocab = _byte_level_vocab()
    vocab.update({ch + "</w>": len(vocab) + i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))})
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512) -> Any:
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += [(ch, -3.0) for ch in printable] + [("▁" + ch, -2.5) for ch in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def qwen_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]})
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    return tok


def tiny_qwen25vl_config(tok: Any) -> Any:
    """A two-layer Qwen2.5-VL config whose special tokens are those of ``tok`` (Qwen-Image's text encoder)."""
    from transformers import Qwen2_5_VLConfig

    def ids(token: str) -> int:
        return int(tok.convert_tokens_to_ids(token))

    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tok),
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"),
    )


QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""The non-thinking part of Qwen3's chat template (what FLUX.2 klein and Z-Image render prompts with)."""


def qwen3_tokenizer() -> Any:
    """A byte-level tokenizer with Qwen3's special tokens and chat template, built offline."""
    tok = qwen_tokenizer()
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.pad_token = "<|endoftext|>"
    return tok


MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- for part in parts %}{{- part['text'] }}{%- endfor %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- for part in parts %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- else %}{{- '[IMG]' }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}"
    "{%- else %}{%- for part in parts %}{{- part['text'] }}{%- endfor %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)
"""The shape of Mistral Small 3's chat template: ``[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]``."""


def mistral_tokenizer() -> Any:
    """A byte-level fast tokenizer with Mistral 3's special tokens and chat template, built offline.

    It is the tokenizer half of FLUX.2 [dev]'s ``PixtralProcessor``: the processor itself cannot be built
    here (transformers 5 requires torchvision for it, which this project does not install).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in _byte_level_vocab():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": specials[4:]})
    tok.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tok
