"""EAGLE and EAGLE-3 draft heads for the standalone runtime (docs/DESIGN.md section 8).

An EAGLE head is a one-layer (sometimes a few layers) transformer that drafts from the
target's hidden states. Its draft row at position p reads the token at p + 1 and a feature of
position p, and predicts the token at p + 2:

- EAGLE (SGLang `LlamaForCausalLMEagle` / `Qwen2ForCausalLMEagle`): feature = the target's
  final normed hidden state (the LM head's input); x = fc([embed(token), feature]); decoder
  layers (layer 0 without input norm); output x + residual, no final norm, into the target's
  LM head. The embedding and LM head are the target's.
- EAGLE-3 (SGLang `LlamaForCausalLMEagle3`): feature = three target layer outputs (low, mid,
  high; `eagle_config.eagle_aux_hidden_state_layer_ids`, default SGLang's) concatenated,
  projected by fc; layer 0 attends over [input_norm(embed), hidden_norm(x)] (q/k/v from 2H);
  final norm; LM head over `draft_vocab_size` hot tokens mapped to target ids with `d2t`
  (or the target's head when the checkpoint has none). The embedding is the target's.
Deeper draft rows (draft tokens) take the head's own output hidden state of their parent
row as the feature, as in SGLang's multi-step draft.

The math follows SGLang 0.5.17's classes line by line (residual adds and norms in the same
places), so a head drafts the same tokens in both engines. The head attends densely over its
own rows (`HeadCache`: per request K/V of the committed rows, no paging); trees use ancestor
masks like the target's verification. Weight names: SGLang's loaders' (with or without a
`model.` prefix; `midlayer.` = `layers.0.`, `aux_norm_low|mid|high` = `fc_norm.0|1|2`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .block import BlockError, BlockInput, as_list, normalise_parents
from .config import ModelConfig, ModelConfigError
from .decoder import MLP, NSADecoder, RMSNorm
from .load import LoadError, read_json, read_weights
from .placement import WeightPlacement
from .rope import Rotary, apply_rotary

# architecture -> (kind, the base family whose geometry rules the head follows)
EAGLE_ARCHITECTURES = {"LlamaForCausalLMEagle": ("eagle", "LlamaForCausalLM"),
                       "Qwen2ForCausalLMEagle": ("eagle", "Qwen2ForCausalLM"),
                       "LlamaForCausalLMEagle3": ("eagle3", "LlamaForCausalLM")}


def eagle_kind(raw: dict) -> str | None:
    """"eagle" / "eagle3" for an EAGLE head's config.json, None otherwise."""
    archs = raw.get("architectures") or []
    return EAGLE_ARCHITECTURES.get(archs[0], (None,))[0] if archs else None


