"""Slow, written-out reference computations shared by several tests (float64 loops)."""
import math


def add_image_attention(out, q, tokens, to_k_ip, to_v_ip, heads, scale=1.0):
    """out[r] += scale * softmax(q_r K_r^T / sqrt(d)) V_r per head, with K_r, V_r row r's image
    tokens through to_k_ip / to_v_ip: IP-Adapter's image attention, one row and head at a time.
    out: float64 (rows, L, C), changed in place and returned; tokens: (rows, T, C_ctx) float64."""
    d = q.shape[-1] // heads
    for r in range(out.shape[0]):
        keys, values = tokens[r] @ to_k_ip.T, tokens[r] @ to_v_ip.T
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            logits = q[r, :, sl].double() @ keys[:, sl].T / math.sqrt(d)
            out[r, :, sl] += scale * logits.softmax(-1) @ values[:, sl]
    return out
