"""Generate the CLIP BPE tokenizer files (vocab.json, merges.txt) that
`CLIPTokenizer.from_pretrained` reads, from CLIP's own BPE merge list.

Why: single-file checkpoints carry no tokenizer, and this machine cannot
download `openai/clip-vit-large-patch14`. The PyPI package `open_clip_torch`
ships OpenAI's `bpe_simple_vocab_16e6.txt.gz`; the HF files are derived from it
exactly the way CLIP's `SimpleTokenizer.__init__` builds its encoder:

    vocab  = 256 byte symbols + the same with "</w>" + one token per merge
             (the first 49152 - 256 - 2 merges) + <|startoftext|>, <|endoftext|>
    merges = "#version: 0.2" + those merges, one "a b" pair per line

(49408 tokens). SD 1.x, SD 2.x and both SDXL tokenizers share this vocabulary;
they differ only in the pad token, which `core.loading` sets.

Run once (open_clip_torch is NOT a dependency; install it aside, e.g.
`pip install --no-deps --target /tmp/oc open_clip_torch`):

    python core/configs/make_tokenizer.py [path/to/bpe_simple_vocab_16e6.txt.gz]

Writes core/configs/clip_tokenizer/{vocab.json,merges.txt,tokenizer_config.json,
special_tokens_map.json}.
"""
import gzip
import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (same order as CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def default_bpe() -> Path:
    from open_clip.tokenizer import default_bpe as oc_default_bpe  # only needed here
    return Path(oc_default_bpe())


def main() -> None:
    bpe_path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_bpe()
    vocab, merges = build(bpe_path)
    assert len(vocab) == 49408, len(vocab)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT_DIR / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **SPECIAL}
    (OUT_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (OUT_DIR / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT_DIR}")


if __name__ == "__main__":
    main()
