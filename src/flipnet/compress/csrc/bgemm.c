/*
 * flipnet packed binary kernels: XNOR-popcount GEMM, channel packing and packed im2col.
 *
 * Layout conventions (shared with flipnet/compress/packed.py):
 *   - A +1 value is bit 1, a -1 value is bit 0; value i of a group is bit i % 64 of word i / 64.
 *     Padding bits beyond the last channel are 0 in activations and weights alike.
 *   - Activations are packed per pixel along channels (NHWC, "channel-packed"): words[n][h][w][cw].
 *   - im2col rows are [tap = kh*KW + kw][cw] for one output pixel: Kw = KH*KW*Cw words.
 *   - Weights are pre-arranged in blocks of 16 output channels: wt[(ob*Kw + k)*16 + j] is word k of
 *     output channel ob*16 + j (zero words for channels beyond O).
 *
 * For +-1 vectors a, w of K terms packed that way, a . w = K - 2 * popcount(a XOR w).
 * The GEMM writes y = K - 2 * popcount + corr as float, in [N][O][HW] order or channels last
 * ([N][HW][O], contiguous per-pixel stores; HW = 1 for a dense layer), where corr (optional)
 * corrects zero padding: padded taps are packed as -1 and contributed -sum(w) over the
 * out-of-bounds taps, which corr adds back.
 *
 * Built by flipnet/compress/_kernels.py with -O3 -march=native (and -fopenmp when available).
 */
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define FN_HAVE_AVX512_POPCNT 1
#else
#define FN_HAVE_AVX512_POPCNT 0
#endif

#define FN_OBLOCK 16 /* output channels per weight block */
#define FN_PBLOCK 4  /* pixels per register tile */

int fn_abi_version(void) { return 5; }

int fn_simd_level(void) { return FN_HAVE_AVX512_POPCNT ? 512 : 64; }

int fn_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Transpose a 64x64 bit matrix in place: bit j of a[i] <-> bit i of a[j] (recursive block swap). */
static void fn_transpose64(uint64_t a[64]) {
    uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j != 0; j >>= 1, m ^= m << j) {
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
    }
}

/* Bits (v[i] >= 0) of up to 64 consecutive floats, bit i for v[i]; count <= 64. */
static inline uint64_t fn_sign_bits(const float *v, int64_t count) {
    uint64_t r = 0;
    int64_t i = 0;
#if FN_HAVE_AVX512_POPCNT
    __m512 zero = _mm512_setzero_ps();
    for (; i + 16 <= count; i += 16)
        r |= (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), zero, _CMP_GE_OQ) << i;
#endif
    for (; i < count; i++)
        if (v[i] >= 0.0f) r |= (uint64_t)1 << i;
    return r;
}

/*
 * Pack sign bits of x[n][c][p] (NCHW, float) into words out[n][p][cw] (channel-packed NHWC).
 * A dense input is C = features, HW = 1. Bit c % 64 of word c / 64 is (x >= 0); padding bits 0.
 * For HW > 1, 64 channels x 64 pixels are read as 64 pixel masks and bit-transposed.
 */
void fn_pack_nchw(const float *x, int64_t N, int64_t C, int64_t HW, uint64_t *out, int64_t Cw, int nthreads) {
    (void)nthreads;
    if (HW == 1) {
        int64_t total = N * Cw;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * C > (1 << 18))
#endif
        for (int64_t t = 0; t < total; t++) {
            int64_t n = t / Cw, cw = t % Cw;
            int64_t c0 = cw * 64, cnt = C - c0 < 64 ? C - c0 : 64;
            out[t] = fn_sign_bits(x + n * C + c0, cnt);
        }
        return;
    }
    int64_t PB = (HW + 63) / 64;
    int64_t total = N * Cw * PB;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * C * HW > (1 << 18))
