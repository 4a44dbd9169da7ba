#!/usr/bin/env python3
"""A CPU model of csrc/cuda/linear_tensorcore.cu's index math, checked against float64.

    python tools/tensorcore_model.py        # a few shapes; exit 1 on a mismatch

The kernel's tiles, warp layout, ldmatrix addresses, split over output columns and epilogue
predicates are copied here, and the two warp instructions they feed are modelled from the PTX
ISA's fragment layouts (lane l, group g = l // 4, thread-in-group t = l % 4):
  ldmatrix .m8n8 .b16   lanes 8i..8i+7 give the row addresses of matrix i; lane l receives
                        (row g, columns 2t, 2t+1) of it, or with .trans (rows 2t, 2t+1, column g)
  mma .m16n8k16 row.col A regs (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
                        B regs (k 2t.., n g), (k 2t+8.., n g); C (g, 2t..), (g+8, 2t..)
in float64, so a wrong address, lane mapping or predicate shows as a wrong or missing (NaN)
element of y or t. It checks the arithmetic's plumbing without a GPU; rounding, cp.async,
barriers and races are the GPU's (tools/cuda_reach.py under compute-sanitizer). Keep in step
with the kernel: kBM, kBK, kBN, kPad, Smem<RP>::kBK1 and the split rule.
"""

from __future__ import annotations

import sys

import numpy as np

BM, BK, BN, PAD, WARPS = 64, 32, 128, 8, 8


def padded_rank(r: int) -> int:
    return 32 if r <= 32 else 64 if r <= 64 else 128 if r <= 128 else 256


def phase1_k_step(rp: int) -> int:
    return 128 if rp <= 32 else 64 if rp <= 128 else 32


