// Python bindings of the CPU kernels. Every entry takes int64 tables of addresses and sizes built
// by dist_memopt/kernels/{smmf,alada}_cpu.py (the tensors they point into are kept alive there).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <exception>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "alada.h"
#include "smmf.h"

namespace dmo {
namespace {

enum Dtype : int64_t { F32 = 0, BF16 = 1, F16 = 2 };

// f(i) for i in [0, count) on torch's intra-op threads, each taking the next index when free:
// tiles differ in size, and which thread runs a tile changes no result (each writes its own partials)
template <typename F>
void for_each_index(int64_t count, const F& f) {
    if (count == 0) return;
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
    at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t worker = lo; worker < hi; ++worker)
            for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) f(i);
    });
}

template <typename F>
void with_dtype(int64_t dtype, const F& f) {
    switch (dtype) {
        case F32: f(float{}); break;
        case BF16: f(bf16{}); break;
        case F16: f(f16{}); break;
        default: TORCH_CHECK(false, "unsupported dtype code ", dtype);
    }
}

template <typename F>
void with_flag(bool flag, const F& f) {
    if (flag) f(std::true_type{});
    else f(std::false_type{});
}

const int64_t* table(const at::Tensor& t, int64_t fields, const char* name) {
    TORCH_CHECK(t.dtype() == at::kLong && t.is_contiguous() && t.device().is_cpu() && t.dim() == 2 && t.size(1) == fields,
                name, " must be a contiguous CPU int64 table of ", fields, " columns");
    return t.data_ptr<int64_t>();
}

// Sums each segment's tiles' partials in tile order into its slots: `rows` (n, from row partials)
// and `cols` (m, from column partials); a slot address of 0 is skipped.
void sum_tiles(const Tiles& plan, const int64_t* segs, int64_t seg_count, int64_t seg_fields, int n_field, int m_field,
               int row_slot, int col_slot, const float* rowp, const float* colp) {
    std::vector<int64_t> first(seg_count + 1, static_cast<int64_t>(plan.tiles.size()));
    for (int64_t i = static_cast<int64_t>(plan.tiles.size()) - 1; i >= 0; --i) first[plan.tiles[i].seg] = i;
    for (int64_t s = seg_count - 1; s >= 0; --s) first[s] = std::min(first[s], first[s + 1]);
    for_each_index(seg_count, [&](int64_t s) {
        const int64_t* seg = segs + s * seg_fields;
        const int64_t n = seg[n_field], m = seg[m_field];
        auto* rows = row_slot >= 0 ? reinterpret_cast<float*>(seg[row_slot]) : nullptr;
        auto* cols = col_slot >= 0 ? reinterpret_cast<float*>(seg[col_slot]) : nullptr;
        if (rows) std::fill(rows, rows + n, 0.0f);
        if (cols) std::fill(cols, cols + m, 0.0f);
        for (int64_t i = first[s]; i < first[s + 1]; ++i) {
            const Tile& t = plan.tiles[i];
            if (rows)
                for (int64_t j = 0; j < t.rows; ++j) rows[t.row0 + j] += rowp[t.rowp + j];
            if (cols)
                for (int64_t c = 0; c < m; ++c) cols[c] += colp[t.colp + c];
        }
    });
}

// returns the floats of tile partials written (and read once more when summed)
int64_t smmf_step(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t w_dtype, int64_t g_dtype, double lr, double beta1,
               double beta2, double eps, double wd, double decay, bool has_m, bool coupled) {
    TORCH_CHECK(w_dtype == g_dtype, "weights and gradients of one dtype");
    const int64_t* segs = table(segs_t, SMMF_FIELDS, "segments");
    const int64_t* runs = table(runs_t, RUN_FIELDS, "runs");
    const int64_t seg_count = segs_t.size(0);
    const Tiles plan = make_tiles(runs, runs_t.size(0), [&](int64_t s) { return segs[s * SMMF_FIELDS + S_M]; });
    const int pairs = has_m ? 2 : 1;
    std::unique_ptr<float[]> rowp(new float[plan.row_partials * pairs + 1]), colp(new float[plan.col_partials * pairs + 1]);
    const SmmfHyper h{float(lr), float(beta1), float(beta2), float(eps), float(wd), float(decay)};
    with_dtype(w_dtype, [&](auto w) {
        using T = decltype(w);
        with_flag(has_m, [&](auto m) {
            with_flag(coupled, [&](auto c) {
                for_each_index(static_cast<int64_t>(plan.tiles.size()), [&](int64_t i) {
                    const Tile& t = plan.tiles[i];
                    smmf_tile<T, T, decltype(m)::value, decltype(c)::value>(
                        t, segs + t.seg * SMMF_FIELDS, runs + t.run * RUN_FIELDS, h, rowp.get() + t.rowp,
                        rowp.get() + plan.row_partials + t.rowp, colp.get() + t.colp, colp.get() + plan.col_partials + t.colp);
                });
            });
        });
    });
    sum_tiles(plan, segs, seg_count, SMMF_FIELDS, S_N, S_M, S_ORV, S_OCV, rowp.get(), colp.get());
    if (has_m)
        sum_tiles(plan, segs, seg_count, SMMF_FIELDS, S_N, S_M, S_ORM, S_OCM, rowp.get() + plan.row_partials,
                  colp.get() + plan.col_partials);
    return (plan.row_partials + plan.col_partials) * pairs;
}