#endif
    for (int64_t t = 0; t < total; t++) {
        int64_t n = t / (Cw * PB), r = t % (Cw * PB);
        int64_t cw = r / PB, pb = r % PB;
        int64_t c0 = cw * 64, p0 = pb * 64;
        int64_t nc = C - c0 < 64 ? C - c0 : 64;
        int64_t np = HW - p0 < 64 ? HW - p0 : 64;
        uint64_t blk[64];
        for (int64_t i = 0; i < nc; i++) blk[i] = fn_sign_bits(x + (n * C + c0 + i) * HW + p0, np);
        for (int64_t i = nc; i < 64; i++) blk[i] = 0;
        fn_transpose64(blk); /* blk[j]: channel bits of pixel p0 + j */
        uint64_t *o = out + (n * HW + p0) * Cw + cw;
        for (int64_t j = 0; j < np; j++) o[j * Cw] = blk[j];
    }
}

/* im2col over channel-packed words. pad_full / pad_last: words used for out-of-bounds taps. */
void fn_im2col(const uint64_t *xp, int64_t N, int64_t H, int64_t W, int64_t Cw, int64_t KH, int64_t KW,
               int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t OH, int64_t OW,
               uint64_t pad_full, uint64_t pad_last, uint64_t *A, int nthreads) {
    (void)nthreads;
    int64_t M = N * OH * OW;
    int64_t Kw = KH * KW * Cw;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * Kw > 32768)
#endif
    for (int64_t m = 0; m < M; m++) {
        int64_t n = m / (OH * OW), r = m % (OH * OW);
        int64_t oh = r / OW, ow = r % OW;
        uint64_t *row = A + m * Kw;
        for (int64_t kh = 0; kh < KH; kh++) {
            int64_t ih = oh * SH - PH + kh * DH;
            for (int64_t kw = 0; kw < KW; kw++) {
                int64_t iw = ow * SW - PW + kw * DW;
                uint64_t *dst = row + (kh * KW + kw) * Cw;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                    for (int64_t c = 0; c < Cw - 1; c++) dst[c] = pad_full;
                    if (Cw > 0) dst[Cw - 1] = pad_last;
                } else {
                    const uint64_t *src = xp + ((n * H + ih) * W + iw) * Cw;
                    for (int64_t c = 0; c < Cw; c++) dst[c] = src[c];
                }
            }
        }
    }
}

static inline void fn_store(float *out, const float *corr, int64_t m, int64_t o0, int64_t O, int64_t HW,
                            int64_t Kbits, const int64_t *cnt /* [FN_OBLOCK] */) {
    int64_t n = m / HW, pix = m % HW;
    for (int64_t j = 0; j < FN_OBLOCK && o0 + j < O; j++) {
        int64_t o = o0 + j;
        float y = (float)(Kbits - 2 * cnt[j]);
        if (corr) y += corr[o * HW + pix];
        out[(n * O + o) * HW + pix] = y;
    }
}

/* NHWC output: the 16 channels of a pixel are contiguous (vectorised convert and store). */
static inline void fn_store_nhwc(float *out, const float *corr, int64_t m, int64_t o0, int64_t O, int64_t HW,
                                 int64_t Kbits, const int64_t *cnt) {
    int64_t pix = m % HW;
    float *dst = out + m * O + o0;
    int64_t nj = O - o0 < FN_OBLOCK ? O - o0 : FN_OBLOCK;
    if (corr) {
        const float *c = corr + pix * O + o0;
        for (int64_t j = 0; j < nj; j++) dst[j] = (float)(Kbits - 2 * cnt[j]) + c[j];
    } else {
        for (int64_t j = 0; j < nj; j++) dst[j] = (float)(Kbits - 2 * cnt[j]);
    }
}

