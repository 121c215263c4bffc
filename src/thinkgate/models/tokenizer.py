"""The tokenizer as the engine and API see it: a `tokenizers.Tokenizer` plus the chat template and ids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen's pre-tokenizer split pattern (digits one at a time).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_byte_level(bpe: models.BPE) -> Tokenizer:
    """`bpe` inside Qwen's pipeline, as its tokenizer.json has it: NFC normaliser, Qwen's split, byte-level
    pieces and decoder, no BOS/EOS added (GGUF vocabularies and the test tokenizer are built on it)."""
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


@dataclass
class ModelTokenizer:
    tok: Tokenizer
    chat_template: str | None = None
    eos_token: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self):
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._id_to_bytes: dict[int, bytes] = {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes one token stands for (byte-level BPE pieces map back to bytes)."""
        b = self._id_to_bytes.get(i)
        if b is None:
            piece = self.tok.id_to_token(i)
            if piece is None:
                b = b""
            elif i in self._added_ids():
                b = piece.encode("utf-8")
            else:
                b = bytes(_BYTE_DECODER.get(c, 0) for c in piece)
            self._id_to_bytes[i] = b
        return b

    def _added_ids(self) -> set[int]:
        if not hasattr(self, "_added"):
            self._added = set(self.tok.get_added_tokens_decoder().keys())
        return self._added

    @classmethod
    def from_dir(cls, path: Path) -> ModelTokenizer:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        eos = cfg.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        special = frozenset(int(k) for k, v in (cfg.get("added_tokens_decoder") or {}).items() if v.get("special"))
        if not special:
            special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        return cls(tok=tok, chat_template=template, eos_token=eos, special_ids=special)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
