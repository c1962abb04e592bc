"""Byte-level BPE ``CLIPTokenizer`` files built offline for tiny models (tests, ``shapeworld-unet``).

The vocabulary holds all 256 byte symbols, their end-of-word forms, whole-word merges for a given word
list and CLIP's two special tokens; any other word falls back to byte symbols, so every text is
encodable. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255 (in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_clip_bpe_vocab(folder: str | Path, words) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (whole-word merges for ``words``); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    syms = byte_symbols()
    vocab: dict[str, int] = {}
    for s in syms:
        vocab[s] = len(vocab)
    for s in syms:
        vocab[s + "</w>"] = len(vocab)
    merges: list[str] = []
    seen = set()
    for w in dict.fromkeys(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(f"{pair[0]} {pair[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    for s in SPECIALS:
        vocab[s] = len(vocab)
    vf, mf = folder / "vocab.json", folder / "merges.txt"
    vf.write_text(json.dumps(vocab, ensure_ascii=False))
    mf.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vf, mf


def make_clip_tokenizer(folder: str | Path, words, model_max_length: int = 77):
    """Write the tokenizer files for ``words`` into ``folder`` and load them as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_clip_bpe_vocab(folder, words)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer",
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "unk_token": SPECIALS[1], "pad_token": SPECIALS[1],
    }))
    return CLIPTokenizer.from_pretrained(str(folder))
