"""Write a deterministic tiny random Llama/Qwen2 checkpoint (HF folder + bundled tokenizer).

    python scripts/make_tiny_checkpoint.py --out models/tiny-llama
    python scripts/make_tiny_checkpoint.py --out models/tiny-qwen2-native --kind qwen2 \
        --native --kv-heads 1 --nsa block=16,stride=8,select=32,topn=4,window=64

Same arguments -> same bytes. --native adds the NSA gate and learned-compression weights
(docs/CONTRACTS.md section 5) and sets combine=gated, compress=learned.
"""
from __future__ import annotations

import argparse
import sys

from specsa.config import ConfigError
from specsa.model.tiny import TINY_NSA, build_tiny


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--native", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="G = heads / kv-heads")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--vocab", type=int, default=512, help=">= 512 (the bundled tokenizer)")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--nsa", default=None, help="NSA geometry overrides, key=value,...")
    a = p.parse_args(argv)
    try:
        nsa = TINY_NSA.with_overrides(a.nsa)
    except ConfigError as e:
        p.error(str(e))
    if a.heads % a.kv_heads:
        p.error(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    out = build_tiny(a.out, kind=a.kind, native=a.native, seed=a.seed, shards=a.shards, nsa=nsa,
                     num_layers=a.layers, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                     vocab_size=a.vocab, rope_theta=a.rope_theta, tie_word_embeddings=a.tie)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