// complete sums -> factors: the shorter side (rows when n <= m) divided by its total when non-zero
void normalize_into(const float* rows_in, const float* cols_in, float* rows_out, float* cols_out, int64_t n, int64_t m) {
    const bool by_rows = n <= m;
    const float* side = by_rows ? rows_in : cols_in;
    float total = 0.0f;
    for (int64_t i = 0, len = by_rows ? n : m; i < len; ++i) total += side[i];
    const float scale = total > 0.0f ? total : 1.0f;
    for (int64_t i = 0; i < n; ++i) rows_out[i] = by_rows ? rows_in[i] / scale : rows_in[i];
    for (int64_t i = 0; i < m; ++i) cols_out[i] = by_rows ? cols_in[i] : cols_in[i] / scale;
}

void smmf_finish(const at::Tensor& segs_t, bool has_m) {
    const int64_t* segs = table(segs_t, SMMF_FIELDS, "segments");
    for_each_index(segs_t.size(0), [&](int64_t s) {
        const int64_t* seg = segs + s * SMMF_FIELDS;
        auto f = [&](int field) { return reinterpret_cast<float*>(seg[field]); };
        normalize_into(f(S_ORV), f(S_OCV), f(S_RV), f(S_CV), seg[S_N], seg[S_M]);
        if (has_m) normalize_into(f(S_ORM), f(S_OCM), f(S_RM), f(S_CM), seg[S_N], seg[S_M]);
    });
}

// returns the floats of tile partials written (and read once more when summed)
int64_t alada_stats(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t g_dtype, int64_t phase, bool in_grad, double beta1,
                 double bias1, double g0_div) {
    const int64_t* segs = table(segs_t, ALADA_FIELDS, "segments");
    const int64_t* runs = table(runs_t, RUN_FIELDS, "runs");
    const int64_t seg_count = segs_t.size(0);
    const Tiles plan = make_tiles(runs, runs_t.size(0), [&](int64_t s) { return segs[s * ALADA_FIELDS + A_M]; });
    const int64_t tiles = static_cast<int64_t>(plan.tiles.size());
    std::unique_ptr<float[]> rowp(new float[plan.row_partials + 1]), colp(new float[plan.col_partials + 1]), normp(new float[tiles + 1]);
    const AladaStats h{float(beta1), float(bias1), float(g0_div)};
    with_dtype(g_dtype, [&](auto g) {
        using G = decltype(g);
        with_flag(in_grad, [&](auto in) {
            auto run_phase = [&](auto phase_tag) {
                for_each_index(tiles, [&](int64_t i) {
                    thread_local std::vector<float> scratch;
                    const Tile& t = plan.tiles[i];
                    alada_stats_tile<G, decltype(in)::value, decltype(phase_tag)::value>(
                        t, segs + t.seg * ALADA_FIELDS, runs + t.run * RUN_FIELDS, h, rowp.get() + t.rowp, colp.get() + t.colp,
                        normp.get() + i, scratch);
                });
            };
            if (phase == ODD) run_phase(std::integral_constant<int, ODD>{});
            else if (phase == FIRST) run_phase(std::integral_constant<int, FIRST>{});
            else run_phase(std::integral_constant<int, EVEN>{});
        });
    });
    const bool odd = phase == ODD;
    sum_tiles(plan, segs, seg_count, ALADA_FIELDS, A_N, A_M, odd ? -1 : A_STAT, odd ? A_STAT : -1, rowp.get(), colp.get());
    if (phase == FIRST) {  // ‖G0‖² per segment, its tiles in order
        std::vector<float> norms(seg_count, 0.0f);
        for (int64_t i = 0; i < tiles; ++i) norms[plan.tiles[i].seg] += normp[i];
        for (int64_t s = 0; s < seg_count; ++s) *reinterpret_cast<float*>(segs[s * ALADA_FIELDS + A_NORM]) = norms[s];
    }
    return (odd ? plan.col_partials : plan.row_partials) + (phase == FIRST ? tiles : 0);
}

