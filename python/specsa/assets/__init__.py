"""Package data: `tinytok/` is the small BPE tokenizer (512 tokens) of the embedded tiny
default model, shipped so `python -m specsa demo` works without network."""
