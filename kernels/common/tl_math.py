"""Small Triton device helpers shared by the NSA kernels."""
import triton
import triton.language as tl


@triton.jit
def dot_f32(a, b, F32: tl.constexpr):
    # F32: fp32 inputs (ieee, no tf32, so selections match the fp32 reference) or the CPU
    # interpreter (whose bf16 dot is wrong); else tensor-core MMA with fp32 accumulation
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def online_step(b_m, b_l, b_acc, b_s, m_s, b_v, F32: tl.constexpr):
    # one online-softmax step (log2 units) of a [rows, keys] logit tile b_s under mask m_s;
    # rows with nothing yet keep m = -inf (and weight 0) instead of producing NaN
    b_s = tl.where(m_s, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
    b_p = tl.exp2(b_s - b_ms[:, None])
    b_a = tl.exp2(b_m - b_ms)
    b_l = b_l * b_a + tl.sum(b_p, 1)
    b_acc = b_acc * b_a[:, None] + dot_f32(b_p.to(b_v.dtype), b_v, F32)
    return b_mn, b_l, b_acc


@triton.jit
def merge_state(b_m, b_l, b_acc, b_pl, b_po):
    # fold a normalised partial (o [rows, D], lse [rows], log2 units) into a running
    # (m, l, acc); a partial with lse = -inf (no key) gets weight 0, never NaN
    b_mn = tl.maximum(b_m, b_pl)
    b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
    b_a = tl.exp2(b_m - b_ms)
    b_w = tl.exp2(b_pl - b_ms)
    b_l = b_l * b_a + b_w
    b_acc = b_acc * b_a[:, None] + b_w[:, None] * b_po
    return b_mn, b_l, b_acc


@triton.jit
def load_rows(ptr, o_row, m_row, D: tl.constexpr, BD: tl.constexpr):
    # rows o_row of a row-major [*, D] tensor as a [rows, BD] tile (masked rows and the padded
    # columns read 0); the column offsets / mask come back for the caller's later accesses
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(ptr + o_row[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :], other=0.)
    return b_x, o_d, m_d


@triton.jit
def load_q_heads(q, i_q, i_h, HQ: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                 D: tl.constexpr, BD: tl.constexpr):
    # the G query heads of KV head i_h in query row i_q: a [BG, BD] tile (BG >= 16 for the MMA,
    # padded heads masked) -> (tile, flat head rows [BG], head mask, column offsets / mask)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_hq = i_q * HQ + i_h * G + o_g
    b_q, o_d, m_d = load_rows(q, o_hq, m_g, D, BD)
    return b_q, o_hq, m_g, o_d, m_d


@triton.jit
def overlap(o_start, o_blk, L: tl.constexpr, LS: tl.constexpr, DS: tl.constexpr):
    # |[start, start+l) intersect [j*l', (j+1)*l')| / d (Eq. 9 weight), exact integer as fp32
    lo = tl.maximum(o_start, o_blk * LS)
    hi = tl.minimum(o_start + L, (o_blk + 1) * LS)
    return (tl.maximum(hi - lo, 0) // DS).to(tl.float32)


# The kernels keep softmax statistics in log2 units (exp2 is the fast path on the GPU):
# exp(x) = exp2(x * LOG2E), and an lse in log2 units times LN2 is the natural-log lse.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Finite "no max yet" start of a running max: exp2(NEG_BIG - m) = 0 and NEG_BIG - NEG_BIG = 0,
# so a row that sees no key yields 0 weights, never NaN (an -inf start gives -inf - -inf).
NEG_BIG = tl.constexpr(-1.0e30)
