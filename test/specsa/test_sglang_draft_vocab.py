"""A separate draft model with a reduced vocabulary (`--speculative-token-map`,
sglang_plugin/draft_vocab.py): the draft's LM head keeps only the hot rows, the output stays the
target's (greedy equals the runtime), and bad maps are rejected with the reason."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from specsa.config import ConfigError  # noqa: E402
from specsa.sglang_plugin.draft_vocab import restrict_draft_head  # noqa: E402


class _Model:
    """get/set_embed_and_head as SGLang's Llama / Qwen2 classes have them."""

    def __init__(self, vocab: int, hidden: int, tied: bool):
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden), requires_grad=False)
        self.head = self.embed if tied else torch.nn.Parameter(torch.randn(vocab, hidden),
                                                               requires_grad=False)

    def get_embed_and_head(self):
        return self.embed, self.head

    def set_embed_and_head(self, embed, head):
        self.embed, self.head = embed, head


@pytest.mark.parametrize("tied", [False, True])
def test_head_keeps_the_hot_rows_and_embeddings_stay_whole(tied):
    m = _Model(50, 8, tied)
    embed0, head0 = m.embed.data.clone(), m.head.data.clone()
    hot = torch.tensor([7, 3, 41, 0])
    out = restrict_draft_head(SimpleNamespace(model=m, tp_size=1), hot)
    assert out.tolist() == [7, 3, 41, 0] and out.dtype == torch.int64
    assert torch.equal(m.head.data, head0[hot])
    assert torch.equal(m.embed.data, embed0)         # tied: the embedding table is not cut


@pytest.mark.parametrize("hot, msg", [
    ([], "non-empty"), ([1, 50], r"within the draft's vocabulary \[0, 50\)"), ([-1], "within"),
    ([3, 3], "distinct")])
def test_bad_maps_are_rejected(hot, msg):
    m = _Model(50, 8, False)
    with pytest.raises(ConfigError, match=msg):
        restrict_draft_head(SimpleNamespace(model=m, tp_size=1), torch.tensor(hot, dtype=torch.long))
    assert m.head.shape[0] == 50                      # nothing changed


def test_sharded_or_unsupported_drafts_are_rejected():
    with pytest.raises(ConfigError, match="tensor-parallel size 1"):
        restrict_draft_head(SimpleNamespace(model=_Model(50, 8, False), tp_size=2),
                            torch.tensor([1]))
    with pytest.raises(ConfigError, match="class object cannot have its LM head replaced"):
        restrict_draft_head(SimpleNamespace(model=object(), tp_size=1), torch.tensor([1]))


@pytest.mark.slow
def test_server_with_token_map_equals_runtime(tmp_path):
    """A CPU SGLang server: chain with a separate 1-layer draft and a token map of 300 of the
    tiny vocabulary's ids; greedy output equals the standalone runtime (AR NSA)."""
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    from specsa.sglang_plugin.harness import free_port, launch_server

    target = build_tiny(tmp_path / "target", kind="llama", seed=0)
    draft = build_tiny(tmp_path / "draft", kind="llama", seed=0, num_layers=1)
    vocab = load_model(target).cfg.vocab_size
    hot = sorted(torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:300].tolist())
    torch.save(hot, tmp_path / "hot.pt")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (180, 97)]
    ref = [r.tokens for r in generate(load_model(target), prompts,
                                      SamplingConfig(max_new_tokens=16))[0]]
    args = ["--speculative-algo", "specsa", "--speculative-draft-model-path", str(draft),
            "--speculative-num-steps", "3", "--speculative-token-map", str(tmp_path / "hot.pt")]
    with launch_server(str(target), free_port(), args) as srv:
        for p, r in zip(prompts, ref):
            assert srv.generate(input_ids=p, max_new_tokens=16)["output_ids"] == r
        assert f"draft LM head restricted to 300 of {vocab} tokens" in srv.log_path.read_text()