def splits(m_blocks: int, n_tiles: int, sms: int) -> int:
    return min(n_tiles, -(-sms // m_blocks)) if 2 * m_blocks <= sms else 1


def ldmatrix(smem, addrs, count: int, trans: bool):
    """regs[lane][i] = the pair lane receives from matrix i (addrs[lane] = (row, col))."""
    regs = [[None] * count for _ in range(32)]
    for i in range(count):
        mat = np.array([smem[r, c : c + 8] for r, c in addrs[8 * i : 8 * i + 8]])
        for lane in range(32):
            g, t = divmod(lane, 4)
            regs[lane][i] = mat[g, 2 * t : 2 * t + 2] if not trans else mat[2 * t : 2 * t + 2, g]
    return regs


def a_fragments(smem, row0: int, col0: int):
    """The two m16 x k16 A fragments of a warp's 32 rows from row0, k from col0 (ldsm_x4)."""
    return [
        ldmatrix(smem, [(row0 + i * 16 + q % 16, col0 + q // 16 * 8) for q in range(32)], 4, False)
        for i in range(2)
    ]


def mma(acc, a, b, lo: int, hi: int):
    """acc[lane] += the m16n8k16 product of A fragments a and B fragments b[lane][lo], [hi]."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        k = slice(2 * t, 2 * t + 2)
        k8 = slice(2 * t + 8, 2 * t + 10)
        A[g, k], A[g + 8, k], A[g, k8], A[g + 8, k8] = a[lane]
        B[k, g], B[k8, g] = b[lane][lo], b[lane][hi]
    C = A @ B
    for lane in range(32):
        g, t = divmod(lane, 4)
        acc[lane] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


def tile(src, r0: int, c0: int, rows: int, cols: int, width: int):
    """A zero-filled (rows, width) shared-memory tile of src[r0:, c0:] (its first cols columns)."""
    out = np.zeros((rows, width))
    part = src[r0 : r0 + rows, c0 : c0 + cols]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def forward(x, V, U, s, bias, sms: int = 132, col_sums=None):
    """(y, t) as the kernel computes them (s None: a full core already folded into U). With
    col_sums, a (row blocks, in) array, also the grad kernel's column sums of x's tiles."""
    B, n = x.shape
    m, r = U.shape
    rp = padded_rank(r)
    bk1, nt1 = phase1_k_step(rp), rp // 32
    y, t_out = np.full((B, m), np.nan), np.full((B, r), np.nan)
    m_blocks, n_tiles = -(-B // BM), -(-m // BN)
    n_splits = splits(m_blocks, n_tiles, sms)
    scale = np.zeros(rp + 1)
    scale[:r] = s if s is not None else 1.0
    for bx in range(m_blocks):
        m0 = bx * BM
        for by in range(n_splits):
            acc1 = np.zeros((WARPS, 2, nt1, 32, 4))
            for k0 in range(0, n, bk1):
                xs = tile(x, m0, k0, BM, bk1, bk1 + PAD)
                vs = tile(V, k0, 0, bk1, rp, rp + PAD)
                if col_sums is not None and by == 0:
                    cols = min(bk1, n - k0)
                    col_sums[bx, k0 : k0 + cols] = xs[:, :cols].sum(0)
                for w in range(WARPS):
                    wm, wn = w % 2, w // 2
                    for kk in range(0, bk1, 16):
                        af = a_fragments(xs, wm * 32, kk)
                        krow = [kk + q % 8 + (q // 8) % 2 * 8 for q in range(32)]
                        step = 2 if nt1 % 2 == 0 else 1
                        for j in range(0, nt1, step):
                            col = wn * (rp // 4) + j * 8
                            if step == 2:
                                addrs = [(krow[q], col + q // 16 * 8) for q in range(32)]
                            else:
                                addrs = [(krow[q], col) for q in range(32)]
                            bf = ldmatrix(vs, addrs, 2 * step, True)
                            for i in range(2):
                                for jj in range(step):
                                    mma(acc1[w, i, j + jj], af[i], bf, 2 * jj, 2 * jj + 1)
            zs = np.zeros((BM, rp + PAD))
            for w in range(WARPS):
                wm, wn = w % 2, w // 2
                for i in range(2):
                    for j in range(nt1):
                        for lane in range(32):
                            col = wn * (rp // 4) + j * 8 + lane % 4 * 2
                            for h in range(2):
                                row = wm * 32 + i * 16 + lane // 4 + h * 8
                                t0, t1 = acc1[w, i, j, lane, 2 * h : 2 * h + 2]
                                zs[row, col : col + 2] = t0 * scale[col], t1 * scale[col + 1]
                                if by == 0 and m0 + row < B:
                                    for c, v in ((col, t0), (col + 1, t1)):
                                        if c < r:
                                            t_out[m0 + row, c] = v
            kc_count = rp // BK
            mine = -(-(n_tiles - by) // n_splits) if n_tiles > by else 0
            for it in range(mine * kc_count):
                kc, n0 = it % kc_count, (by + it // kc_count * n_splits) * BN
                if kc == 0:
                    acc2 = np.zeros((WARPS, 2, 4, 32, 4))
                us = tile(U, n0, kc * BK, BN, BK, BK + PAD)
                for w in range(WARPS):
                    wm, wn = w % 2, w // 2
                    for kk in range(0, BK, 16):
                        af = a_fragments(zs, wm * 32, kc * BK + kk)
                        for j in range(0, 4, 2):
                            addrs = [
                                (wn * 32 + j * 8 + q % 8 + q // 16 * 8, kk + (q // 8) % 2 * 8)
                                for q in range(32)
                            ]
                            bf = ldmatrix(us, addrs, 4, False)
                            for i in range(2):
                                mma(acc2[w, i, j], af[i], bf, 0, 1)
                                mma(acc2[w, i, j + 1], af[i], bf, 2, 3)
                if kc == kc_count - 1:
                    epilogue(y, acc2, bias, m0, n0, B, m)
    return y, t_out


def epilogue(y, acc2, bias, m0: int, n0: int, B: int, m: int):
    for w in range(WARPS):
        wm, wn = w % 2, w // 2
        for j in range(4):
            for lane in range(32):
                col = n0 + wn * 32 + j * 8 + lane % 4 * 2
                for i in range(2):
                    for h in range(2):
                        row = m0 + wm * 32 + i * 16 + lane // 4 + h * 8
                        for c, v in ((col, acc2[w, i, j, lane, 2 * h]),
                                     (col + 1, acc2[w, i, j, lane, 2 * h + 1])):  # fmt: skip
                            if row < B and c < m:
                                y[row, c] = v + (bias[c] if bias is not None else 0.0)


# (batch, in, out, r, SMs): each padded rank, odd sizes, a split over output columns, and (2 SMs)
# several output tiles per block.
SHAPES = [(67, 45, 77, 17, 132), (3, 64, 130, 40, 132), (10, 50, 70, 100, 132),
          (65, 32, 20, 256, 132), (130, 40, 300, 24, 2), (4, 3, 5, 1, 132)]  # fmt: skip


def check(B: int, n: int, m: int, r: int, sms: int, seed: int = 0) -> float:
    """Largest |error| of the model's y, t and column sums against float64 numpy (NaN: an
    element nobody wrote)."""
    rng = np.random.default_rng(seed)
    x, V, U = rng.standard_normal((B, n)), rng.standard_normal((n, r)), rng.standard_normal((m, r))
    s, bias = rng.standard_normal(r), rng.standard_normal(m)
    sums = np.full((-(-B // BM), n), np.nan)
    y, t = forward(x, V, U, s, bias, sms, col_sums=sums)
    want_t = x @ V
    errors = [
        np.abs(y - ((want_t * s) @ U.T + bias)).max(),
        np.abs(t - want_t).max(),  # t = x V is also the first pass's g = dy U, with dy for x
        np.abs(sums.sum(0) - x.sum(0)).max(),  # dbias = column sums of dy over the row blocks
    ]
    return float(np.max(errors))  # NaN if any is


def main() -> int:
    worst = 0.0
    for shape in SHAPES:
        err = check(*shape)
        print(f"B={shape[0]} in={shape[1]} out={shape[2]} r={shape[3]} SMs={shape[4]}: {err:.1e}")
        worst = err if np.isnan(err) else max(worst, err)
    ok = not np.isnan(worst) and worst < 1e-9
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
