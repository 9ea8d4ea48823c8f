"""Offline stand-ins for the tiny Hub repositories diffusers' fast pipeline tests load.

diffusers' fast tests build their denoisers, VAEs and text encoders from small configs
in code, but take tokenizers (and the T5 config) from the Hub:
``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")``,
``AutoConfig.from_pretrained("hf-internal-testing/tiny-random-t5")``, and so on. This
machine (and CI) cannot download them, so this module writes a Hugging Face Hub cache
folder (the layout ``huggingface_hub`` reads in offline mode:
``models--<org>--<name>/refs/main`` and ``snapshots/<rev>/...``) holding a stand-in for
each repository: a tokenizer built from a small generated vocabulary, a config of the
same shape as the original, and weights initialised from a fixed seed. With
``HF_HUB_CACHE`` pointing at that folder and ``HF_HUB_OFFLINE=1``, transformers loads them
through its ordinary ``from_pretrained`` code, nothing patched.

The stand-ins are not the original files: tests that compare generated pixels with
hard-coded expected slices fail with them, with and without fxcache alike (the suite
runner counts "passes without fxcache" as the baseline).

    python hub_standins.py CACHE_DIR      # writes CACHE_DIR/models--... (idempotent)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

# bump when the stand-ins change: the folder is rebuilt when its stamp differs
VERSION = "3"
REVISION = hashlib.sha1(f"fxcache-diffusers-suite-standins-{VERSION}".encode()).hexdigest()

_WORDS = (
    "a painting of squirrel eating burger photo cat dog the an in on with and red blue green "
    "tree house high quality detailed image picture man woman astronaut riding horse sky "
    "sunset city night portrait cute small big"
).split()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _repo_dir(cache: Path, repo_id: str) -> Path:
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / REVISION
    if snap.exists():
        shutil.rmtree(snap)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    return snap


def _clip(cache: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    snap = _repo_dir(cache, "hf-internal-testing/tiny-random-clip")
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    tok.save_pretrained(snap)

    # the shape of hf-internal-testing/tiny-random-clip: hidden 32, 5 layers, 4 heads
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=5, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                           image_size=30, patch_size=2, projection_dim=32),
        projection_dim=32,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(snap)


def _t5(cache: Path) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    snap = _repo_dir(cache, "hf-internal-testing/tiny-random-t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - i * 0.01) for i, w in enumerate(_WORDS)]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"]
    pieces += [("▁" + c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=100)
    tok.model_max_length = 512
    tok.save_pretrained(snap)

    # the shape of hf-internal-testing/tiny-random-t5 (d_model 32: the tests' caption
    # channels); dropout 0 so that a model built from it in training mode is deterministic
    config = T5Config(
        vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, initializer_factor=0.002,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    assert len(tok) <= config.vocab_size, (len(tok), config.vocab_size)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(snap)


def _gemma(cache: Path) -> None:
    from transformers import GemmaConfig, GemmaTokenizer

    snap = _repo_dir(cache, "hf-internal-testing/dummy-gemma")
    # Sana's tests build Gemma2 text encoders with vocab_size=8: every id must be below 8
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "▁a": 6, "e": 7}
    tok = GemmaTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 2048
    tok.save_pretrained(snap)
    GemmaConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4).save_pretrained(snap)
    ids = tok("A painting of a squirrel eating a burger")["input_ids"]
    assert max(ids) < 8, ids


def _qwen2vl(cache: Path) -> None:
    from transformers import Qwen2Tokenizer

    snap = _repo_dir(cache, "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration")
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tok.model_max_length = 32768
    tok.save_pretrained(snap)


BUILDERS = {
    "hf-internal-testing/tiny-random-clip": _clip,
    "hf-internal-testing/tiny-random-t5": _t5,
    "hf-internal-testing/dummy-gemma": _gemma,
    "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration": _qwen2vl,
}


def build(cache: str | os.PathLike) -> Path:
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "fxcache-standins.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        return cache
    for builder in BUILDERS.values():
        builder(cache)
    stamp.write_text(json.dumps({"version": VERSION, "repos": sorted(BUILDERS)}))
    return cache


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: hub_standins.py CACHE_DIR")
    print(build(sys.argv[1]))
