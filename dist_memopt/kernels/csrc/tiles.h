// Tiles of a segment's runs in its (n, m) view, and the spans of a view row that a run holds.
//
// The same description the Triton kernels take (dist_memopt/kernels/tiles.py): a segment's local
// elements are run groups, `count` runs of `length` global flat positions `stride` apart, the
// i-th run's elements at local indices k0 + i*length + j. A tile is up to rows_per_tile(m)
// consecutive view rows of one run group. Tiles are cut from the geometry alone, never from the
// thread count, and every partial sum is combined in tile order: a step's result is the same with
// 1 or 16 threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dmo {

// per run group: segment index, start, length, stride, count, k0
constexpr int RUN_FIELDS = 6;

struct Tile {
    int64_t seg;   // segment index
    int64_t run;   // run group index
    int64_t row0;  // first view row
    int64_t rows;  // view rows in this tile
    int64_t rowp;  // offset of its row partials (one per row, per statistic)
    int64_t colp;  // offset of its column partials (m per statistic)
};

// Enough rows that a tile's column partials (m floats per statistic, written once and read once)
// cost under 0.07 bytes per element and that filling and summing SplitColumns' copies is a small
// part of a tile (GPT-2 small's SMMF step where memory is fast: 1.28x an in-place add's time with
// 2^19 elements per tile, 1.33x with 2^17), few enough that a model makes many tiles for the
// threads (a 768 x 768 view: 2; GPT-2 small: about 350).
inline int64_t rows_per_tile(int64_t m) { return std::max<int64_t>(128, (int64_t(1) << 19) / std::max<int64_t>(m, 1)); }

struct Tiles {
    std::vector<Tile> tiles;
    int64_t row_partials = 0;  // floats per statistic in all tiles' row partials
    int64_t col_partials = 0;  // and in their column partials
};

// Tiles of every run group, in (segment, run group, row) order. `cols_of(seg)` is the view's m.
template <typename ColsOf>
Tiles make_tiles(const int64_t* runs, int64_t run_count, ColsOf cols_of) {
    Tiles out;
    std::vector<Tile>& tiles = out.tiles;
    int64_t& rowp = out.row_partials;
    int64_t& colp = out.col_partials;
    for (int64_t r = 0; r < run_count; ++r) {
        const int64_t* run = runs + r * RUN_FIELDS;
        const int64_t seg = run[0], start = run[1], length = run[2], stride = run[3], count = run[4];
        const int64_t m = cols_of(seg);
        const int64_t last = start + (count - 1) * stride + length;  // one past the last position
        const int64_t first_row = start / m, end_row = (last - 1) / m + 1;
        const int64_t per_tile = rows_per_tile(m);
        for (int64_t row0 = first_row; row0 < end_row; row0 += per_tile) {
            const int64_t rows = std::min(per_tile, end_row - row0);
            tiles.push_back(Tile{seg, r, row0, rows, rowp, colp});
            rowp += rows;
            colp += m;
        }
    }
    return out;
}

// The local index of (r, 0) if rows [r, r + rows) lie whole in one run of consecutive positions, else -1.
inline int64_t whole_rows_at(const int64_t* run, int64_t m, int64_t r, int64_t rows) {
    const int64_t start = run[1], length = run[2], count = run[4], k0 = run[5];
    if (count != 1 || r * m < start || (r + rows) * m > start + length) return -1;
    return k0 + r * m - start;
}

// Calls f(c_lo, c_hi, k) for each span [c_lo, c_hi) of view row r held by run group `run`,
// k the local index of column c_lo.
template <typename F>
inline void for_each_span(const int64_t* run, int64_t m, int64_t r, F&& f) {
    const int64_t start = run[1], length = run[2], stride = run[3], count = run[4], k0 = run[5];
    const int64_t lo = r * m, hi = lo + m;
    int64_t first = 0, end = 1;
    if (count > 1) {  // runs i with start + i*stride < hi and start + i*stride + length > lo
        const int64_t below = lo - start - length;
        first = below < 0 ? 0 : below / stride + 1;
        const int64_t above = hi - start;
        end = above <= 0 ? 0 : std::min(count, (above + stride - 1) / stride);
    }
    for (int64_t i = first; i < end; ++i) {
        const int64_t p0 = start + i * stride;
        const int64_t s = std::max(lo, p0), e = std::min(hi, p0 + length);
        if (s < e) f(s - lo, e - lo, k0 + i * length + (s - p0));
    }
}

// A tile's column partials of 1 or 2 statistics split over up to MAX_PARTS copies that consecutive
// row groups take in turn, each statistic's copies summed in order into its first at the end. A
// group's loads of a partial then come PART_SPACING columns or more after the stores that wrote
// it: where memory is fast, loads that follow those stores by one row group of a view 768 wide
// stalled the step (docs/design.md, "The fused CPU kernels").
class SplitColumns {
  public:
    static constexpr int MAX_PARTS = 8;
    static constexpr int64_t PART_SPACING = 16384;

    SplitColumns(float* first0, float* first1, int stats, int64_t m, int64_t groups) : m_(m), stats_(stats) {
        count_ = static_cast<int>(std::clamp<int64_t>(std::min((PART_SPACING + m - 1) / m, groups), 1, MAX_PARTS));
        parts_[0][0] = first0;
        parts_[0][1] = first1;
        if (count_ == 1) return;
        float* scratch = thread_scratch(int64_t(count_ - 1) * stats * m);
        for (int j = 1; j < count_; ++j)
            for (int s = 0; s < stats; ++s) {
                parts_[j][s] = scratch + ((j - 1) * stats + s) * m;
                std::fill(parts_[j][s], parts_[j][s] + m, 0.0f);
            }
    }
    float* at(int stat) const { return parts_[turn_][stat]; }
    void advance() { turn_ = turn_ + 1 == count_ ? 0 : turn_ + 1; }
    void fold() const {
        for (int j = 1; j < count_; ++j)
            for (int s = 0; s < stats_; ++s)
                for (int64_t c = 0; c < m_; ++c) parts_[0][s][c] += parts_[j][s][c];
    }

  private:
    // this thread's scratch of at least `floats`, 64-byte aligned, kept between calls
    static float* thread_scratch(int64_t floats) {
        static thread_local std::vector<float> buffer;
        if (static_cast<int64_t>(buffer.size()) < floats + 16) buffer.resize(floats + 16);
        const auto misalign = reinterpret_cast<uintptr_t>(buffer.data()) % 64;
        return buffer.data() + (misalign ? (64 - misalign) / sizeof(float) : 0);
    }

    float* parts_[MAX_PARTS][2] = {};
    int64_t m_;
    int stats_, count_ = 1, turn_ = 0;
};

}  // namespace dmo
