// Alada's step on CPU: two passes over the elements (see dist_memopt/kernels/alada_cpu.py).
//
// The statistics pass updates M (unless .grad holds it) and adds each tile's partial V·q (even t),
// Vᵀ·p (odd t) or row sums of V (t = 0), V = (M/bias1)², and ‖G0‖² at t = 0. After the all_reduce
// the refit (float64, per segment) and the update pass, W ← W·decay − (lr/bias1)·M/√max(Ũ + eps, eps)
// with Ũ + eps = rows ⊗ cols + row_shift formed from p and q without cancellation. The same
// equations, in the same order, as the Triton kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "tiles.h"

namespace dmo {

// per segment: view shape, weight/grad/momentum addresses (the momentum is .grad's when it holds
// M, else fp32 state), p, q, v0 (float64 state), the statistic and ‖G0‖² slots (fp32)
enum AladaField { A_N, A_M, A_W, A_G, A_MOM, A_P, A_Q, A_V0, A_STAT, A_NORM, ALADA_FIELDS };

enum AladaPhase { EVEN = 0, ODD = 1, FIRST = 2 };  // t > 0 even: V·q; t odd: Vᵀ·p; t = 0: rowsum(V)

struct AladaStats {
    float beta1, bias1, g0_div;
};

// The statistics pass on columns of view rows: M updated in place (unless .grad holds it), the
// row's V·q (even t) or rowsum(V) (t = 0) summed into acc, its Vᵀ·p (odd t) added to col_out and
// its ‖G0‖² (t = 0) to norm. blocks() takes the widest blocks the build has, finish() the rest
// element by element and adds the blocks' sums: a span taken in chunks (alada_pair_rows) sums
// exactly as the span taken whole.
template <typename GT, bool IN_GRAD, int PHASE>
struct AladaStatsLanes {
    // copies, not h's fields: stores through the float pointers could alias those
    const GT* __restrict g;
    float* __restrict momentum;  // fp32 state (IN_GRAD: unused, g holds M)
    const float* __restrict q_cols;
    float* __restrict col_out;
    const float beta1, keep, unbias, pr, g0_div;
    float acc = 0.0f, norm;
#if DMO_AVX512
    vf16 acc16 = _mm512_setzero_ps(), norm16 = _mm512_setzero_ps();
#endif
#if DMO_AVX2
    vf acc8 = _mm256_setzero_ps(), norm8 = _mm256_setzero_ps();
#endif

    AladaStatsLanes(const int64_t* seg, const AladaStats& h, float pr, const float* q32, float* col_out, float norm)
        : g(reinterpret_cast<const GT*>(seg[A_G])), momentum(reinterpret_cast<float*>(seg[A_MOM])), q_cols(q32), col_out(col_out),
          beta1(h.beta1), keep(1.0f - h.beta1), unbias(1.0f / h.bias1), pr(pr), g0_div(h.g0_div), norm(norm) {}