void alada_refit_all(const at::Tensor& segs_t, int64_t phase, double beta2, double eps) {
    const int64_t* segs = table(segs_t, ALADA_FIELDS, "segments");
    for_each_index(segs_t.size(0), [&](int64_t s) { alada_refit(segs + s * ALADA_FIELDS, static_cast<int>(phase), beta2, eps); });
}

// The weights of the elements of `run_count` run groups (after the refit)
void alada_update_runs(const int64_t* segs, const int64_t* runs, int64_t run_count, int64_t w_dtype, bool in_grad, double lr, double eps,
                       double bias1, double bias2, double power_p, double power_q, double decay) {
    const Tiles plan = make_tiles(runs, run_count, [&](int64_t s) { return segs[s * ALADA_FIELDS + A_M]; });
    const AladaUpdate h{float(lr / bias1), float(eps), float(decay), eps, bias2, power_p, power_q};
    with_dtype(w_dtype, [&](auto w) {
        using W = decltype(w);
        auto run_tiles = [&](auto momentum) {
            using M = decltype(momentum);
            for_each_index(static_cast<int64_t>(plan.tiles.size()), [&](int64_t i) {
                thread_local std::vector<float> scratch;
                const Tile& t = plan.tiles[i];
                alada_update_tile<W, M>(t, segs + t.seg * ALADA_FIELDS, runs + t.run * RUN_FIELDS, h, scratch);
            });
        };
        if (in_grad) run_tiles(W{});  // .grad holds M, in the parameter's dtype
        else run_tiles(float{});
    });
}

void alada_update(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t w_dtype, bool in_grad, double lr, double eps,
                  double bias1, double bias2, double power_p, double power_q, double decay) {
    alada_update_runs(table(segs_t, ALADA_FIELDS, "segments"), table(runs_t, RUN_FIELDS, "runs"), runs_t.size(0), w_dtype, in_grad, lr,
                      eps, bias1, bias2, power_p, power_q, decay);
}

// The view rows [first, end) a segment of one run holds whole (end = first where it holds none).
std::pair<int64_t, int64_t> held_rows(const int64_t* seg, const int64_t* run) {
    const int64_t m = seg[A_M];
    const int64_t first = (run[1] + m - 1) / m;
    return {first, std::max(first, (run[1] + run[2]) / m)};
}

// Checks that each segment's elements are one run of consecutive positions; returns each segment's run.
std::vector<const int64_t*> single_runs(const int64_t* segs, int64_t seg_count, const int64_t* runs, int64_t run_count) {
    std::vector<const int64_t*> of(seg_count, nullptr);
    for (int64_t r = 0; r < run_count; ++r) {
        const int64_t* run = runs + r * RUN_FIELDS;
        TORCH_CHECK(run[4] == 1 && run[2] > 0 && of[run[0]] == nullptr,
                    "alada_even_rows takes segments of one run of consecutive positions each");
        of[run[0]] = run;
    }
    for (const int64_t* run : of) TORCH_CHECK(run != nullptr, "alada_even_rows: a segment without elements");
    return of;
}

// The parts of rows a segment's run cuts (its first and last, where the range starts or ends
// mid-row) as runs of their own, in segment order.
std::vector<int64_t> cut_row_runs(const int64_t* segs, const std::vector<const int64_t*>& run_of) {
    std::vector<int64_t> out;
    auto add = [&](int64_t s, const int64_t* run, int64_t lo, int64_t hi) {
        if (lo < hi) out.insert(out.end(), {s, lo, hi - lo, hi - lo, 1, run[5] + (lo - run[1])});
    };
    for (int64_t s = 0; s < static_cast<int64_t>(run_of.size()); ++s) {
        const int64_t* run = run_of[s];
        const int64_t m = segs[s * ALADA_FIELDS + A_M], start = run[1], end = run[1] + run[2];
        const auto [first, last] = held_rows(segs + s * ALADA_FIELDS, run);
        add(s, run, start, std::min(end, first * m));
        add(s, run, std::max(start, last * m), end);
    }
    return out;
}

