"""The tiny byte-level tokenizer files every tiny test checkpoint ships with."""

from __future__ import annotations

import json
from pathlib import Path

# A byte-level BPE with no merges: every byte is one token, 256 ids, plus two specials.
TINY_VOCAB = 320
TINY_EOS = 257


def write_tiny_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json with a ChatML-ish template, made with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])  # ids 256, 257
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
    )