    // whole blocks of columns [c, end), local indices from k; c and k left past them
    void blocks(int64_t& c, const int64_t end, int64_t& k) {
#if DMO_AVX512
        const vf16 beta16 = _mm512_set1_ps(beta1), keep16 = _mm512_set1_ps(keep), unbias16 = _mm512_set1_ps(unbias);
        const vf16 pr16 = _mm512_set1_ps(pr), div16 = _mm512_set1_ps(g0_div);
        for (; c + 16 <= end; c += 16, k += 16) {
            prefetch_ahead<false>(g + k);
            if (!IN_GRAD) prefetch_ahead<true>(momentum + k);
            const vf16 gk = load16(g + k);
            vf16 mk = gk;
            if (!IN_GRAD) {
                mk = _mm512_fmadd_ps(_mm512_loadu_ps(momentum + k), beta16, _mm512_mul_ps(keep16, gk));
                _mm512_storeu_ps(momentum + k, mk);
            }
            vf16 second = _mm512_mul_ps(mk, unbias16);
            second = _mm512_mul_ps(second, second);
            if (PHASE == ODD) _mm512_storeu_ps(col_out + c, _mm512_add_ps(_mm512_loadu_ps(col_out + c), _mm512_mul_ps(second, pr16)));
            else if (PHASE == FIRST) acc16 = _mm512_add_ps(acc16, second);
            else acc16 = _mm512_add_ps(acc16, _mm512_mul_ps(second, _mm512_loadu_ps(q_cols + c)));
            if (PHASE == FIRST) {
                const vf16 g0 = _mm512_div_ps(gk, div16);
                norm16 = _mm512_add_ps(norm16, _mm512_mul_ps(g0, g0));
            }
        }
#endif
#if DMO_AVX2
        for (; c + 8 <= end; c += 8, k += 8) {
            prefetch_ahead<false>(g + k);  // a line twice: the spans' starts are not aligned
            if (!IN_GRAD) prefetch_ahead<true>(momentum + k);
            const vf gk = load8(g + k);
            vf mk = gk;
            if (!IN_GRAD) {
                mk = fma(loadf(momentum + k), splat(beta1), mul(splat(keep), gk));
                storef(momentum + k, mk);
            }
            vf second = mul(mk, splat(unbias));
            second = mul(second, second);
            if (PHASE == ODD) storef(col_out + c, add(loadf(col_out + c), mul(second, splat(pr))));
            else if (PHASE == FIRST) acc8 = add(acc8, second);
            else acc8 = add(acc8, mul(second, loadf(q_cols + c)));
            if (PHASE == FIRST) {
                const vf g0 = div(gk, splat(g0_div));
                norm8 = add(norm8, mul(g0, g0));
            }
        }
#endif
    }