// Even t > 0 on segments of one run each (a whole tensor, an FSDP, ZeRO or Megatron range):
// statistics, refit and update of the rows held whole in one pass (alada_even_rows_tile); the rows
// the range cuts take the statistics only. The statistic slots hold the rows' V·q (partial in cut
// rows) and zeros elsewhere, as alada_stats leaves them: after the all_reduce, alada_refit_rest
// refits the rows not held whole and alada_update_cut_rows updates the cut rows' weights. p and
// the weights end as alada_stats, alada_refit and alada_update leave them.
void alada_even_rows(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t dtype, bool in_grad, double beta1, double bias1,
                     double beta2, double lr, double eps, double bias2, double power_p, double power_q, double decay) {
    const int64_t* segs = table(segs_t, ALADA_FIELDS, "segments");
    const int64_t* runs = table(runs_t, RUN_FIELDS, "runs");
    const int64_t seg_count = segs_t.size(0);
    const std::vector<const int64_t*> run_of = single_runs(segs, seg_count, runs, runs_t.size(0));
    std::vector<double> scales(seg_count);
    for (int64_t s = 0; s < seg_count; ++s) {
        const int64_t* seg = segs + s * ALADA_FIELDS;
        scales[s] = alada_refit_scale(reinterpret_cast<const double*>(seg[A_Q]), seg[A_M], eps);
        auto* stat = reinterpret_cast<float*>(seg[A_STAT]);
        const auto [first, end] = held_rows(seg, run_of[s]);
        std::fill(stat, stat + first, 0.0f);
        std::fill(stat + end, stat + seg[A_N], 0.0f);
    }
    const Tiles plan = make_tiles(runs, runs_t.size(0), [&](int64_t s) { return segs[s * ALADA_FIELDS + A_M]; });
    const AladaStats hs{float(beta1), float(bias1), 1.0f};
    const AladaUpdate hu{float(lr / bias1), float(eps), float(decay), eps, bias2, power_p, power_q};
    with_dtype(dtype, [&](auto w) {
        using T = decltype(w);
        with_flag(in_grad, [&](auto in) {
            for_each_index(static_cast<int64_t>(plan.tiles.size()), [&](int64_t i) {
                thread_local std::vector<float> q32, cols;
                const Tile& t = plan.tiles[i];
                alada_even_rows_tile<T, decltype(in)::value>(t, segs + t.seg * ALADA_FIELDS, runs + t.run * RUN_FIELDS, hs, hu, beta2,
                                                            scales[t.seg], q32, cols);
            });
        });
    });
}

// After alada_even_rows and the all_reduce: p's refit of the rows each segment does not hold whole,
// from the completed statistic (the same operations as the holder's, so p stays the same on every
// rank).
void alada_refit_rest(const at::Tensor& segs_t, const at::Tensor& runs_t, double beta2, double eps) {
    const int64_t* segs = table(segs_t, ALADA_FIELDS, "segments");
    const int64_t seg_count = segs_t.size(0);
    const std::vector<const int64_t*> run_of = single_runs(segs, seg_count, table(runs_t, RUN_FIELDS, "runs"), runs_t.size(0));
    for_each_index(seg_count, [&](int64_t s) {
        const int64_t* seg = segs + s * ALADA_FIELDS;
        auto* p = reinterpret_cast<double*>(seg[A_P]);
        const auto* stat = reinterpret_cast<const float*>(seg[A_STAT]);
        const double scale = alada_refit_scale(reinterpret_cast<const double*>(seg[A_Q]), seg[A_M], eps);
        const auto [first, end] = held_rows(seg, run_of[s]);
        for (int64_t i = 0; i < seg[A_N]; ++i)
            if (i < first || i >= end) p[i] = alada_refit_one(p[i], static_cast<double>(stat[i]), beta2, scale);
    });
}

// After alada_refit_rest: the weights of the rows alada_even_rows left cut.
void alada_update_cut_rows(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t w_dtype, bool in_grad, double lr, double eps,
                           double bias1, double bias2, double power_p, double power_q, double decay) {
    const int64_t* segs = table(segs_t, ALADA_FIELDS, "segments");
    const std::vector<int64_t> cut = cut_row_runs(segs, single_runs(segs, segs_t.size(0), table(runs_t, RUN_FIELDS, "runs"), runs_t.size(0)));
    alada_update_runs(segs, cut.data(), static_cast<int64_t>(cut.size()) / RUN_FIELDS, w_dtype, in_grad, lr, eps, bias1, bias2, power_p,
                      power_q, decay);
}

}  // namespace
}  // namespace dmo

