// SMMF's step on CPU: one pass over each element (see dist_memopt/kernels/smmf_cpu.py).
//
// Per element: decompress V = (β2·r_V) ⊗ c_V + (1 − β2)·G² and M = sign ⊙ (β1·r_M) ⊗ c_M + (1 − β1)·G,
// update the weight with them, write M's new sign bit, and add V and |M| to the tile's row and
// column partials. The same equations, in the same order, as the Triton tile kernel; where two
// whole rows are stepped together (smmf_panel), their column values are summed before the partial.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "simd.h"
#include "tiles.h"

namespace dmo {

// per segment: view shape, weight/grad/sign-byte addresses, the state's factors (r_V, c_V, r_M,
// c_M), the statistic slots their new sums go to (same order)
enum SmmfField { S_N, S_M, S_W, S_G, S_SIGN, S_RV, S_CV, S_RM, S_CM, S_ORV, S_OCV, S_ORM, S_OCM, SMMF_FIELDS };

struct SmmfHyper {
    float lr, beta1, beta2, eps, wd, decay;
};

// row b: +1 or -1 for each of the 8 sign bits of byte b (least significant bit first)
struct SignTable {
    alignas(32) float v[256][8];
    SignTable() {
        for (int b = 0; b < 256; ++b)
            for (int j = 0; j < 8; ++j) v[b][j] = ((b >> j) & 1) ? 1.0f : -1.0f;
    }
};

inline const SignTable& sign_table() {
    static const SignTable table;
    return table;
}

// Per-row constants and running sums of a tile row. Everything the loops read is copied into
// locals first: stores through the float pointers could otherwise alias them and force reloads.
struct SmmfRowSums {
    float v = 0.0f, m = 0.0f;
#if DMO_AVX512
    vf acc_v = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    vf16 wide_v = _mm512_setzero_ps(), wide_m = _mm512_setzero_ps();
    float total_v() const { return v + hsum(acc_v) + hsum(wide_v); }
    float total_m() const { return m + hsum(acc_m) + hsum(wide_m); }
#elif DMO_AVX2
    vf acc_v = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    float total_v() const { return v + hsum(acc_v); }
    float total_m() const { return m + hsum(acc_m); }
#else
    float total_v() const { return v; }
    float total_m() const { return m; }
#endif
};

// Columns [c, end) of one view row, local indices from k: a head and a tail element by element
// (their sign byte may be shared with another tile, on another thread: atomic), the middle in
// blocks of eight whose sign byte the block alone holds.
template <typename WT, typename GT, bool HAS_M, bool COUPLED>
inline void smmf_span(WT* __restrict w, const GT* __restrict g, uint8_t* __restrict sign, const float* __restrict cv,
                      const float* __restrict cm, float* __restrict col_v, float* __restrict col_m, const float rv,
                      const float rm, const SmmfHyper h, int64_t c, const int64_t end, int64_t k, SmmfRowSums& sums) {
    const float keep2 = 1.0f - h.beta2, keep1 = 1.0f - h.beta1;
    float sum_v = sums.v, sum_m = sums.m;
    auto element = [&](int64_t c, int64_t k) {
        float wk = to_float(w[k]), gk = to_float(g[k]);
        if (COUPLED) gk = std::fma(h.wd, wk, gk);
        const float v = std::fma(rv, cv[c], keep2 * (gk * gk));
        col_v[c] += v;
        sum_v += v;
        float numerator = gk;
        if (HAS_M) {
            uint8_t* byte = sign + (k >> 3);
            const unsigned bit = static_cast<unsigned>(k & 7);
            const unsigned old = (__atomic_load_n(byte, __ATOMIC_RELAXED) >> bit) & 1u;
            const float first = std::fma(rm * cm[c], old ? 1.0f : -1.0f, keep1 * gk);
            if (static_cast<unsigned>(first >= 0.0f) != old) __atomic_fetch_xor(byte, static_cast<uint8_t>(1u << bit), __ATOMIC_RELAXED);
            const float magnitude = std::fabs(first);
            col_m[c] += magnitude;
            sum_m += magnitude;
            numerator = first;
        }
        wk = wk * h.decay - h.lr * (numerator / (std::sqrt(v) + h.eps));
        w[k] = from_float<WT>(wk);
    };
    for (; c < end && (k & 7); ++c, ++k) element(c, k);
#if DMO_AVX2
    const float(*table)[8] = sign_table().v;
    const vf rv8 = splat(rv), rm8 = splat(rm), keep2_8 = splat(keep2), keep1_8 = splat(keep1), wd8 = splat(h.wd);
    const vf decay8 = splat(h.decay), lr8 = splat(h.lr), eps8 = splat(h.eps);
    vf acc_v = sums.acc_v, acc_m = sums.acc_m;
#if DMO_AVX512
    {  // sixteen elements, two whole sign bytes, at a time; the same operations as the eight-lane block
        const vf16 rv16 = _mm512_set1_ps(rv), rm16 = _mm512_set1_ps(rm), keep2_16 = _mm512_set1_ps(keep2);
        const vf16 keep1_16 = _mm512_set1_ps(keep1), wd16 = _mm512_set1_ps(h.wd), decay16 = _mm512_set1_ps(h.decay);
        const vf16 lr16 = _mm512_set1_ps(h.lr), eps16 = _mm512_set1_ps(h.eps), zero = _mm512_setzero_ps();
        vf16 wide_v = sums.wide_v, wide_m = sums.wide_m;
        // four blocks in a row share one load and one store of their eight sign bytes: a store
        // fewer per block in a store queue that the weights' stores, waiting on memory, keep full
        for (; c + 16 <= end;) {
            const bool four = HAS_M && c + 64 <= end;
            uint64_t bits = 0, fresh = 0;
            uint8_t* const bytes = sign + (k >> 3);
            if (HAS_M && four) std::memcpy(&bits, bytes, 8);
            else if (HAS_M) std::memcpy(&bits, bytes, 2);
            for (int b = 0; b < (four ? 4 : 1); ++b, c += 16, k += 16) {
                prefetch_ahead<true>(w + k);
                prefetch_ahead<false>(g + k);
                vf16 wk = load16(w + k), gk = load16(g + k);
                if (COUPLED) gk = _mm512_fmadd_ps(wd16, wk, gk);
                const vf16 v = _mm512_fmadd_ps(rv16, _mm512_loadu_ps(cv + c), _mm512_mul_ps(keep2_16, _mm512_mul_ps(gk, gk)));
                _mm512_storeu_ps(col_v + c, _mm512_add_ps(_mm512_loadu_ps(col_v + c), v));
                wide_v = _mm512_add_ps(wide_v, v);
                vf16 numerator = gk;
                if (HAS_M) {
                    const vf16 magnitude_rc = _mm512_mul_ps(rm16, _mm512_loadu_ps(cm + c));
                    // ±(r ⊗ c) + (1 − β1)·G: a negation where the bit is 0 (the fma by ±1 of the other blocks)
                    const vf16 signed_rc = _mm512_mask_sub_ps(magnitude_rc, static_cast<__mmask16>(~(bits >> (16 * b))), zero, magnitude_rc);
                    const vf16 first = _mm512_add_ps(signed_rc, _mm512_mul_ps(keep1_16, gk));
                    fresh |= static_cast<uint64_t>(_mm512_cmp_ps_mask(first, zero, _CMP_GE_OQ)) << (16 * b);
                    const vf16 magnitude = _mm512_abs_ps(first);
                    _mm512_storeu_ps(col_m + c, _mm512_add_ps(_mm512_loadu_ps(col_m + c), magnitude));
                    wide_m = _mm512_add_ps(wide_m, magnitude);
                    numerator = first;
                }
                const vf16 step = _mm512_div_ps(numerator, _mm512_add_ps(_mm512_sqrt_ps(v), eps16));
                store16(w + k, _mm512_sub_ps(_mm512_mul_ps(wk, decay16), _mm512_mul_ps(lr16, step)));
            }
            if (HAS_M && four) std::memcpy(bytes, &fresh, 8);
            else if (HAS_M) std::memcpy(bytes, &fresh, 2);
        }
        sums.wide_v = wide_v;
        sums.wide_m = wide_m;
    }
#endif
    for (; c + 8 <= end; c += 8, k += 8) {
        prefetch_ahead<true>(w + k);
        prefetch_ahead<false>(g + k);
        vf wk = load8(w + k), gk = load8(g + k);
        if (COUPLED) gk = fma(wd8, wk, gk);
        const vf v = fma(rv8, loadf(cv + c), mul(keep2_8, mul(gk, gk)));
        storef(col_v + c, add(loadf(col_v + c), v));
        acc_v = add(acc_v, v);
        vf numerator = gk;
        if (HAS_M) {
            uint8_t* byte = sign + (k >> 3);
            const vf first = fma(mul(rm8, loadf(cm + c)), _mm256_load_ps(table[*byte]), mul(keep1_8, gk));
            *byte = static_cast<uint8_t>(nonnegative_bits(first));
            const vf magnitude = vabs(first);
            storef(col_m + c, add(loadf(col_m + c), magnitude));
            acc_m = add(acc_m, magnitude);
            numerator = first;
        }
        store8(w + k, sub(mul(wk, decay8), mul(lr8, div(numerator, add(vsqrt(v), eps8)))));
    }
    sums.acc_v = acc_v;
    sums.acc_m = acc_m;
#endif
    for (; c < end; ++c, ++k) element(c, k);
    sums.v = sum_v;
    sums.m = sum_m;
}

#if DMO_AVX2
// Rows stepped together by smmf_panel. Two: the column partials' loads and stores (the largest cost
// of the step where memory is fast) are halved; four saved little more and were slower where
// memory is slow, each row being a stream of its own.
constexpr int PANEL_ROWS = 2;
// What a view's width must be a multiple of for its rows to take smmf_panel: 64 with AVX-512 (four
// sixteen-lane blocks per sign word), 8 with AVX2 (whole sign bytes; a row's last word may be
// shorter)
constexpr int64_t PANEL_WIDTH_UNIT = DMO_AVX512 ? 64 : 8;
#endif

#if DMO_AVX512

// PANEL rows of one run, whole and consecutive, m a multiple of 64 and the first element on a sign
// byte: each block of 16 columns loads c_V, c_M and the column partials once for the PANEL rows and
// adds their sum (rows in order) to the partials, instead of a load, add and store per row; each
// row's 8 sign bytes of 64 columns are loaded and stored once. Rows' sums are those of smmf_span.
// The next panel is prefetched in address order, a line per row and block (prefetching each row's
// own stream 4 KB ahead leaves the start of every other row unfetched).
template <typename WT, typename GT, bool HAS_M, bool COUPLED, int PANEL>
inline void smmf_panel(WT* __restrict w, const GT* __restrict g, uint8_t* __restrict sign, const float* __restrict cv,
                       const float* __restrict cm, float* __restrict col_v, float* __restrict col_m, const float* rv,
                       const float* rm, const SmmfHyper h, const int64_t m, const int64_t k0, float* row_v, float* row_m) {
    const vf16 keep2 = _mm512_set1_ps(1.0f - h.beta2), keep1 = _mm512_set1_ps(1.0f - h.beta1), wd = _mm512_set1_ps(h.wd);
    const vf16 decay = _mm512_set1_ps(h.decay), lr = _mm512_set1_ps(h.lr), eps = _mm512_set1_ps(h.eps), zero = _mm512_setzero_ps();
    vf16 rv16[PANEL], rm16[PANEL], wide_v[PANEL], wide_m[PANEL];
    for (int i = 0; i < PANEL; ++i) {
        rv16[i] = _mm512_set1_ps(rv[i]);
        rm16[i] = _mm512_set1_ps(HAS_M ? rm[i] : 0.0f);
        wide_v[i] = wide_m[i] = zero;
    }
    for (int64_t c0 = 0; c0 < m; c0 += 64) {
        uint64_t bits[PANEL], fresh[PANEL];
        for (int i = 0; i < PANEL; ++i) {
            if (HAS_M) std::memcpy(&bits[i], sign + ((k0 + i * m + c0) >> 3), 8);
            fresh[i] = 0;
        }
        for (int b = 0; b < 4; ++b) {
            const int64_t c = c0 + 16 * b;
            const vf16 cv_c = _mm512_loadu_ps(cv + c), cm_c = HAS_M ? _mm512_loadu_ps(cm + c) : zero;
            vf16 sum_v = zero, sum_m = zero;
            for (int i = 0; i < PANEL; ++i) {
                const int64_t k = k0 + i * m + c;
                const int64_t ahead = k0 + PANEL * m + (c / 16) * (PANEL * 16) + i * 16;
                __builtin_prefetch(w + ahead, 1, 3);
                __builtin_prefetch(g + ahead, 0, 3);
                vf16 wk = load16(w + k), gk = load16(g + k);
                if (COUPLED) gk = _mm512_fmadd_ps(wd, wk, gk);
                const vf16 v = _mm512_fmadd_ps(rv16[i], cv_c, _mm512_mul_ps(keep2, _mm512_mul_ps(gk, gk)));
                sum_v = i == 0 ? v : _mm512_add_ps(sum_v, v);
                wide_v[i] = _mm512_add_ps(wide_v[i], v);
                vf16 numerator = gk;
                if (HAS_M) {
                    const vf16 magnitude_rc = _mm512_mul_ps(rm16[i], cm_c);
                    const vf16 signed_rc = _mm512_mask_sub_ps(magnitude_rc, static_cast<__mmask16>(~(bits[i] >> (16 * b))), zero, magnitude_rc);
                    const vf16 first = _mm512_add_ps(signed_rc, _mm512_mul_ps(keep1, gk));
                    fresh[i] |= static_cast<uint64_t>(_mm512_cmp_ps_mask(first, zero, _CMP_GE_OQ)) << (16 * b);
                    const vf16 magnitude = _mm512_abs_ps(first);
                    sum_m = i == 0 ? magnitude : _mm512_add_ps(sum_m, magnitude);
                    wide_m[i] = _mm512_add_ps(wide_m[i], magnitude);
                    numerator = first;
                }
                const vf16 step = _mm512_div_ps(numerator, _mm512_add_ps(_mm512_sqrt_ps(v), eps));
                store16(w + k, _mm512_sub_ps(_mm512_mul_ps(wk, decay), _mm512_mul_ps(lr, step)));
            }
            _mm512_storeu_ps(col_v + c, _mm512_add_ps(_mm512_loadu_ps(col_v + c), sum_v));
            if (HAS_M) _mm512_storeu_ps(col_m + c, _mm512_add_ps(_mm512_loadu_ps(col_m + c), sum_m));
        }
        if (HAS_M)
            for (int i = 0; i < PANEL; ++i) std::memcpy(sign + ((k0 + i * m + c0) >> 3), &fresh[i], 8);
    }
    for (int i = 0; i < PANEL; ++i) {
        row_v[i] = hsum(wide_v[i]);
        if (HAS_M) row_m[i] = hsum(wide_m[i]);
    }
}
#elif DMO_AVX2
// smmf_panel in eight-lane blocks, for processors without AVX-512, m a multiple of 8: each row's
// eight sign bytes of 64 columns (fewer at the row's end) are loaded and stored once, a block's
// signs taken from them through sign_table (a multiply by ±1, as smmf_span does). Where AVX2 is
// the widest, the step is held by its instructions as much as by memory: GPT-2 small's kernel
// took 51 ms on two threads through smmf_span, with a sign byte and the column partials loaded
// and stored per row and eight elements, and takes 37 ms in these panels.
template <typename WT, typename GT, bool HAS_M, bool COUPLED, int PANEL>
inline void smmf_panel(WT* __restrict w, const GT* __restrict g, uint8_t* __restrict sign, const float* __restrict cv,
                       const float* __restrict cm, float* __restrict col_v, float* __restrict col_m, const float* rv,
                       const float* rm, const SmmfHyper h, const int64_t m, const int64_t k0, float* row_v, float* row_m) {
    const vf keep2 = splat(1.0f - h.beta2), keep1 = splat(1.0f - h.beta1), wd = splat(h.wd);
    const vf decay = splat(h.decay), lr = splat(h.lr), eps = splat(h.eps), zero = _mm256_setzero_ps();
    const float(*table)[8] = sign_table().v;
    vf rv8[PANEL], rm8[PANEL], acc_v[PANEL], acc_m[PANEL];
    for (int i = 0; i < PANEL; ++i) {
        rv8[i] = splat(rv[i]);
        rm8[i] = splat(HAS_M ? rm[i] : 0.0f);
        acc_v[i] = acc_m[i] = zero;
    }
    // `blocks` blocks of eight columns from c0 and their sign bytes: 8, but in a row's last word
    auto word = [&](const int64_t c0, const int blocks) __attribute__((always_inline)) {
        uint64_t bits[PANEL], fresh[PANEL];
        for (int i = 0; i < PANEL; ++i) {
            bits[i] = fresh[i] = 0;
            if (HAS_M && blocks == 8) std::memcpy(&bits[i], sign + ((k0 + i * m + c0) >> 3), 8);
            else if (HAS_M) std::memcpy(&bits[i], sign + ((k0 + i * m + c0) >> 3), blocks);
        }
        for (int b = 0; b < blocks; ++b) {
            const int64_t c = c0 + 8 * b;
            const vf cv_c = loadf(cv + c), cm_c = HAS_M ? loadf(cm + c) : zero;
            vf sum_v = zero, sum_m = zero;
            for (int i = 0; i < PANEL; ++i) {
                const int64_t k = k0 + i * m + c;
                if (b % 2 == 0) {  // as the sixteen-lane panel: a line per row and 16 columns
                    const int64_t ahead = k0 + PANEL * m + (c / 16) * (PANEL * 16) + i * 16;
                    __builtin_prefetch(w + ahead, 1, 3);
                    __builtin_prefetch(g + ahead, 0, 3);
                }
                vf wk = load8(w + k), gk = load8(g + k);
                if (COUPLED) gk = fma(wd, wk, gk);
                const vf v = fma(rv8[i], cv_c, mul(keep2, mul(gk, gk)));
                sum_v = i == 0 ? v : add(sum_v, v);
                acc_v[i] = add(acc_v[i], v);
                vf numerator = gk;
                if (HAS_M) {
                    const vf first = fma(mul(rm8[i], cm_c), _mm256_load_ps(table[(bits[i] >> (8 * b)) & 0xff]), mul(keep1, gk));
                    fresh[i] |= static_cast<uint64_t>(nonnegative_bits(first)) << (8 * b);
                    const vf magnitude = vabs(first);
                    sum_m = i == 0 ? magnitude : add(sum_m, magnitude);
                    acc_m[i] = add(acc_m[i], magnitude);
                    numerator = first;
                }
                store8(w + k, sub(mul(wk, decay), mul(lr, div(numerator, add(vsqrt(v), eps)))));
            }
            storef(col_v + c, add(loadf(col_v + c), sum_v));
            if (HAS_M) storef(col_m + c, add(loadf(col_m + c), sum_m));
        }
        for (int i = 0; i < PANEL && HAS_M; ++i) {
            if (blocks == 8) std::memcpy(sign + ((k0 + i * m + c0) >> 3), &fresh[i], 8);
            else std::memcpy(sign + ((k0 + i * m + c0) >> 3), &fresh[i], blocks);
        }
    };
    int64_t c0 = 0;
    for (; c0 + 64 <= m; c0 += 64) word(c0, 8);
    if (c0 < m) word(c0, static_cast<int>((m - c0) / 8));
    for (int i = 0; i < PANEL; ++i) {
        row_v[i] = hsum(acc_v[i]);
        if (HAS_M) row_m[i] = hsum(acc_m[i]);
    }
}
#endif

template <typename WT, typename GT, bool HAS_M, bool COUPLED>
void smmf_tile(const Tile& t, const int64_t* seg, const int64_t* run, const SmmfHyper h,
               float* row_v, float* row_m, float* col_v, float* col_m) {
    const int64_t m = seg[S_M];
    std::fill(col_v, col_v + m, 0.0f);
    if (HAS_M) std::fill(col_m, col_m + m, 0.0f);
    auto* w = reinterpret_cast<WT*>(seg[S_W]);
    const auto* g = reinterpret_cast<const GT*>(seg[S_G]);
    auto* sign = reinterpret_cast<uint8_t*>(seg[S_SIGN]);
    const auto* rv = reinterpret_cast<const float*>(seg[S_RV]);
    const auto* cv = reinterpret_cast<const float*>(seg[S_CV]);
    const auto* rm = reinterpret_cast<const float*>(seg[S_RM]);
    const auto* cm = reinterpret_cast<const float*>(seg[S_CM]);
#if DMO_AVX2
    constexpr int PANEL = PANEL_ROWS;
    // only a run of consecutive positions (run[4] == 1) has row pairs whole in it (whole_rows_at)
    SplitColumns cols(col_v, col_m, HAS_M ? 2 : 1, m, m % PANEL_WIDTH_UNIT == 0 && run[4] == 1 ? t.rows / PANEL : 1);
#endif
    for (int64_t i = 0; i < t.rows; ++i) {
        const int64_t r = t.row0 + i;
#if DMO_AVX2
        if (m % PANEL_WIDTH_UNIT == 0 && i + PANEL <= t.rows) {
            const int64_t k = whole_rows_at(run, m, r, PANEL);
            if (k >= 0 && k % 8 == 0) {
                float rv_p[PANEL], rm_p[PANEL];
                for (int j = 0; j < PANEL; ++j) {
                    rv_p[j] = rv[r + j] * h.beta2;
                    rm_p[j] = HAS_M ? rm[r + j] * h.beta1 : 0.0f;
                }
                smmf_panel<WT, GT, HAS_M, COUPLED, PANEL>(w, g, sign, cv, cm, cols.at(0), cols.at(HAS_M ? 1 : 0), rv_p, rm_p, h,
                                                          m, k, row_v + i, row_m + i);
                cols.advance();
                i += PANEL - 1;
                continue;
            }
        }
#endif
        const float rv_r = rv[r] * h.beta2, rm_r = HAS_M ? rm[r] * h.beta1 : 0.0f;  // β·(r ⊗ c) = (β·r) ⊗ c
        SmmfRowSums sums;
        for_each_span(run, m, r, [&](int64_t c0, int64_t c1, int64_t k) {
            smmf_span<WT, GT, HAS_M, COUPLED>(w, g, sign, cv, cm, col_v, col_m, rv_r, rm_r, h, c0, c1, k, sums);
        });
        row_v[i] = sums.total_v();
        if (HAS_M) row_m[i] = sums.total_m();
    }
#if DMO_AVX2
    cols.fold();
#endif
}

}  // namespace dmo