    // the blocks' sums added, then columns [c, end) element by element; the blocks start again
    void finish(int64_t c, const int64_t end, int64_t k) {
#if DMO_AVX512
        acc += hsum(acc16);
        if (PHASE == FIRST) norm += hsum(norm16);
        acc16 = norm16 = _mm512_setzero_ps();
#endif
#if DMO_AVX2
        acc += hsum(acc8);
        if (PHASE == FIRST) norm += hsum(norm8);
        acc8 = norm8 = _mm256_setzero_ps();
#endif
        for (; c < end; ++c, ++k) {
            const float gk = to_float(g[k]);
            float mk = gk;
            if (!IN_GRAD) {
                mk = std::fma(momentum[k], beta1, keep * gk);
                momentum[k] = mk;
            }
            float second = mk * unbias;
            second = second * second;
            if (PHASE == ODD) col_out[c] += second * pr;
            else if (PHASE == FIRST) acc += second;
            else acc += second * q_cols[c];
            if (PHASE == FIRST) {
                const float g0 = gk / g0_div;
                norm += g0 * g0;
            }
        }
    }
};

// One view row of the statistics pass (AladaStatsLanes over each span); returns the row's V·q
// (even t) or rowsum(V) (t = 0), adds its Vᵀ·p (odd t) to col_out and its ‖G0‖² (t = 0) to norm.
template <typename GT, bool IN_GRAD, int PHASE>
inline float alada_stats_row(const int64_t* seg, const int64_t* run, int64_t r, const AladaStats& h, float pr,
                             const float* q32, float* col_out, float& norm) {
    AladaStatsLanes<GT, IN_GRAD, PHASE> lanes(seg, h, pr, q32, col_out, norm);
    for_each_span(run, seg[A_M], r, [&](int64_t c, int64_t end, int64_t k) {
        lanes.blocks(c, end, k);
        lanes.finish(c, end, k);
    });
    norm = lanes.norm;
    return lanes.acc;
}

// the q of the statistics pass in fp32 (even t), once per tile
inline void alada_q32(const int64_t* seg, std::vector<float>& q32) {
    const int64_t m = seg[A_M];
    const auto* q = reinterpret_cast<const double*>(seg[A_Q]);
    q32.resize(m);
    for (int64_t c = 0; c < m; ++c) q32[c] = static_cast<float>(q[c]);
}

template <typename GT, bool IN_GRAD, int PHASE>
void alada_stats_tile(const Tile& t, const int64_t* seg, const int64_t* run, const AladaStats& h,
                      float* row_out, float* col_out, float* norm_out, std::vector<float>& q32) {
    const auto* p = reinterpret_cast<const double*>(seg[A_P]);
    if (PHASE == ODD) std::fill(col_out, col_out + seg[A_M], 0.0f);
    if (PHASE == EVEN) alada_q32(seg, q32);
    SplitColumns cols(col_out, nullptr, 1, seg[A_M], PHASE == ODD ? t.rows : 1);
    float norm = 0.0f;
    for (int64_t i = 0; i < t.rows; ++i) {
        const int64_t r = t.row0 + i;
        const float pr = PHASE == ODD ? static_cast<float>(p[r]) : 0.0f;
        const float acc = alada_stats_row<GT, IN_GRAD, PHASE>(seg, run, r, h, pr, q32.data(), cols.at(0), norm);
        if (PHASE != ODD) row_out[i] = acc;
        cols.advance();
    }
    cols.fold();
    *norm_out = norm;
}

struct AladaUpdate {
    float lr_over_bias1, eps, decay;
    double eps64, bias2, power_p, power_q;  // power_*: β2^kp, β2^kq (p's and q's decayed start)
};

// p's and q's decayed √v0 starts, per segment: Ũ + eps = (p/bias2) ⊗ (q − x_q) + row shift
struct AladaStarts {
    double x_p, x_q, shift_scale;
    AladaStarts(const int64_t* seg, const AladaUpdate& h) {
        const double root = std::sqrt(*reinterpret_cast<const double*>(seg[A_V0]));
        x_p = root * h.power_p;
        x_q = root * h.power_q;
        shift_scale = x_q / h.bias2;
    }
};

// the update's column terms q − x_q in fp32, once per tile
inline void alada_cols(const int64_t* seg, const AladaStarts& s, std::vector<float>& cols) {
    const int64_t m = seg[A_M];
    const auto* q = reinterpret_cast<const double*>(seg[A_Q]);
    cols.resize(m);
    for (int64_t c = 0; c < m; ++c) cols[c] = static_cast<float>(q[c] - s.x_q);
}

// The update pass on columns of a view row, W ← W·decay − (lr/bias1)·M/√max(Ũ + eps, eps), p_r the
// row's p: blocks() the widest blocks the build has, finish() the rest element by element.
template <typename WT, typename MT>
struct AladaUpdateLanes {
    // copies, not h's fields: see AladaStatsLanes
    WT* __restrict w;
    const MT* __restrict momentum;
    const float* __restrict cols;
    const float factor, shift, eps, decay, step;

    AladaUpdateLanes(const int64_t* seg, const AladaUpdate& h, const AladaStarts& s, double p_r, const float* cols)
        : w(reinterpret_cast<WT*>(seg[A_W])), momentum(reinterpret_cast<const MT*>(seg[A_MOM])), cols(cols),
          factor(static_cast<float>(p_r / h.bias2)), shift(static_cast<float>((p_r - s.x_p) * s.shift_scale + h.eps64)),
          eps(h.eps), decay(h.decay), step(h.lr_over_bias1) {}

    // whole blocks of columns [c, end), local indices from k; c and k left past them
    void blocks(int64_t& c, const int64_t end, int64_t& k) {
#if DMO_AVX512
        const vf16 factor16 = _mm512_set1_ps(factor), shift16 = _mm512_set1_ps(shift), eps16 = _mm512_set1_ps(eps);
        const vf16 decay16 = _mm512_set1_ps(decay), step16 = _mm512_set1_ps(step);
        for (; c + 16 <= end; c += 16, k += 16) {
            prefetch_ahead<true>(w + k);
            prefetch_ahead<false>(momentum + k);
            const vf16 refit = _mm512_fmadd_ps(factor16, _mm512_loadu_ps(cols + c), shift16);
            const vf16 denominator = _mm512_sqrt_ps(_mm512_max_ps(refit, eps16));
            const vf16 wk = _mm512_mul_ps(load16(w + k), decay16);
            store16(w + k, _mm512_sub_ps(wk, _mm512_mul_ps(step16, _mm512_div_ps(load16(momentum + k), denominator))));
        }
#endif
#if DMO_AVX2
        for (; c + 8 <= end; c += 8, k += 8) {
            prefetch_ahead<true>(w + k);
            prefetch_ahead<false>(momentum + k);
            const vf refit = fma(splat(factor), loadf(cols + c), splat(shift));
            const vf denominator = vsqrt(vmax(refit, splat(eps)));
            const vf wk = mul(load8(w + k), splat(decay));
            store8(w + k, sub(wk, mul(splat(step), div(load8(momentum + k), denominator))));
        }
#endif
    }