namespace dmo {
namespace {

#if DMO_AVX2
// x - x of sixteen elements, or-ed over the blocks added: 0 in every lane while all are finite (x - x
// is NaN for inf and NaN)
struct NonfiniteLanes {
#if DMO_AVX512
    vf16 any = _mm512_setzero_ps();
    template <typename T>
    void add(const T* p) {
        const vf16 x = load16(p);
        any = _mm512_or_ps(any, _mm512_sub_ps(x, x));
    }
    void add(const NonfiniteLanes& other) { any = _mm512_or_ps(any, other.any); }
    bool found() const { return _mm512_cmp_ps_mask(any, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0; }
#else
    vf any = _mm256_setzero_ps();
    template <typename T>
    void add(const T* p) {
        const vf x = load8(p), y = load8(p + 8);
        any = _mm256_or_ps(any, _mm256_or_ps(_mm256_sub_ps(x, x), _mm256_sub_ps(y, y)));
    }
    void add(const NonfiniteLanes& other) { any = _mm256_or_ps(any, other.any); }
    bool found() const { return _mm256_movemask_ps(_mm256_cmp_ps(any, _mm256_setzero_ps(), _CMP_NEQ_UQ)) != 0; }
#endif
};
#endif

// Whether elements [lo, hi) of p hold an inf or NaN: one read, no early exit within a piece.
// The piece is read as four interleaved streams, each prefetched ahead: one stream per thread left
// the memory idle between its misses (a GPT-2-small gradient on two threads: 12.7 ms against 10.0
// with AVX-512, 17.0 ms against 12.8 with AVX2). The prefetches are non-temporal: read once, the
// gradients then evict less of what the step's Python and kernels use next.
template <typename T>
bool has_nonfinite(const T* p, int64_t lo, int64_t hi) {
    bool bad = false;
#if DMO_AVX2
    constexpr int64_t LANES = 16, STREAMS = 4, AHEAD = 1024 / sizeof(T);
    const int64_t quarter = (hi - lo) / (LANES * STREAMS) * LANES;
    NonfiniteLanes any[STREAMS];
    for (int64_t i = lo; i < lo + quarter; i += LANES)
        for (int64_t s = 0; s < STREAMS; ++s) {
            const T* at = p + i + s * quarter;
            __builtin_prefetch(at + AHEAD, 0, 0);
            any[s].add(at);
        }
    for (int64_t s = 1; s < STREAMS; ++s) any[0].add(any[s]);
    bad = any[0].found();
    lo += quarter * STREAMS;
#endif
    for (int64_t i = lo; i < hi; ++i) bad |= !std::isfinite(to_float(p[i]));
    return bad;
}

// The non-finite check of tensors, in pieces of 1M elements that threads take in turn: which
// thread reads a piece changes nothing.
class FiniteScan {
   public:
    explicit FiniteScan(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
        constexpr int64_t PIECE = int64_t(1) << 20;
        for (int64_t t = 0; t < static_cast<int64_t>(tensors_.size()); ++t) {
            const at::Tensor& x = tensors_[t];
            TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && (x.scalar_type() == at::kFloat ||
                        x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
                        "the finite check takes contiguous fp32, bf16 or fp16 CPU tensors");
            for (int64_t lo = 0; lo < x.numel(); lo += PIECE) pieces_.push_back(Piece{t, lo, std::min(x.numel(), lo + PIECE)});
        }
        bad_.assign(pieces_.size(), 0);
    }

    // read pieces until none is left
    void take() {
        for (int64_t i = next_.fetch_add(1); i < static_cast<int64_t>(pieces_.size()); i = next_.fetch_add(1)) {
            const Piece& piece = pieces_[i];
            const at::Tensor& x = tensors_[piece.tensor];
            switch (x.scalar_type()) {
                case at::kFloat: bad_[i] = has_nonfinite(x.data_ptr<float>(), piece.lo, piece.hi); break;
                case at::kBFloat16: bad_[i] = has_nonfinite(reinterpret_cast<const bf16*>(x.data_ptr()), piece.lo, piece.hi); break;
                default: bad_[i] = has_nonfinite(reinterpret_cast<const f16*>(x.data_ptr()), piece.lo, piece.hi);
            }
        }
    }

