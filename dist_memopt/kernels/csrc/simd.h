// Eight- and sixteen-lane fp32 blocks for the CPU kernels: loads and stores of fp32, bf16 and fp16
// elements, and the scalar twins every head and tail element goes through. With AVX2 + FMA + F16C
// (the build passes -march=native) a block is one __m256, with AVX-512 also one __m512; without
// them every element takes the scalar code. The scalar and
// vector forms round alike (one fused multiply-add where the vector form has one), so an element's
// result does not depend on whether it fell in a block or in a head or tail.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// DMO_FORCE_SCALAR builds the scalar code on any processor: what machines without AVX2 (aarch64,
// older x86) run, built and checked on those that have it (tests/test_cpu_kernels.py)
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(DMO_FORCE_SCALAR)
#include <immintrin.h>
#define DMO_AVX2 1
#else
#define DMO_AVX2 0
#endif
#if DMO_AVX2 && defined(__AVX512F__)
#define DMO_AVX512 1
#else
#define DMO_AVX512 0
#endif

namespace dmo {

// Streams are prefetched this far ahead: the hardware prefetcher alone left a thread waiting on
// its loads (GPT-2 small's SMMF step took 77 ms of CPU time on one thread without, 41 ms with);
// 4 KB ahead was as fast as 8 KB or faster for every kernel, interleaved on this 2-core machine.
#ifndef DMO_PREFETCH_BYTES
#define DMO_PREFETCH_BYTES 4096
#endif
constexpr int PREFETCH_BYTES = DMO_PREFETCH_BYTES;

// WRITE: the line will be stored to as well (fetched for ownership), else only read
template <bool WRITE, typename T>
inline void prefetch_ahead(const T* p) {
#if defined(__GNUC__)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, WRITE ? 1 : 0, 3);
#endif
}

using bf16 = c10::BFloat16;
using f16 = c10::Half;

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }
inline float to_float(f16 x) { return static_cast<float>(x); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) { return bf16(x); }  // nearest even; NaN -> 0x7FC0
template <> inline f16 from_float<f16>(float x) { return f16(x); }     // nearest even

#if DMO_AVX2
using vf = __m256;

inline vf splat(float x) { return _mm256_set1_ps(x); }
inline vf loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void storef(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vsqrt(vf a) { return _mm256_sqrt_ps(a); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
// bit j set where lane j >= 0 (ordered: NaN gives 0, -0.0 gives 1), as torch.ge(x, 0)
inline unsigned nonnegative_bits(vf a) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GE_OQ)));
}

template <typename T> inline vf load8(const T* p);
template <> inline vf load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline vf load8<bf16>(const bf16* p) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
template <> inline vf load8<f16>(const f16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename T> inline void store8(T* p, vf x);
template <> inline void store8<float>(float* p, vf x) { _mm256_storeu_ps(p, x); }
template <> inline void store8<bf16>(bf16* p, vf x) {
    // round to nearest even by the bits, NaN to 0x7FC0: what c10::BFloat16(float) does per element
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
template <> inline void store8<f16>(f16* p, vf x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// the eight lanes summed in a fixed order
inline float hsum(vf x) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, x);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

#if DMO_AVX512
// Sixteen-lane blocks: half the instructions per element of eight-lane ones.
using vf16 = __m512;

template <typename T> inline vf16 load16(const T* p);
template <> inline vf16 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline vf16 load16<bf16>(const bf16* p) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <> inline vf16 load16<f16>(const f16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T> inline void store16(T* p, vf16 x);
template <> inline void store16<float>(float* p, vf16 x) { _mm512_storeu_ps(p, x); }
template <> inline void store16<bf16>(bf16* p, vf16 x) {  // as store8<bf16>: nearest even, NaN to 0x7FC0
    __m512i bits = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
template <> inline void store16<f16>(f16* p, vf16 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// the sixteen lanes summed in a fixed order (each half as hsum does)
inline float hsum(vf16 x) {
    return hsum(_mm512_castps512_ps256(x)) + hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#endif

}  // namespace dmo