    // columns [c, end) element by element
    void finish(int64_t c, const int64_t end, int64_t k) {
        for (; c < end; ++c, ++k) {
            const float refit = std::fma(factor, cols[c], shift);
            const float denominator = std::sqrt(std::max(refit, eps));
            const float wk = to_float(w[k]) * decay;
            w[k] = from_float<WT>(wk - step * (to_float(momentum[k]) / denominator));
        }
    }
};

// One view row of the update pass (AladaUpdateLanes over each span).
template <typename WT, typename MT>
inline void alada_update_row(const int64_t* seg, const int64_t* run, int64_t r, const AladaUpdate& h, const AladaStarts& s,
                             double p_r, const float* cols) {
    AladaUpdateLanes<WT, MT> lanes(seg, h, s, p_r, cols);
    for_each_span(run, seg[A_M], r, [&](int64_t c, int64_t end, int64_t k) {
        lanes.blocks(c, end, k);
        lanes.finish(c, end, k);
    });
}

template <typename WT, typename MT>
void alada_update_tile(const Tile& t, const int64_t* seg, const int64_t* run, const AladaUpdate& h, std::vector<float>& cols) {
    const auto* p = reinterpret_cast<const double*>(seg[A_P]);
    const AladaStarts starts(seg, h);
    alada_cols(seg, starts, cols);
    for (int64_t i = 0; i < t.rows; ++i)
        alada_update_row<WT, MT>(seg, run, t.row0 + i, h, starts, p[t.row0 + i], cols.data());
}

// one element of a refit: own·β2 + (1 − β2)·(statistic·scale), scale = 1/(‖other‖² + eps)
inline double alada_refit_one(double own, double statistic, double beta2, double scale) {
    return own * beta2 + (1.0 - beta2) * (statistic * scale);
}

inline double alada_refit_scale(const double* other, int64_t len, double eps) {
    double total = 0.0;
    for (int64_t i = 0; i < len; ++i) total += other[i] * other[i];
    return 1.0 / (total + eps);
}

// Columns chunked for alada_pair_rows: a multiple of every block width, short enough that the
// two rows' chunks share the processor's instruction window.
constexpr int64_t PAIR_CHUNK = 64;

// Two whole rows of one run, the first at local index k: the first row's update interleaved, in
// chunks of columns, with the second row's statistics (`next`, which then holds its sums). The
// statistics stream G and M from memory while the update's square roots and divisions run; one row
// after the other, each waits on the other (GPT-2 small's even-step kernel on two Zen 2 cores:
// 48 ms row by row, 38 ms in pairs).
template <typename T, typename MT, bool IN_GRAD>
inline void alada_pair_rows(const int64_t m, const int64_t k, AladaUpdateLanes<T, MT>& update,
                            AladaStatsLanes<T, IN_GRAD, EVEN>& next) {
    int64_t cu = 0, ku = k, cs = 0, ks = k + m;
    for (int64_t c0 = 0; c0 < m; c0 += PAIR_CHUNK) {
        const int64_t c1 = std::min(c0 + PAIR_CHUNK, m);
        update.blocks(cu, c1, ku);
        next.blocks(cs, c1, ks);
    }
    update.finish(cu, m, ku);
    next.finish(cs, m, ks);
}

// Even t > 0 on a segment of one run of consecutive positions: per row it holds whole (so the row's
// statistic is complete here), its V·q, p's refit and its update, the row still in L1. One pass, G,
// M, W read and M, W written, where the statistics and update passes read M twice; the same
// operations in the same order, so the same numbers. Where the next row is whole too, its
// statistics run beside this row's update (alada_pair_rows). The row statistics also land in the
// segment's slot, as the statistics pass leaves them. A row the range cuts (its first or last)
// takes only the statistics pass here: its p and weights wait for the completed statistic.
template <typename T, bool IN_GRAD>
void alada_even_rows_tile(const Tile& t, const int64_t* seg, const int64_t* run, const AladaStats& hs, const AladaUpdate& hu,
                          double beta2, double scale, std::vector<float>& q32, std::vector<float>& cols) {
    using MT = std::conditional_t<IN_GRAD, T, float>;
    auto* p = reinterpret_cast<double*>(seg[A_P]);
    auto* stat = reinterpret_cast<float*>(seg[A_STAT]);
    const int64_t m = seg[A_M];
    const AladaStarts starts(seg, hu);
    alada_q32(seg, q32);
    alada_cols(seg, starts, cols);
    float unused = 0.0f, next_acc = 0.0f;
    bool have_next = false;  // next_acc holds row r's statistic, summed beside row r − 1's update
    for (int64_t i = 0; i < t.rows; ++i) {
        const int64_t r = t.row0 + i;
        const float acc = have_next ? next_acc : alada_stats_row<T, IN_GRAD, EVEN>(seg, run, r, hs, 0.0f, q32.data(), nullptr, unused);
        have_next = false;
        stat[r] = acc;
        if (whole_rows_at(run, m, r, 1) < 0) continue;
        p[r] = alada_refit_one(p[r], static_cast<double>(acc), beta2, scale);
        const int64_t k = i + 1 < t.rows ? whole_rows_at(run, m, r, 2) : -1;
        if (k < 0) {
            alada_update_row<T, MT>(seg, run, r, hu, starts, p[r], cols.data());
            continue;
        }
        AladaUpdateLanes<T, MT> update(seg, hu, starts, p[r], cols.data());
        AladaStatsLanes<T, IN_GRAD, EVEN> next(seg, hs, 0.0f, q32.data(), nullptr, 0.0f);
        alada_pair_rows<T, MT, IN_GRAD>(m, k, update, next);
        next_acc = next.acc;
        have_next = true;
    }
}

// p ← β2·p + (1 − β2)·(V q)/(‖q‖² + eps) at even t, q likewise from Vᵀ p at odd t (float64);
// at t = 0, v0 = ‖G0‖²/(n·m) first and p, q start at √v0 (the statistic then is rowsum(V)).
inline void alada_refit(const int64_t* seg, int phase, double beta2, double eps) {
    const int64_t n = seg[A_N], m = seg[A_M];
    auto* p = reinterpret_cast<double*>(seg[A_P]);
    auto* q = reinterpret_cast<double*>(seg[A_Q]);
    const auto* stat = reinterpret_cast<const float*>(seg[A_STAT]);
    const bool odd = phase == ODD, first = phase == FIRST;
    double root = 0.0;
    if (first) {
        const double v0 = static_cast<double>(*reinterpret_cast<const float*>(seg[A_NORM])) / static_cast<double>(n * m);
        *reinterpret_cast<double*>(seg[A_V0]) = v0;
        root = std::sqrt(v0);
        std::fill(p, p + n, root);
        std::fill(q, q + m, root);
    }
    double* own = odd ? q : p;
    const double* other = odd ? p : q;
    const int64_t own_len = odd ? m : n, other_len = odd ? n : m;
    const double scale = alada_refit_scale(other, other_len, eps);
    for (int64_t i = 0; i < own_len; ++i) own[i] = alada_refit_one(own[i], static_cast<double>(stat[i]) * (first ? root : 1.0), beta2, scale);
}

}  // namespace dmo