#if FN_HAVE_AVX512_POPCNT
/* P pixels x 16 channels register tile; P is a compile-time constant after inlining. */
static inline void fn_tile(const uint64_t *A, int64_t m0, int P, int64_t Kw, const uint64_t *wb, int64_t *cnt) {
    __m512i acc[FN_PBLOCK][2];
    for (int p = 0; p < P; p++) acc[p][0] = acc[p][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kw; k++) {
        __m512i w0 = _mm512_loadu_si512((const void *)(wb + k * FN_OBLOCK));
        __m512i w1 = _mm512_loadu_si512((const void *)(wb + k * FN_OBLOCK + 8));
        for (int p = 0; p < P; p++) {
            __m512i a = _mm512_set1_epi64((long long)A[(m0 + p) * Kw + k]);
            acc[p][0] = _mm512_add_epi64(acc[p][0], _mm512_popcnt_epi64(_mm512_xor_si512(a, w0)));
            acc[p][1] = _mm512_add_epi64(acc[p][1], _mm512_popcnt_epi64(_mm512_xor_si512(a, w1)));
        }
    }
    for (int p = 0; p < P; p++) {
        _mm512_storeu_si512((void *)(cnt + p * FN_OBLOCK), acc[p][0]);
        _mm512_storeu_si512((void *)(cnt + p * FN_OBLOCK + 8), acc[p][1]);
    }
}
#else
static inline void fn_tile(const uint64_t *A, int64_t m0, int P, int64_t Kw, const uint64_t *wb, int64_t *cnt) {
    for (int p = 0; p < P; p++) {
        const uint64_t *a = A + (m0 + p) * Kw;
        int64_t *c = cnt + p * FN_OBLOCK;
        for (int j = 0; j < FN_OBLOCK; j++) c[j] = 0;
        for (int64_t k = 0; k < Kw; k++) {
            uint64_t av = a[k];
            const uint64_t *w = wb + k * FN_OBLOCK;
            for (int j = 0; j < FN_OBLOCK; j++) c[j] += __builtin_popcountll(av ^ w[j]);
        }
    }
}
#endif

/*
 * out[n][o][pix] = Kbits - 2 * popcount(A[m] XOR W[o]) + corr[o][pix], m = n * HW + pix.
 * A: [M][Kw] words; wt: blocked weights (see top); corr: [O][HW] floats or NULL.
 * With nhwc != 0 the output is out[m][o] (channels last) and corr is [HW][O].
 */
void fn_bgemm(const uint64_t *A, int64_t M, int64_t Kw, const uint64_t *wt, int64_t O, int64_t Kbits,
              int64_t HW, const float *corr, float *out, int nhwc, int nthreads) {
    (void)nthreads;
    int64_t OB = (O + FN_OBLOCK - 1) / FN_OBLOCK;
    int64_t MB = (M + FN_PBLOCK - 1) / FN_PBLOCK;
    /* Tiles: a pixel block times a chunk of output blocks. A chunk's weights (about 64 KiB at most)
     * stay in L1/L2 while the pixel blocks stream past; the A rows of a tile stay in L1. */
    int64_t chunk = Kw > 0 ? 65536 / (Kw * FN_OBLOCK * (int64_t)sizeof(uint64_t)) : OB; /* Kw = 0: no input */
    if (chunk < 1) chunk = 1;
    if (chunk > OB) chunk = OB;
    int64_t OC = (OB + chunk - 1) / chunk;
    int64_t tiles = MB * OC;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * Kw * O > 200000)