    // the first tensor holding an inf or NaN, -1 if none (after every piece was taken)
    int64_t first() const {
        for (size_t i = 0; i < pieces_.size(); ++i)
            if (bad_[i]) return pieces_[i].tensor;
        return -1;
    }

   private:
    struct Piece {
        int64_t tensor, lo, hi;
    };
    std::vector<at::Tensor> tensors_;
    std::vector<Piece> pieces_;
    std::vector<uint8_t> bad_;
    std::atomic<int64_t> next_{0};
};

// index of the first tensor holding an inf or NaN, -1 if none: the non-finite check before a step,
// at the memory's speed
int64_t first_nonfinite(std::vector<at::Tensor> tensors) {
    FiniteScan scan(std::move(tensors));
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { scan.take(); });
    return scan.first();
}

// first_nonfinite(tensors), while this thread runs `prologue` (Python: the step's bookkeeping that
// changes no state) and torch's other threads read the tensors; it then reads what is left. The
// check is memory-bound and the bookkeeping is not, so the two overlap. Returns (the index, what
// `prologue` returned); an exception of `prologue` is raised after the scan.
std::tuple<int64_t, pybind11::object> first_nonfinite_during(std::vector<at::Tensor> tensors, const pybind11::function& prologue) {
    FiniteScan scan(std::move(tensors));
    pybind11::object result;
    std::exception_ptr error;
    {
        pybind11::gil_scoped_release release;
        // the chunk starting at 0 runs on the calling thread (OpenMP's thread 0), the rest on the others
        at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t lo, int64_t) {
            if (lo == 0) {
                pybind11::gil_scoped_acquire acquire;
                try {
                    result = prologue();
                } catch (...) {
                    error = std::current_exception();
                }
            }
            scan.take();
        });
    }
    if (error) std::rethrow_exception(error);
    return {scan.first(), std::move(result)};
}

// Adds `by` in place to each step counter (torch.optim's 0-d float32 CPU state["step"]), as
// torch._foreach_add_ does, bumping each tensor's version as an in-place op does: a few
// nanoseconds a tensor where a foreach op on CPU dispatches each one (about 3 us each, more than
// some kernels take on a model of thousands of small tensors). False, with nothing changed, where
// a counter is not such a tensor.
bool advance_steps(const std::vector<at::Tensor>& steps, double by) {
    for (const at::Tensor& t : steps)
        if (!t.device().is_cpu() || t.scalar_type() != at::kFloat || t.numel() != 1 || t.requires_grad() || t.is_inference())
            return false;
    const float add = static_cast<float>(by);
    for (const at::Tensor& t : steps) {
        *t.data_ptr<float>() += add;
        t.unsafeGetTensorImpl()->bump_version();
    }
    return true;
}

// (row partial floats, column partial floats, tiles) per statistic of a step's tiles: what a dry
// run reports without stepping
std::tuple<int64_t, int64_t, int64_t> tile_partials(const at::Tensor& segs_t, const at::Tensor& runs_t, int64_t m_field) {
    const int64_t fields = segs_t.size(1);
    const int64_t* segs = table(segs_t, fields, "segments");
    const Tiles plan = make_tiles(table(runs_t, RUN_FIELDS, "runs"), runs_t.size(0), [&](int64_t s) { return segs[s * fields + m_field]; });
    return {plan.row_partials, plan.col_partials, static_cast<int64_t>(plan.tiles.size())};
}

}  // namespace
}  // namespace dmo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.doc() = "dist_memopt's fused CPU kernels for SMMF and Alada";
    module.def("smmf_step", &dmo::smmf_step);
    module.def("smmf_finish", &dmo::smmf_finish);
    module.def("alada_stats", &dmo::alada_stats);
    module.def("alada_refit", &dmo::alada_refit_all);
    module.def("alada_update", &dmo::alada_update);
    module.def("alada_even_rows", &dmo::alada_even_rows);
    module.def("alada_refit_rest", &dmo::alada_refit_rest);
    module.def("alada_update_cut_rows", &dmo::alada_update_cut_rows);
    module.def("tile_partials", &dmo::tile_partials);
    module.def("first_nonfinite", &dmo::first_nonfinite);
    module.def("first_nonfinite_during", &dmo::first_nonfinite_during);
    module.def("advance_steps", &dmo::advance_steps);
    module.def("simd", []() { return DMO_AVX512 ? "avx512" : DMO_AVX2 ? "avx2" : "scalar"; });
}