@dataclass(frozen=True)
class EagleConfig:
    kind: str                          # "eagle" | "eagle3"
    model: ModelConfig                 # the head's own geometry (vocab = the target's)
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...] | None   # EAGLE-3: target layers whose output is read
    num_aux: int                       # features concatenated into fc (1 for EAGLE)
    draft_vocab_size: int | None       # EAGLE-3 head's own vocabulary (None: the target's head)
    fc_bias: bool
    norm_before_fc: bool
    fc_norm: bool
    norm_output: bool

    @classmethod
    def from_hf(cls, raw: dict) -> "EagleConfig":
        archs = raw.get("architectures") or []
        if not archs or archs[0] not in EAGLE_ARCHITECTURES:
            raise ModelConfigError(
                f"config.json: architecture {archs[0] if archs else None!r} is not an EAGLE "
                f"head (supported: {', '.join(EAGLE_ARCHITECTURES)})")
        kind, base = EAGLE_ARCHITECTURES[archs[0]]
        model = ModelConfig.from_hf({**raw, "architectures": [base]})
        ec = raw.get("eagle_config") or {}
        ids = ec.get("eagle_aux_hidden_state_layer_ids")
        if kind == "eagle3":
            num_aux = raw.get("num_aux_hidden_states") or (len(ids) if ids else 3)
        else:
            num_aux = 1
        return cls(kind=kind, model=model,
                   target_hidden_size=int(raw.get("target_hidden_size") or model.hidden_size),
                   aux_layer_ids=None if ids is None else tuple(int(i) for i in ids),
                   num_aux=int(num_aux), draft_vocab_size=raw.get("draft_vocab_size"),
                   fc_bias=True if kind == "eagle" else bool(raw.get("bias", False)),
                   norm_before_fc=bool(ec.get("norm_before_fc", raw.get("norm_before_fc", False))),
                   fc_norm=bool(raw.get("fc_norm") or raw.get("use_aux_norm", False)),
                   norm_output=bool(raw.get("norm_output", False)))

    @property
    def own_embed(self) -> bool:
        """EAGLE-3 with a different hidden size keeps its own embedding (SGLang set_embed)."""
        return self.kind == "eagle3" and self.target_hidden_size != self.model.hidden_size

    @property
    def own_lm_head(self) -> bool:
        """EAGLE-3 with a draft vocabulary has its own LM head; otherwise the target's."""
        return (self.kind == "eagle3" and self.draft_vocab_size is not None
                and not self.model.tie_word_embeddings)

    def target_capture(self, target_layers: int) -> str | tuple[int, ...]:
        """What the target must return per token (`NSADecoder.set_hidden_capture`): "final"
        for EAGLE; for EAGLE-3 the layer inputs SGLang captures (`layers_to_capture`: the
        configured layer ids + 1, or 2, n // 2, n - 3), in layer order."""
        if self.kind == "eagle":
            return "final"
        n = target_layers
        inputs = ([i + 1 for i in self.aux_layer_ids] if self.aux_layer_ids is not None
                  else [2, n // 2, n - 3])
        layers = tuple(sorted(set(inputs)))
        if len(layers) != self.num_aux or not all(1 <= i < n for i in layers):
            src = ("eagle_config.eagle_aux_hidden_state_layer_ids "
                   f"{list(self.aux_layer_ids)}" if self.aux_layer_ids is not None
                   else f"SGLang's default layers {[i - 1 for i in inputs]}")
            raise ModelConfigError(
                f"EAGLE-3 head: {src} do not give {self.num_aux} distinct outputs of layers "
                f"0..{n - 2} of the {n}-layer target; set eagle_config."
                "eagle_aux_hidden_state_layer_ids in the head's config.json")
        return layers


class HeadCache:
    """K/V of each request's committed head rows (positions 0..length-1), every layer in one
    growable tensor [L, capacity, Hkv, D] per request. Dense attention reads all of them."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}

    def has(self, rid: int) -> bool:
        return rid in self._len

    def add_request(self, rid: int) -> None:
        L, h, d = self.shape
        self._k[rid] = torch.empty(L, 0, h, d, dtype=self.dtype, device=self.device)
        self._v[rid] = torch.empty_like(self._k[rid])
        self._len[rid] = 0

    def length(self, rid: int) -> int:
        return self._len[rid]

    def kv(self, rid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._len[rid]
        return self._k[rid][layer, :n], self._v[rid][layer, :n]

    def rollback(self, rid: int, new_len: int) -> None:
        self._len[rid] = min(self._len[rid], new_len)

    def free_request(self, rid: int) -> None:
        for d in (self._k, self._v, self._len):
            d.pop(rid, None)

    def append(self, rid: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [L, n, Hkv, D]: rows for positions length..length+n-1."""
        n0, n = self._len[rid], k.shape[1]
        cap = self._k[rid].shape[1]
        if n0 + n > cap:
            grow = max(n0 + n, 2 * cap, 64)
            for store in (self._k, self._v):
                old = store[rid]
                new = old.new_empty(old.shape[0], grow, *old.shape[2:])
                new[:, :n0] = old[:, :n0]
                store[rid] = new
        self._k[rid][:, n0:n0 + n] = k
        self._v[rid][:, n0:n0 + n] = v
        self._len[rid] = n0 + n


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int):
        super().__init__()
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.hq, self.hkv, self.head_dim, self.scale = hq, hkv, d, cfg.scale
        self.q_proj = nn.Linear(in_features, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(in_features, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(in_features, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache: HeadCache, layer: int, views):
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(n, self.hq, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.hkv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.hkv, self.head_dim)
        o = torch.empty_like(q)
        g = self.hq // self.hkv
        for rid, rows, mask in views:
            kc, vc = cache.kv(rid, layer)
            kk = torch.cat([kc, k[rows]]).float().repeat_interleave(g, dim=1)
            vv = torch.cat([vc, v[rows]]).float().repeat_interleave(g, dim=1)
            logits = torch.einsum("thd,nhd->htn", q[rows].float(), kk) * self.scale
            p = torch.softmax(logits.masked_fill(~mask[None], float("-inf")), dim=-1)
            o[rows] = torch.einsum("htn,nhd->thd", p, vv).to(o.dtype)
        return self.o_proj(o.view(n, -1)), k, v


class _Layer(nn.Module):
    def __init__(self, cfg: EagleConfig, index: int):
        super().__init__()
        m = cfg.model
        h, eps = m.hidden_size, m.rms_norm_eps
        eagle3 = cfg.kind == "eagle3"
        # EAGLE drops layer 0's input norm; EAGLE-3 normalises the embedding there and the
        # hidden stream with hidden_norm in every layer
        self.input_layernorm = (RMSNorm(h, eps) if (index > 0) != eagle3 else None)
        self.hidden_norm = RMSNorm(h, eps) if eagle3 else None
        self.self_attn = _Attention(m, 2 * h if eagle3 and index == 0 else h)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(m)


def _ancestors(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: row i sees node j iff j is i or an ancestor of i (parents[j] < j)."""
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


class EagleHead(WeightPlacement, nn.Module):
    """A loaded EAGLE / EAGLE-3 head bound to its target (embedding, LM head shared)."""

    def __init__(self, cfg: EagleConfig, target: NSADecoder):
        super().__init__()
        m = cfg.model
        self.cfg, self.kind = cfg, cfg.kind
        h = m.hidden_size
        fc_in = 2 * h if cfg.kind == "eagle" else cfg.target_hidden_size * cfg.num_aux
        self.fc = nn.Linear(fc_in, h, bias=cfg.fc_bias)
        self.input_norm = RMSNorm(fc_in, m.rms_norm_eps) if cfg.norm_before_fc else None
        self.fc_norm = (nn.ModuleList(RMSNorm(cfg.target_hidden_size, m.rms_norm_eps)
                                      for _ in range(cfg.num_aux)) if cfg.fc_norm else None)
        self.layers = nn.ModuleList(_Layer(cfg, i) for i in range(m.num_layers))
        self.norm = RMSNorm(h, m.rms_norm_eps) if cfg.kind == "eagle3" else None
        self.embed_tokens = nn.Embedding(m.vocab_size, h) if cfg.own_embed else None
        self.lm_head = (nn.Linear(h, cfg.draft_vocab_size, bias=False) if cfg.own_lm_head
                        else None)
        self.register_buffer("hot_ids", None, persistent=False)
        self.rotary = Rotary(m.rope, m.head_dim)
        self.vocab_size = target.cfg.vocab_size
        self._target = [target]      # shared embedding / LM head; not a submodule

    def _placement_weight(self) -> torch.Tensor:
        return self.fc.weight           # always there (the LM head may be the target's)

    def new_cache(self) -> HeadCache:
        m = self.cfg.model
        return HeadCache(m.num_layers, m.num_kv_heads, m.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, cache: HeadCache, blocks: Sequence[BlockInput], feature: torch.Tensor,
                *, last_only: bool = False, commit: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched head forward over new rows hanging below each request's committed rows.

        feature: [N, F] per row (target features: F = fc input width; draft rows: the head's
        own output hidden state of the parent row, F = hidden size). commit: append every
        row's K/V to `cache` (chain blocks only). Returns (logits [N, V] float32 over the
        TARGET vocabulary, -inf outside a hot-token head's vocabulary; hidden [N, H] for the
        next draft rows), or the last row per block with last_only."""
        dev = self.device
        views, toks, poss = self._block_views(cache, blocks)
        n = sum(rows.stop - rows.start for _, rows, _ in views)
        if feature.shape[0] != n:
            raise BlockError(f"EAGLE head: {feature.shape[0]} feature rows for {n} tokens")
        tokens = torch.tensor(toks, dtype=torch.int64, device=dev)
        cos, sin = self.rotary.cos_sin(torch.tensor(poss, dtype=torch.int64, device=dev),
                                       self.dtype)
        embed = (self.embed_tokens or self._target[0].model.embed_tokens)(tokens)
        out, ks, vs = self._layers(embed, self._fuse(embed, feature.to(self.dtype)), cos, sin,
                                   cache, views)
        if commit:
            k_all, v_all = torch.stack(ks), torch.stack(vs)
            for rid, rows, _ in views:
                cache.append(rid, k_all[:, rows], v_all[:, rows])
        if last_only:
            last = torch.tensor([rows.stop - 1 for _, rows, _ in views], device=dev)
            out = out[last]
        return self._logits(out)

    def _block_views(self, cache: HeadCache, blocks: Sequence[BlockInput]
                     ) -> tuple[list[tuple[int, slice, torch.Tensor]], list[int], list[int]]:
        """Per block (rid, its rows, [n, P + n] visibility mask: committed rows + ancestors),
        the flat token ids and their positions."""
        views, toks, poss = [], [], []
        off = 0
        for b in blocks:
            ids = as_list(b.tokens)
            if not ids:
                raise BlockError(f"EAGLE head: request {b.rid} has an empty block")
            par = list(normalise_parents(b.rid, len(ids), b.parents))
            depth = [0] * len(ids)
            for i, p in enumerate(par):
                depth[i] = 0 if p < 0 else depth[p] + 1
            P = cache.length(b.rid)
            mask = torch.cat([torch.ones(len(ids), P, dtype=torch.bool), _ancestors(par)], 1)
            views.append((b.rid, slice(off, off + len(ids)), mask.to(self.device)))
            toks.extend(ids)
            poss.extend(P + d for d in depth)
            off += len(ids)
        return views, toks, poss

    def _fuse(self, embed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The fc input stage: EAGLE fuses [embedding, feature]; EAGLE-3 projects the target's
        concatenated (normed) aux hidden states, draft rows (already hidden size) pass."""
        if self.kind == "eagle":
            return self.fc(torch.cat([embed, x], dim=-1))
        if x.shape[-1] != embed.shape[-1]:
            if self.input_norm is not None:
                x = self.input_norm(x)
            if self.fc_norm is not None:
                x = torch.cat([nrm(c) for nrm, c in
                               zip(self.fc_norm, x.chunk(self.cfg.num_aux, dim=-1))], dim=-1)
            x = self.fc(x)
        return x

    def _layers(self, embed, x, cos, sin, cache: HeadCache, views
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The decoder layers: (output hidden state before the final norm, K and V per layer)."""
        ks, vs = [], []
        residual = None
        for i, layer in enumerate(self.layers):
            if self.kind == "eagle3" and i == 0:
                residual = x
                h = torch.cat([layer.input_layernorm(embed), layer.hidden_norm(x)], dim=-1)
            elif residual is None:          # EAGLE layer 0: no input norm
                residual, h = x, x
            else:
                residual = x + residual
                h = (layer.hidden_norm or layer.input_layernorm)(residual)
            a, k, v = layer.self_attn(h, cos, sin, cache, i, views)
            residual = a + residual
            x = layer.mlp(layer.post_attention_layernorm(residual))
            ks.append(k)
            vs.append(v)
        return x + residual, ks, vs

    def _logits(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over the target vocabulary, float32; hidden state for the next draft rows)."""
        target = self._target[0]
        if self.kind == "eagle":
            return target.lm_head(out).float(), out
        normed = self.norm(out)
        hidden = normed if self.cfg.norm_output else out
        if self.lm_head is None:
            head = target.lm_head if not self.cfg.model.tie_word_embeddings else None
            logits = (head(normed) if head is not None
                      else normed @ (self.embed_tokens or target.model.embed_tokens).weight.t())
            return logits.float(), hidden
        small = self.lm_head(normed).float()
        if self.hot_ids is None:
            return small, hidden
        logits = small.new_full((small.shape[0], self.vocab_size), float("-inf"))
        logits[:, self.hot_ids] = small
        return logits, hidden


# -- loading ----------------------------------------------------------------------------------
_LEGACY = (("midlayer.", "layers.0."), ("aux_norm_low.", "fc_norm.0."),
           ("aux_norm_mid.", "fc_norm.1."), ("aux_norm_high.", "fc_norm.2."))


def is_eagle_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    return p.is_file() and eagle_kind(read_json(p)) is not None


def load_eagle_head(path: str | Path, target: NSADecoder) -> EagleHead:
    """Load an EAGLE / EAGLE-3 head folder for `target` (same device and dtype) and tell the
    target which hidden states to return (`set_hidden_capture`). LoadError / ModelConfigError
    name the file, tensor or field."""
    d = Path(path)
    if not d.is_dir():
        raise LoadError(f"EAGLE head folder {str(d)!r} does not exist")
    raw = read_json(d / "config.json")
    cfg = EagleConfig.from_hf(raw)
    t = target.cfg
    if cfg.model.vocab_size != t.vocab_size:
        raise LoadError(f"{d}: the head's vocab_size {cfg.model.vocab_size} differs from the "
                        f"target's {t.vocab_size}; an EAGLE head drafts in its target's vocabulary")
    if cfg.target_hidden_size != t.hidden_size:
        raise LoadError(f"{d}: the head reads target hidden states of size "
                        f"{cfg.target_hidden_size}, the target's are {t.hidden_size}")
    capture = cfg.target_capture(t.num_layers)
    weights = {}
    extra: dict[str, torch.Tensor] = {}
    for name, w in read_weights(d).items():
        name = re.sub(r"^model\.", "", name)
        for old, new in _LEGACY:
            name = name.replace(old, new)
        if name in ("d2t", "t2d"):
            extra[name] = w
        elif name == "embed_tokens.weight" and not cfg.own_embed:
            continue                          # replaced by the target's (as SGLang does)
        elif name == "lm_head.weight" and not cfg.own_lm_head:
            continue
        elif not name.endswith("rotary_emb.inv_freq"):
            weights[name] = w
    with torch.device("meta"):
        head = EagleHead(cfg, target)
    expected = {k: v for k, v in head.state_dict().items() if k != "hot_ids"}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise LoadError(f"{d}: missing weight {missing[0]!r} (expected shape "
                        f"{tuple(expected[missing[0]].shape)}; {len(missing)} missing)")
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        raise LoadError(f"{d}: unexpected weight {unexpected[0]!r} with shape "
                        f"{tuple(weights[unexpected[0]].shape)} ({len(unexpected)} unexpected; "
                        "is config.json the right one for these weights?)")
    for name, ref in expected.items():
        if tuple(weights[name].shape) != tuple(ref.shape):
            raise LoadError(f"{d}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                            f"expected {tuple(ref.shape)} from config.json")
    head.load_state_dict({k: weights[k].to(target.dtype) for k in expected}, strict=False,
                         assign=True)
    head.rotary = Rotary(cfg.model.rope, cfg.model.head_dim)
    head = head.to(target.device).eval()
    if cfg.own_lm_head and cfg.draft_vocab_size != t.vocab_size:
        if "d2t" not in extra:
            raise LoadError(f"{d}: draft_vocab_size {cfg.draft_vocab_size} < vocab_size "
                            f"{t.vocab_size} needs the d2t tensor (draft id -> target id)")
        d2t = extra["d2t"].to(torch.int64)
        if d2t.shape != (cfg.draft_vocab_size,):
            raise LoadError(f"{d}: d2t has shape {tuple(d2t.shape)}, expected "
                            f"({cfg.draft_vocab_size},)")
        hot = d2t + torch.arange(cfg.draft_vocab_size)
        if int(hot.min()) < 0 or int(hot.max()) >= t.vocab_size:
            raise LoadError(f"{d}: d2t maps draft ids outside the target vocabulary")
        head.hot_ids = hot.to(target.device)
    target.set_hidden_capture(capture)
    return head