#endif
    for (int64_t t = 0; t < tiles; t++) {
        int64_t oc = t / MB, mb = t % MB; /* consecutive tiles share the weight chunk */
        int64_t m0 = mb * FN_PBLOCK;
        int P = (int)(M - m0 < FN_PBLOCK ? M - m0 : FN_PBLOCK);
        int64_t cnt[FN_PBLOCK * FN_OBLOCK];
        int64_t ob_end = (oc + 1) * chunk < OB ? (oc + 1) * chunk : OB;
        for (int64_t ob = oc * chunk; ob < ob_end; ob++) {
            const uint64_t *wb = wt + ob * Kw * FN_OBLOCK;
            if (P == FN_PBLOCK)
                fn_tile(A, m0, FN_PBLOCK, Kw, wb, cnt);
            else
                fn_tile(A, m0, P, Kw, wb, cnt);
            if (nhwc) {
                for (int p = 0; p < P; p++)
                    fn_store_nhwc(out, corr, m0 + p, ob * FN_OBLOCK, O, HW, Kbits, cnt + p * FN_OBLOCK);
            } else {
                for (int p = 0; p < P; p++)
                    fn_store(out, corr, m0 + p, ob * FN_OBLOCK, O, HW, Kbits, cnt + p * FN_OBLOCK);
            }
        }
    }
}

/*
 * Whole binary convolution in one call: pack the float input (NCHW, or NHWC with in_nhwc) per pixel,
 * im2col over packed words (skipped for a 1x1, stride-1, unpadded kernel), XNOR-popcount GEMM into a
 * float output (NCHW, or NHWC with out_nhwc).
 * pt / pl: top and left padding (bottom and right follow from OH, OW). Returns 0, or -1 when
 * scratch memory cannot be allocated.
 */
int fn_conv2d(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, const uint64_t *wt, int64_t O, int64_t KH,
              int64_t KW, int64_t SH, int64_t SW, int64_t PT, int64_t PL, int64_t DH, int64_t DW, int64_t OH,
              int64_t OW, uint64_t pad_full, uint64_t pad_last, const float *corr, float *out, int in_nhwc,
              int out_nhwc, uint64_t *scratch, int64_t scratch_words, int nthreads) {
    int64_t Cw = (C + 63) / 64;
    int64_t M = N * OH * OW;
    int64_t Kw = KH * KW * Cw;
    int direct = KH == 1 && KW == 1 && SH == 1 && SW == 1 && PT == 0 && PL == 0 && OH == H && OW == W;
    int64_t need = N * H * W * Cw + (direct ? 0 : M * Kw);
    uint64_t *buf = scratch;
    if (!buf || scratch_words < need) {
        buf = (uint64_t *)malloc((size_t)need * sizeof(uint64_t));
        if (!buf) return -1;
    }
    uint64_t *xp = buf;
    if (in_nhwc)
        fn_pack_nchw(x, N * H * W, C, 1, xp, Cw, nthreads); /* rows of C contiguous channels */
    else
        fn_pack_nchw(x, N, C, H * W, xp, Cw, nthreads);
    uint64_t *A = xp;
    if (!direct) {
        A = buf + N * H * W * Cw;
        fn_im2col(xp, N, H, W, Cw, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, pad_full, pad_last, A, nthreads);
    }
    fn_bgemm(A, M, Kw, wt, O, C * KH * KW, OH * OW, corr, out, out_nhwc, nthreads);
    if (buf != scratch) free(buf);
    return 0;
}

/* Scratch words fn_conv2d needs for these sizes (pass at least this many to avoid a malloc). */
int64_t fn_conv2d_scratch(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t OH, int64_t OW) {
    int64_t Cw = (C + 63) / 64;
    return N * H * W * Cw + N * OH * OW * KH * KW * Cw;
}

/* Whole binary dense layer in one call: pack rows of x (N, F) and run the GEMM into out (N, O). */
int fn_linear(const float *x, int64_t N, int64_t F, const uint64_t *wt, int64_t O, float *out, int nthreads) {
    int64_t Fw = (F + 63) / 64;
    uint64_t stackbuf[256];
    uint64_t *A = N * Fw <= 256 ? stackbuf : (uint64_t *)malloc((size_t)(N * Fw) * sizeof(uint64_t));
    if (!A) return -1;
    fn_pack_nchw(x, N, F, 1, A, Fw, nthreads);
    fn_bgemm(A, N, Fw, wt, O, F, 1, NULL, out, 1, nthreads);
    if (A != stackbuf) free(A);
    return 0;
}

/* out[n][c][p] = +1 where (y >= t[c]) XOR flip[c], else -1 (folded BatchNorm + sign). */
void fn_threshold(const float *y, int64_t N, int64_t C, int64_t HW, const float *t, const uint8_t *flip, float *out,
                  int nthreads) {
    (void)nthreads;
    int64_t total = N * C;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * C * HW > (1 << 18))
#endif
    for (int64_t r = 0; r < total; r++) {
        int64_t c = r % C;
        const float *yr = y + r * HW;
        float *o = out + r * HW;
        float tc = t[c];
        float hi = flip[c] ? -1.0f : 1.0f;
        for (int64_t p = 0; p < HW; p++) o[p] = yr[p] >= tc ? hi : -hi;
    }
}

/* Max pooling without padding, dilation 1, floor mode: y (N, C, H, W) -> out (N, C, OH, OW).
 * Branch-free (a select per element): the data-dependent branches of a plain max loop mispredict
 * about half the time on real activations. The result equals PyTorch's, NaN included. */
void fn_maxpool2d(const float *y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t SH,
                  int64_t SW, int64_t OH, int64_t OW, float *out, int nthreads) {
    (void)nthreads;
    int64_t total = N * C;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * C * H * W > (1 << 18))
#endif
    for (int64_t r = 0; r < total; r++) {
        const float *plane = y + r * H * W;
        float *o = out + r * OH * OW;
        for (int64_t oh = 0; oh < OH; oh++) {
            float *orow = o + oh * OW;
            const float *first = plane + oh * SH * W;
            for (int64_t ow = 0; ow < OW; ow++) orow[ow] = first[ow * SW];
            for (int64_t i = 0; i < KH; i++) {
                const float *row = first + i * W;
                for (int64_t j = 0; j < KW; j++) {
                    for (int64_t ow = 0; ow < OW; ow++) {
                        float v = row[ow * SW + j];
                        orow[ow] = (v > orow[ow] || v != v) ? v : orow[ow]; /* NaN propagates, as in PyTorch */
                    }
                }
            }
        }
    }
}

/* Channels-last threshold: out[r][c] = +1 where (y[r][c] >= t[c]) XOR flip[c], else -1; rows = N*H*W. */
void fn_threshold_nhwc(const float *y, int64_t rows, int64_t C, const float *t, const uint8_t *flip, float *out,
                       int nthreads) {
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * C > (1 << 18))
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *yr = y + r * C;
        float *o = out + r * C;
        for (int64_t c = 0; c < C; c++) {
            int ge = yr[c] >= t[c];
            o[c] = (ge ^ (int)flip[c]) ? 1.0f : -1.0f;
        }
    }
}

/* Channels-last max pooling (no padding, dilation 1, floor mode): y (N, H, W, C) -> out (N, OH, OW, C). */
void fn_maxpool2d_nhwc(const float *y, int64_t N, int64_t H, int64_t W, int64_t C, int64_t KH, int64_t KW,
                       int64_t SH, int64_t SW, int64_t OH, int64_t OW, float *out, int nthreads) {
    (void)nthreads;
    int64_t total = N * OH * OW;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * C * H * W > (1 << 18))
#endif
    for (int64_t r = 0; r < total; r++) {
        int64_t n = r / (OH * OW), q = r % (OH * OW);
        int64_t oh = q / OW, ow = q % OW;
        float *o = out + r * C;
        const float *first = y + ((n * H + oh * SH) * W + ow * SW) * C;
        for (int64_t c = 0; c < C; c++) o[c] = first[c];
        for (int64_t i = 0; i < KH; i++)
            for (int64_t j = 0; j < KW; j++) {
                const float *v = first + (i * W + j) * C;
                for (int64_t c = 0; c < C; c++) o[c] = (v[c] > o[c] || v[c] != v[c]) ? v[c] : o[c];
            }
    }
}
