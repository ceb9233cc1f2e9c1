//! x86-64 kernels: AVX-512 float32 FMA, AVX512_BF16 `vdpbf16ps` pairs, and AVX2 float32 FMA.

use std::arch::x86_64::*;
use std::ops::Range;

use half::bf16;
use mp_core::{DType, Element};

use super::driver::{Kernel, Tile};
use super::scalar::{PREFETCH_ROWS, pack_f32, pack_rows_f32, prefetch, store_tile_scalar};

/// Rows ahead that packing B prefetches.
const PF_B_ROWS: usize = 8;
use super::{GemmInput, GemmOutput};

// ------------------------------------------------------------------------------------------------
// AVX-512 helpers
// ------------------------------------------------------------------------------------------------

/// A mask of the first `lanes` (<= 16) lanes.
#[inline(always)]
fn mask16(lanes: usize) -> __mmask16 {
    if lanes >= 16 {
        0xffff
    } else {
        ((1u32 << lanes) - 1) as __mmask16
    }
}

/// A mask of the first `lanes` (<= 32) lanes.
#[inline(always)]
fn mask32(lanes: usize) -> __mmask32 {
    if lanes >= 32 {
        u32::MAX
    } else {
        (1u32 << lanes) - 1
    }
}

/// Loads the first lanes of 16 elements as float32 (the rest zero; masked lanes are not read).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn load16<E: Element>(src: *const E, mask: __mmask16) -> __m512 {
    // SAFETY: the caller guarantees the unmasked lanes are readable.
    unsafe {
        match E::DTYPE {
            DType::F32 => _mm512_maskz_loadu_ps(mask, src.cast()),
            DType::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src.cast())),
            DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(mask, src.cast()),
            ))),
        }
    }
}

/// Rounds float32 lanes to bfloat16 bits (in the low half of each 32-bit lane), to nearest even,
/// NaN kept quiet: exactly what `half::bf16::from_f32` does.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
fn bf16_bits_512(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let hi = _mm512_srli_epi32::<16>(bits);
    let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        bits,
        _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
    ));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)))
}

/// Stores the first lanes of `x` as `E` (rounded to nearest even).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn store16<E: Element>(dst: *mut E, x: __m512, mask: __mmask16) {
    // SAFETY: the caller guarantees the unmasked lanes are writable.
    unsafe {
        match E::DTYPE {
            DType::F32 => _mm512_mask_storeu_ps(dst.cast(), mask, x),
            DType::F16 => _mm256_mask_storeu_epi16(
                dst.cast(),
                mask,
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x),
            ),
            DType::BF16 => {
                _mm256_mask_storeu_epi16(dst.cast(), mask, _mm512_cvtepi32_epi16(bf16_bits_512(x)))
            }
        }
    }
}

/// The epilogue on 16 lanes of one row of a tile, then the store.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn epilogue16<O: GemmOutput>(
    acc: __m512,
    c: *mut O,
    bias: *const f32,
    mask: __mmask16,
    tile: &Tile<O>,
) {
    let zero = _mm512_setzero_ps();
    let mut x = _mm512_mul_ps(acc, _mm512_set1_ps(tile.alpha));
    // SAFETY: the unmasked lanes of C and of the bias are inside the tile.
    unsafe {
        if tile.beta != 0.0 {
            x = _mm512_fmadd_ps(_mm512_set1_ps(tile.beta), load16(c, mask), x);
        }
        if !bias.is_null() {
            x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, bias));
        }
        if tile.relu {
            // x < 0 -> 0; NaN (unordered) and -0.0 are kept.
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, zero);
            x = _mm512_mask_mov_ps(x, neg, zero);
        }
        store16(c, x, mask);
    }
}

/// Expands `$body` for each constant `$i` in `0..$n` (`$n` at most 16, a constant): the
/// microkernels index their accumulator arrays only with constants, so the compiler keeps them in
/// registers instead of materialising the arrays in memory (with loops it copies them in and out
/// around every call).
macro_rules! unroll {
    ($n:expr, |$i:ident| $body:block) => {
        unroll!(@go $n, $i, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@go $n:expr, $i:ident, $body:block, $($k:literal)*) => {{
        const { assert!($n <= 16) };
        $({
            #[allow(non_upper_case_globals)]
            const $i: usize = $k;
            if $i < $n $body
        })*
    }};
}

/// Loads the accumulators from the workspace tile unless this is the first depth block; with
/// [`Tile::acc_in_c`], from C (times beta in the first block, skipped when beta is zero).
macro_rules! init_acc {
    ($acc:ident, $mr:expr, $nv:expr, $first:expr, $w:expr, $tile:expr) => {
        let tile = $tile;
        if tile.acc_in_c {
            if !$first || tile.beta != 0.0 {
                let scale = _mm512_set1_ps(if $first { tile.beta } else { 1.0 });
                unroll!($mr, |I| {
                    if I < tile.rows {
                        // SAFETY: row I of the tile is inside C.
                        let c = unsafe { tile.c.add(I * tile.ldc) };
                        unroll!($nv, |V| {
                            let col = V * 16;
                            if col < tile.cols {
                                // SAFETY: the unmasked lanes are inside the tile.
                                let x = unsafe { load16(c.add(col), mask16(tile.cols - col)) };
                                $acc[I][V] = _mm512_mul_ps(scale, x);
                            }
                        })
                    }
                })
            }
        } else if !$first {
            unroll!($mr, |I| {
                unroll!($nv, |V| {
                    // SAFETY: the workspace tile is MR x 16 NV floats, 64-byte aligned.
                    $acc[I][V] = unsafe { _mm512_load_ps($w.add((I * $nv + V) * 16)) };
                })
            })
        }
    };
}

/// Stores the accumulators: through the epilogue to C when `last`, else to the workspace tile.
macro_rules! store_acc {
    ($acc:ident, $mr:expr, $nv:expr, $w:expr, $last:expr, $tile:expr) => {{
        let tile = $tile;
        if tile.acc_in_c && !$last {
            // Partial sums back to C, unrounded (C is float32 here).
            unroll!($mr, |I| {
                if I < tile.rows {
                    // SAFETY: row I of the tile is inside C.
                    let c = unsafe { tile.c.add(I * tile.ldc) };
                    unroll!($nv, |V| {
                        let col = V * 16;
                        if col < tile.cols {
                            // SAFETY: the unmasked lanes are inside the tile.
                            unsafe { store16(c.add(col), $acc[I][V], mask16(tile.cols - col)) };
                        }
                    })
                }
            })
        } else if $last {
            unroll!($mr, |I| {
                if I < tile.rows {
                    // SAFETY: row I of the tile is inside C.
                    let c = unsafe { tile.c.add(I * tile.ldc) };
                    unroll!($nv, |V| {
                        let col = V * 16;
                        if col < tile.cols {
                            // SAFETY: columns col.. of the row and of the bias (if any) are in
                            // the tile.
                            unsafe {
                                let bias = if tile.bias.is_null() {
                                    tile.bias
                                } else {
                                    tile.bias.add(col)
                                };
                                epilogue16(
                                    $acc[I][V],
                                    c.add(col),
                                    bias,
                                    mask16(tile.cols - col),
                                    tile,
                                );
                            }
                        }
                    })
                }
            })
        } else {
            unroll!($mr, |I| {
                unroll!($nv, |V| {
                    // SAFETY: the workspace tile is MR x 16 NV floats, 64-byte aligned.
                    unsafe { _mm512_store_ps($w.add((I * $nv + V) * 16), $acc[I][V]) };
                })
            })
        }
    }};
}

/// Up to this many packed steps a float32 microkernel call does not prefetch for the next one:
/// a call this short has no time to hide the misses, and in mnist_vit's step (projections of
/// depth 64 and 128) the prefetches cost more than they saved (see the commit that added this).
const SHORT_KP: usize = 128;

/// Prefetches what the next microkernel call will touch first: the next tile's workspace (which
/// follows this one) unless this is the last depth block, and in any case the C rows below this
/// tile, which the next tile of the same panel stores to at the end.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
fn prefetch_next<O, const MR: usize, const NV: usize>(w: *const f32, last: bool, tile: &Tile<O>) {
    if !w.is_null() && !last {
        let next = w.wrapping_add(MR * NV * 16);
        for l in 0..MR * NV {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l * 16).cast());
        }
    }
    if last || tile.acc_in_c {
        for i in 0..MR {
            let row = tile.c.wrapping_add((MR + i) * tile.ldc).cast::<u8>();
            for l in 0..(NV * 16 * size_of::<O>()).div_ceil(64) {
                // A prefetch never faults, whatever the address.
                _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_add(l * 64).cast());
            }
        }
    }
}

/// Converts `len` contiguous elements to float32 (16 lanes at a time).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn cvt_run_512<T: GemmInput>(src: *const T, len: usize, dst: *mut f32) {
    let mut i = 0;
    while i < len {
        let m = mask16(len - i);
        // SAFETY: the unmasked lanes are inside both runs.
        unsafe { _mm512_mask_storeu_ps(dst.add(i), m, load16(src.add(i), m)) };
        i += 16;
    }
}

/// Transposes a 16 x 16 block of 32-bit values (row `i` of the input becomes column `i`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    use std::array::from_fn;
    // 32-bit interleave of row pairs, within 128-bit lanes.
    let t: [__m512; 16] = from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i.is_multiple_of(2) {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // 64-bit interleave: u[4g + c] holds rows 4g..4g+4 of columns c + 4L in 128-bit lane L.
    let u: [__m512; 16] = from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let x = _mm512_castps_pd(t[4 * g + c / 2]);
        let y = _mm512_castps_pd(t[4 * g + 2 + c / 2]);
        _mm512_castpd_ps(if c.is_multiple_of(2) {
            _mm512_unpacklo_pd(x, y)
        } else {
            _mm512_unpackhi_pd(x, y)
        })
    });
    // Gather the 128-bit lanes: out[c + 4L] = (u[c].L, u[4 + c].L, u[8 + c].L, u[12 + c].L).
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w0 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(v0, v1);
        out[c + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v1);
        out[c + 4] = _mm512_shuffle_f32x4::<0x88>(w0, w1);
        out[c + 12] = _mm512_shuffle_f32x4::<0xdd>(w0, w1);
    }
    out
}

/// The transposed copy of [`Kernel::transpose_a`] for 32-bit and 16-bit elements, with 16 x 16
/// vector transposes of 32-bit lanes: a block is 16 rows by 16 steps (32-bit) or by 32 steps
/// (16-bit: steps `2j` and `2j + 1` of a row joined into one lane first, low half first, which is
/// the element order of the row). Strips of 64 rows read 64 contiguous source elements per step.
/// Rows and steps past the last whole block, and other element sizes, take the portable copy.
///
/// # Safety
/// As for [`Kernel::transpose_a`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn transpose_rows_512<T: Copy>(
    src: *const T,
    ps: usize,
    rows: Range<usize>,
    k: usize,
    dst: *mut T,
    ld: usize,
) {
    let size = size_of::<T>();
    if size != 4 && size != 2 {
        // SAFETY: forwarded.
        unsafe { super::driver::transpose_rows(src, ps, rows, k, dst, ld) };
        return;
    }
    // Steps per block: 16 lanes of one element, or of a pair of 16-bit elements.
    let qv = 64 / size;
    // Rows i..i+16 and steps q..q+qv, all inside `rows` and 0..k (the loops below).
    let block = |i: usize, q: usize| {
        // SAFETY: those elements are in the source and their copies in the destination rows (the
        // caller's promise); AVX-512 is enabled on this function.
        unsafe {
            let lanes: [__m512; 16] = std::array::from_fn(|j| {
                if size == 4 {
                    _mm512_loadu_ps(src.add(i + (q + j) * ps).cast())
                } else {
                    let lo = src.add(i + (q + 2 * j) * ps).cast::<__m256i>();
                    let hi = src.add(i + (q + 2 * j + 1) * ps).cast::<__m256i>();
                    let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo));
                    let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi));
                    _mm512_castsi512_ps(_mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)))
                }
            });
            let t = transpose16(&lanes);
            for (r, x) in t.iter().enumerate() {
                _mm512_storeu_ps(dst.add((i + r) * ld + q).cast(), *x);
            }
        }
    };
    let scalar = |i: usize, q: Range<usize>| {
        for q in q {
            // SAFETY: as above.
            unsafe { *dst.add(i * ld + q) = *src.add(i + q * ps) };
        }
    };
    const STRIP: usize = 64;
    let mut i0 = rows.start;
    while i0 < rows.end {
        let i1 = (i0 + STRIP).min(rows.end);
        let whole = i0 + (i1 - i0) / 16 * 16;
        let mut q = 0;
        while q + qv <= k {
            for i in (i0..whole).step_by(16) {
                block(i, q);
            }
            for i in whole..i1 {
                scalar(i, q..q + qv);
            }
            q += qv;
        }
        for i in i0..i1 {
            scalar(i, q..k);
            // SAFETY: the pad of row i is inside the buffer; zero bits are 0.0 in every element
            // type, so the pad adds nothing (and no stale NaN) to a pair.
            unsafe { std::ptr::write_bytes(dst.add(i * ld + k), 0, ld - k) };
        }
        i0 = i1;
    }
}

/// Packs k-major 32-bit panels `width` wide (a multiple of 16) from a source contiguous along the
/// depth, 16 x 16 blocks at a time: `load(r, s, n)` returns the 16 values of steps `s..s+n` of
/// row `r` (zero past `n`), and panel `q` at `dst + q * width * steps` gets step `s` of rows
/// `16 g..16 g + 16` at `s * width + 16 g` (zero past `rows`).
///
/// # Safety
/// `load` must be valid for `r < rows`, `s + n <= steps`; `dst` must hold the panels.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn pack_transposed_512(
    rows: usize,
    steps: usize,
    width: usize,
    dst: *mut f32,
    load: impl Fn(usize, usize, usize) -> __m512,
    prefetch_at: impl Fn(usize, usize),
) {
    debug_assert!(width.is_multiple_of(16));
    let panels = rows.div_ceil(width);
    for q in 0..panels {
        let r0 = q * width;
        // SAFETY: panel q of dst.
        let panel = unsafe { dst.add(q * width * steps) };
        let mut s0 = 0;
        while s0 < steps {
            let sn = 16.min(steps - s0);
            for g in (0..width).step_by(16) {
                let block: [__m512; 16] = std::array::from_fn(|i| {
                    let r = r0 + g + i;
                    if r < rows {
                        prefetch_at(r, s0 + 32);
                        load(r, s0, sn)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let t = transpose16(&block);
                for (s, x) in t.iter().enumerate().take(sn) {
                    // SAFETY: step s0 + s, columns g..g+16 of the panel (64-byte aligned: the
                    // panels start aligned and rows are a multiple of 16 values).
                    unsafe { _mm512_store_ps(panel.add((s0 + s) * width + g), *x) };
                }
            }
            s0 += sn;
        }
    }
}

/// Packs float32 k-major panels (see [`pack_f32`]) with AVX-512 conversions: vector copies when
/// the source is contiguous along the panel, 16 x 16 transposes when it is contiguous along the
/// depth.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_f32_512<T: GemmInput>(
    src: *const T,
    rs: usize,
    ps: usize,
    rows: usize,
    depth: usize,
    width: usize,
    dst: *mut f32,
) {
    if rs != 1 && ps == 1 && width.is_multiple_of(16) {
        // SAFETY: rows r < rows, depth p0..p0+n are in the source.
        let load =
            |r: usize, p0: usize, n: usize| unsafe { load16(src.add(r * rs + p0), mask16(n)) };
        let pf = |r: usize, p0: usize| prefetch(src.wrapping_add(r * rs + p0).cast(), 64);
        // SAFETY: forwarded.
        unsafe { pack_transposed_512(rows, depth, width, dst, load, pf) };
        return;
    }
    if rs != 1 {
        // SAFETY: forwarded (the portable path handles any strides).
        unsafe { pack_f32(src, rs, ps, rows, depth, width, dst, cvt_run_512::<T>) };
        return;
    }
    let panels = rows.div_ceil(width);
    let nv = width.div_ceil(16);
    if width < 16 {
        // Narrow panels (A, transposed): one pass down the depth, each source row split across
        // all the panels, so the source is read in order (panel by panel it would be read
        // `panels` times, one short run per row, each a page apart).
        for p in 0..depth {
            prefetch(
                src.wrapping_add((p + PF_B_ROWS) * ps).cast(),
                rows * size_of::<T>(),
            );
            for q in 0..panels {
                let r0 = q * width;
                let valid = width.min(rows - r0);
                // SAFETY: `valid` elements from (r0, p) are in the source; step p of panel q
                // holds `width` floats.
                unsafe {
                    let x = load16(src.add(r0 + p * ps), mask16(valid));
                    _mm512_mask_storeu_ps(dst.add(q * width * depth + p * width), mask16(width), x);
                }
            }
        }
        return;
    }
    for q in 0..panels {
        let r0 = q * width;
        let rn = width.min(rows - r0);
        // SAFETY: panel q of dst, which holds `panels * width * depth` floats.
        let panel = unsafe { dst.add(q * width * depth) };
        if rn == width && width.is_multiple_of(16) {
            for p in 0..depth {
                prefetch(
                    src.wrapping_add(r0 + (p + PF_B_ROWS) * ps).cast(),
                    width * size_of::<T>(),
                );
                // SAFETY: elements r0..r0+width at depth p are in the source; row p of the panel.
                unsafe {
                    let (s, d) = (src.add(r0 + p * ps), panel.add(p * width));
                    for v in 0..nv {
                        _mm512_store_ps(d.add(v * 16), load16(s.add(v * 16), 0xffff));
                    }
                }
            }
            continue;
        }
        for p in 0..depth {
            // SAFETY: element (r0, p) is in the source; row p of the panel.
            let (s, d) = unsafe { (src.add(r0 + p * ps), panel.add(p * width)) };
            for v in 0..nv {
                let valid = rn.saturating_sub(v * 16).min(16);
                let room = (width - v * 16).min(16);
                // SAFETY: `valid` lanes from element (r0 + 16 v, p) are in the source, `room`
                // lanes fit in the panel row.
                unsafe {
                    let x = if valid > 0 {
                        load16(s.add(v * 16), mask16(valid))
                    } else {
                        _mm512_setzero_ps()
                    };
                    _mm512_mask_storeu_ps(d.add(v * 16), mask16(room), x);
                }
            }
        }
    }
}

/// Packs row-major bfloat16-pair panels from a source contiguous along the depth: row `r` of the
/// panels is the source row as `depth.div_ceil(2)` pairs (the second half of an odd last pair
/// zero), rows past `rows` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn pack_rows_pairs_512(
    src: *const u16,
    rs: usize,
    rows: usize,
    depth: usize,
    width: usize,
    dst: *mut u32,
) {
    let kp = depth.div_ceil(2);
    let panels = rows.div_ceil(width);
    for r in 0..panels * width {
        // SAFETY: row r of the packed panels (2 kp halves); source row r when r < rows.
        unsafe {
            let d = dst.add(r * kp).cast::<u16>();
            if r >= rows {
                std::ptr::write_bytes(d, 0, 2 * kp);
                continue;
            }
            let s = src.add(r * rs);
            if r + PREFETCH_ROWS < rows {
                prefetch(src.wrapping_add((r + PREFETCH_ROWS) * rs).cast(), 2 * depth);
            }
            let mut i = 0;
            while i < 2 * kp {
                let n = 32.min(2 * kp - i);
                let valid = n.min(depth.saturating_sub(i));
                let x = _mm512_maskz_loadu_epi16(mask32(valid), s.add(i).cast());
                _mm512_mask_storeu_epi16(d.add(i).cast(), mask32(n), x);
                i += 32;
            }
        }
    }
}

/// Packs k-major bfloat16 pairs along the depth: panel `q` at `dst + q * width * kp` (`kp =
/// depth.div_ceil(2)`), step `s` holding `(x[r, 2s], x[r, 2s + 1])` as one `u32` per `r` (low
/// half first), zero past the rows and for the missing second element of an odd depth.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_pairs_512(
    src: *const u16,
    rs: usize,
    ps: usize,
    rows: usize,
    depth: usize,
    width: usize,
    dst: *mut u32,
) {
    let panels = rows.div_ceil(width);
    let nv = width.div_ceil(16);
    let kp = depth.div_ceil(2);
    if rs != 1 && ps == 1 && width.is_multiple_of(16) {
        // SAFETY: rows r < rows, pairs s0..s0+n (elements up to `depth`) are in the source.
        let load = |r: usize, s0: usize, n: usize| unsafe {
            let elems = (2 * n).min(depth - 2 * s0);
            _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(
                mask32(elems),
                src.add(r * rs + 2 * s0).cast(),
            ))
        };
        let pf = |r: usize, s0: usize| prefetch(src.wrapping_add(r * rs + 2 * s0).cast(), 64);
        // SAFETY: forwarded.
        unsafe { pack_transposed_512(rows, kp, width, dst.cast(), load, pf) };
        return;
    }
    if rs == 1 && width < 16 {
        // Narrow panels (A, transposed): one pass down the depth, as in `pack_f32_512`.
        for s in 0..kp {
            let has_hi = 2 * s + 1 < depth;
            let ahead = src.wrapping_add((2 * s + 4 * PREFETCH_ROWS) * ps);
            prefetch(ahead.cast(), 2 * rows);
            prefetch(ahead.wrapping_add(ps).cast(), 2 * rows);
            for q in 0..panels {
                let r0 = q * width;
                let m = mask16(width.min(rows - r0));
                // SAFETY: the unmasked elements (r0.., 2 s) and, if present, (r0.., 2 s + 1) are
                // in the source; step s of panel q holds `width` values.
                unsafe {
                    let lo_row = src.add(r0 + 2 * s * ps);
                    let lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo_row.cast()));
                    let x = if has_hi {
                        let hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                            m,
                            lo_row.add(ps).cast(),
                        ));
                        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
                    } else {
                        lo
                    };
                    _mm512_mask_storeu_epi32(
                        dst.add(q * width * kp + s * width).cast(),
                        mask16(width),
                        x,
                    );
                }
            }
        }
        return;
    }
    for q in 0..panels {
        let r0 = q * width;
        let rn = width.min(rows - r0);
        // SAFETY: panel q of dst, which holds `panels * width * kp` values.
        let panel = unsafe { dst.add(q * width * kp) };
        if rs == 1 {
            for s in 0..kp {
                let has_hi = 2 * s + 1 < depth;
                let ahead = src.wrapping_add(r0 + (2 * s + 4 * PREFETCH_ROWS) * ps);
                prefetch(ahead.cast(), 2 * width);
                prefetch(ahead.wrapping_add(ps).cast(), 2 * width);
                // SAFETY: element (r0, 2 s) is in the source; step s of the panel.
                let (lo_row, d) = unsafe { (src.add(r0 + 2 * s * ps), panel.add(s * width)) };
                for v in 0..nv {
                    let valid = rn.saturating_sub(v * 16).min(16);
                    let room = (width - v * 16).min(16);
                    // SAFETY: `valid` lanes from (r0 + 16 v, 2 s) and, if present, (.., 2 s + 1)
                    // are in the source; `room` lanes fit in the panel step.
                    unsafe {
                        let x = if valid > 0 {
                            let m = mask16(valid);
                            let lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                                m,
                                lo_row.add(v * 16).cast(),
                            ));
                            if has_hi {
                                let hi_row = lo_row.add(ps + v * 16);
                                let hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                                    m,
                                    hi_row.cast(),
                                ));
                                _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
                            } else {
                                lo
                            }
                        } else {
                            _mm512_setzero_si512()
                        };
                        _mm512_mask_storeu_epi32(d.add(v * 16).cast(), mask16(room), x);
                    }
                }
            }
        } else {
            for s in 0..kp {
                for r in 0..width {
                    let v = if r < rn {
                        // SAFETY: elements (r0 + r, 2 s) and (r0 + r, 2 s + 1) when present.
                        unsafe {
                            let e = src.add((r0 + r) * rs + 2 * s * ps);
                            let lo = *e as u32;
                            let hi = if 2 * s + 1 < depth {
                                *e.add(ps) as u32
                            } else {
                                0
                            };
                            lo | (hi << 16)
                        }
                    } else {
                        0
                    };
                    // SAFETY: inside the panel.
                    unsafe { *panel.add(s * width + r) = v };
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// AVX-512 float32 kernel
// ------------------------------------------------------------------------------------------------

/// AVX-512 float32 FMA tile rows.
pub(super) const F32_MR: usize = 6;
/// AVX-512 float32 FMA tile width in vectors of 16.
pub(super) const F32_NV: usize = 4;
/// The taller tile ([`super::GemmPath::Avx512Wide`]): rows.
pub(super) const WIDE_MR: usize = 8;
/// The taller tile: width in vectors of 16.
pub(super) const WIDE_NV: usize = 3;
/// The narrow tile, for C at most [`NARROW_N`] columns wide (convolutions with 32 filters or
/// channels, whose 64-wide tiles would be half padding): rows.
pub(super) const NARROW_MR: usize = 12;
/// The narrow tile: width in vectors of 16.
pub(super) const NARROW_NV: usize = 2;
/// The widest C the narrow tile takes.
pub(crate) const NARROW_N: usize = NARROW_NV * 16;

/// Steps per iteration of a microkernel's loop: on the Xeon the loop's own instructions held a
/// 6 x 64 tile in L1 to 88% of the FMA peak, four steps per iteration to 96%.
const STEP_UNROLL: usize = 4;

/// Runs the step loop of a microkernel over both A layouts: `$step(a_elem)` is called once per
/// packed step with a closure giving A's element of row `i` at that step.
macro_rules! for_each_step {
    ($kp:expr, $a:expr, $a_row:expr, $mr:expr, |$ai:ident| $body:block) => {{
        let (kp, a, a_row) = ($kp, $a, $a_row);
        if a_row == 1 {
            // k-major: step s of row i at a + s * MR + i.
            let mut ap = a;
            for _ in 0..kp / STEP_UNROLL {
                for _ in 0..STEP_UNROLL {
                    let $ai = |i: usize| ap.add(i);
                    $body
                    ap = ap.add($mr);
                }
            }
            for _ in 0..kp % STEP_UNROLL {
                let $ai = |i: usize| ap.add(i);
                $body
                ap = ap.add($mr);
            }
        } else {
            // Row-major: step s of row i at a + i * a_row + s.
            let mut ap = a;
            for _ in 0..kp / STEP_UNROLL {
                for _ in 0..STEP_UNROLL {
                    let $ai = |i: usize| ap.add(i * a_row);
                    $body
                    ap = ap.add(1);
                }
            }
            for _ in 0..kp % STEP_UNROLL {
                let $ai = |i: usize| ap.add(i * a_row);
                $body
                ap = ap.add(1);
            }
        }
    }};
}

/// The `MR x 16 NV` float32 FMA microkernel: per step, NV vector loads of B, MR broadcasts of A,
/// MR * NV independent FMAs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_f32_512<O: GemmOutput, const MR: usize, const NV: usize>(
    kp: usize,
    a: *const f32,
    a_row: usize,
    b: *const f32,
    w: *mut f32,
    first: bool,
    last: bool,
    tile: &Tile<O>,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    init_acc!(acc, MR, NV, first, w, tile);
    if kp > SHORT_KP {
        prefetch_next::<O, MR, NV>(w, last, tile);
    }
    let mut b = b;
    // SAFETY: the panels hold kp packed steps (B 64-byte aligned).
    unsafe {
        for_each_step!(kp, a, a_row, MR, |ai| {
            let mut bv = [_mm512_setzero_ps(); NV];
            unroll!(NV, |V| {
                bv[V] = _mm512_load_ps(b.add(V * 16));
            });
            unroll!(MR, |I| {
                let av = _mm512_set1_ps(*ai(I));
                unroll!(NV, |V| {
                    acc[I][V] = _mm512_fmadd_ps(av, bv[V], acc[I][V]);
                });
            });
            b = b.add(NV * 16);
        });
    }
    store_acc!(acc, MR, NV, w, last, tile);
}

/// The deepest GEMM that [`GemmPath::Avx512L1`](super::GemmPath::Avx512L1) runs on the in-place
/// tile instead: one depth block of it (`KC` 768, up to 1.25 of it in one block). The same
/// multiply-adds in the same order, so the same bits, but for a float32 C accumulated with alpha
/// 1 (`C += A B`, a weight gradient over several chunks) whose depth the L1 tile splits: that
/// one keeps its partial sums in C, starting from `beta C` and adding the products, where one depth
/// block adds `beta C` to their sum.
pub(crate) const SHALLOW_K: usize = 960;

/// AVX-512 float32 kernel (float16 and bfloat16 inputs widened while packing). `L1`: depth
/// blocks of 192 (a 6 x 64 panel of packed B is then 48 KiB, an L1 of that size holds it while
/// the row block of A passes under it) and A always packed; else depth blocks of 768 (B's panel
/// streams from L2, what a core with one FMA port keeps up with) and float32 A read in place.
#[derive(Debug)]
pub(super) struct Avx512Kernel<const MR: usize, const NV: usize, const L1: bool>;

// SAFETY: reads only the given panels, writes only the given tile; the dispatcher checks AVX-512.
unsafe impl<T: GemmInput, O: GemmOutput, const MR: usize, const NV: usize, const L1: bool>
    Kernel<T, O> for Avx512Kernel<MR, NV, L1>
{
    type P = f32;
    const MR: usize = MR;
    const NR: usize = NV * 16;
    const KPACK: usize = 1;
    const KC: usize = if L1 { 192 } else { 768 };
    const MC: usize = 96;
    const DIRECT_A: bool = !L1 && matches!(T::DTYPE, DType::F32);
    const ACC_IN_C: bool = true;

    unsafe fn pack_a(
        &self,
        src: *const T,
        rs: usize,
        ps: usize,
        rows: usize,
        depth: usize,
        dst: *mut f32,
    ) -> usize {
        // SAFETY: forwarded.
        unsafe {
            if ps == 1 {
                pack_rows_f32(src, rs, rows, depth, MR, dst, cvt_run_512::<T>);
                depth
            } else {
                pack_f32_512(src, rs, ps, rows, depth, MR, dst);
                1
            }
        }
    }

    unsafe fn pack_b(
        &self,
        src: *const T,
        cs: usize,
        ps: usize,
        cols: usize,
        depth: usize,
        dst: *mut f32,
    ) {
        // SAFETY: forwarded.
        unsafe { pack_f32_512(src, cs, ps, cols, depth, NV * 16, dst) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        &self,
        kp: usize,
        a: *const f32,
        a_row: usize,
        b: *const f32,
        w: *mut f32,
        first: bool,
        last: bool,
        tile: &Tile<O>,
    ) {
        // SAFETY: forwarded.
        unsafe { micro_f32_512::<O, MR, NV>(kp, a, a_row, b, w, first, last, tile) }
    }

    unsafe fn transpose_a(
        &self,
        src: *const T,
        ps: usize,
        rows: Range<usize>,
        k: usize,
        dst: *mut T,
        ld: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { transpose_rows_512(src, ps, rows, k, dst, ld) }
    }
}

// ------------------------------------------------------------------------------------------------
// Implicit-GEMM convolution tiles
// ------------------------------------------------------------------------------------------------

/// One `MR x 16 NV` tile of an implicit-GEMM convolution: A's row `i` at depth `t * c + q` (tap
/// `t`, channel `q`) is `*rows[i].add(taps[t] + q)`, read where it lies instead of from an im2col
/// matrix; `b` is a k-major packed panel of `taps.len() * c` steps. The accumulators start from
/// zero and take the depth in order, one float32 chain per element as in [`micro_f32_512`] over
/// one depth block, and the epilogue stores the tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn micro_conv_f32_512<O: GemmOutput, const MR: usize, const NV: usize>(
    rows: &[*const f32; MR],
    taps: &[usize],
    c: usize,
    b: *const f32,
    tile: &Tile<O>,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let mut b = b;
    // One packed step at channel offset `q` of the current tap's rows `ap`.
    macro_rules! step {
        ($ap:expr, $q:expr) => {{
            let mut bv = [_mm512_setzero_ps(); NV];
            unroll!(NV, |V| {
                // SAFETY: the panel holds taps.len() * c steps, 64-byte aligned.
                bv[V] = unsafe { _mm512_load_ps(b.add(V * 16)) };
            });
            unroll!(MR, |I| {
                // SAFETY: the caller's promise: every row base plus every tap offset starts
                // `c` readable elements.
                let av = _mm512_set1_ps(unsafe { *$ap[I].add($q) });
                unroll!(NV, |V| {
                    acc[I][V] = _mm512_fmadd_ps(av, bv[V], acc[I][V]);
                });
            });
            // SAFETY: still inside the panel (or one past its end).
            b = unsafe { b.add(NV * 16) };
        }};
    }
    for &t in taps {
        // SAFETY: as above.
        let ap: [*const f32; MR] = std::array::from_fn(|i| unsafe { rows[i].add(t) });
        let mut q = 0;
        for _ in 0..c / STEP_UNROLL {
            for _ in 0..STEP_UNROLL {
                step!(ap, q);
                q += 1;
            }
        }
        for _ in 0..c % STEP_UNROLL {
            step!(ap, q);
            q += 1;
        }
    }
    let w = std::ptr::null_mut::<f32>();
    store_acc!(acc, MR, NV, w, true, tile);
}

/// Rows of the implicit-GEMM convolution's narrow tile (at most 32 filters): 8 x 32, where the
/// GEMM's 12 x 32 keeps 12 row pointers live beside the accumulators (on the Xeon, 8 rows ran
/// the 28x28x32 -> 32 forward at 260-267 GFLOP/s, 12 rows at 219-255, 6 rows at 242).
pub(super) const CONV_NARROW_MR: usize = 8;

/// Rows `0..bases.len()` of an implicit-GEMM convolution into C (through `out`'s epilogue):
/// `C[r, :] = Σ_t Σ_q bases[r][taps[t] + q] · B[t c + q, :]`, B packed by [`pack_conv_b_512`]
/// into `16 NV`-wide panels of `taps.len() * c` steps, `n` columns in all.
///
/// # Safety
/// Every `bases[r] + taps[t]` must start `c` readable float32 elements, `b` must hold the packed
/// panels, C must hold `bases.len()` rows of `n` columns, and the CPU must support AVX-512 F, BW,
/// VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
pub(super) unsafe fn conv_rows_512<O: GemmOutput, const MR: usize, const NV: usize>(
    bases: &[*const f32],
    taps: &[usize],
    c: usize,
    b: *const f32,
    n: usize,
    out: &super::driver::Output<O>,
) {
    let nr = NV * 16;
    let k = taps.len() * c;
    for r0 in (0..bases.len()).step_by(MR) {
        let rows = MR.min(bases.len() - r0);
        // Rows past the end repeat the last one; the tile stores only `rows`.
        let ptrs: [*const f32; MR] = std::array::from_fn(|i| bases[r0 + i.min(rows - 1)]);
        for (q, j0) in (0..n).step_by(nr).enumerate() {
            // SAFETY: (r0, j0) is inside C; the panel and rows as the caller promised.
            unsafe {
                let tile = out.tile(r0, j0, rows, nr.min(n - j0));
                micro_conv_f32_512::<O, MR, NV>(&ptrs, taps, c, b.add(q * nr * k), &tile);
            }
        }
    }
}

/// One `MR x 16 NV` tile of an implicit-GEMM convolution's kernel gradient, transposed
/// (`dwᵀ[f, e] += Σ_p dy[p, f] · patch_p[e]`): rows are filters, columns patch entries, the depth
/// the pixels. Pixel `p`'s vector `V` of the tile's patch entries is `bases[p] + voff[V]` (16
/// entries inside one tap); its filters are `a + p * lda`, `MR` in a row. The sums start from
/// zero when `first`, else from the tile in C (float32, stored unrounded), and take the pixels in
/// order: one float32 chain per element across calls.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
unsafe fn micro_conv_dw_512<const MR: usize, const NV: usize>(
    bases: &[*const f32],
    voff: [usize; NV],
    a: *const f32,
    lda: usize,
    first: bool,
    tile: &Tile<f32>,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let w = std::ptr::null_mut::<f32>();
    init_acc!(acc, MR, NV, first, w, tile);
    let mut ap = a;
    macro_rules! step {
        ($bp:expr) => {{
            let bp: *const f32 = $bp;
            let mut bv = [_mm512_setzero_ps(); NV];
            unroll!(NV, |V| {
                // SAFETY: the caller's promise: 16 readable elements at every base + offset.
                bv[V] = unsafe { _mm512_loadu_ps(bp.add(voff[V])) };
            });
            unroll!(MR, |I| {
                // SAFETY: MR filters of every pixel's row of dy are readable.
                let av = _mm512_set1_ps(unsafe { *ap.add(I) });
                unroll!(NV, |V| {
                    acc[I][V] = _mm512_fmadd_ps(av, bv[V], acc[I][V]);
                });
            });
            ap = ap.wrapping_add(lda);
        }};
    }
    let mut chunks = bases.chunks_exact(STEP_UNROLL);
    for quad in &mut chunks {
        for &bp in quad {
            step!(bp);
        }
    }
    for &bp in chunks.remainder() {
        step!(bp);
    }
    store_acc!(acc, MR, NV, w, true, tile);
}

/// Adds one chunk of pixels into an implicit-GEMM convolution's transposed kernel gradient
/// `dwt` (`[filters, taps.len() * c]`, float32): `dwt[f, t c + q] += Σ_p dy[p, f] ·
/// bases[p][taps[t] + q]`, overwriting instead when `first`; `dy` rows `lda` apart.
///
/// # Safety
/// `c` and `filters` must be multiples of 16 and of `MR`; every `bases[p] + taps[t]` must start
/// `c` readable float32 elements, `dy` hold `bases.len()` rows, `dwt` the gradient, and the
/// CPU must support AVX-512 F, BW, VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn conv_dw_rows_512<const MR: usize>(
    bases: &[*const f32],
    taps: &[usize],
    c: usize,
    dy: *const f32,
    lda: usize,
    filters: usize,
    first: bool,
    dwt: *mut f32,
) {
    let patch = taps.len() * c;
    // Patch entry e's offset from its pixel's base.
    let off = |e: usize| taps[e / c] + e % c;
    for f0 in (0..filters).step_by(MR) {
        let mut e0 = 0;
        while e0 < patch {
            let width = (patch - e0).min(48);
            let out = super::driver::Output {
                c: dwt,
                ldc: patch,
                alpha: 1.0,
                beta: 0.0,
                bias: std::ptr::null(),
                relu: false,
            };
            // SAFETY: (f0, e0) is inside dwt; the rows and dy as the caller promised.
            unsafe {
                let mut tile = out.tile(f0, e0, MR, width);
                tile.acc_in_c = true;
                let a = dy.add(f0);
                match width {
                    48 => micro_conv_dw_512::<MR, 3>(
                        bases,
                        [off(e0), off(e0 + 16), off(e0 + 32)],
                        a,
                        lda,
                        first,
                        &tile,
                    ),
                    32 => micro_conv_dw_512::<MR, 2>(
                        bases,
                        [off(e0), off(e0 + 16)],
                        a,
                        lda,
                        first,
                        &tile,
                    ),
                    _ => micro_conv_dw_512::<MR, 1>(bases, [off(e0)], a, lda, first, &tile),
                }
            }
            e0 += width;
        }
    }
}

/// Packs a convolution kernel (`[k, n]` row-major, `T` widened to float32) into the k-major
/// panels of width `width` (a multiple of 16) that [`conv_rows_512`] reads.
///
/// # Safety
/// `kernel` must hold `k * n` elements, `dst` `n.div_ceil(width) * width * k` float32 (64-byte
/// aligned), and the CPU must support AVX-512 F, BW, VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
pub(super) unsafe fn pack_conv_b_512<T: GemmInput>(
    kernel: *const T,
    k: usize,
    n: usize,
    width: usize,
    dst: *mut f32,
) {
    // SAFETY: forwarded (element (j, p) of op(B) at kernel + j + p * n).
    unsafe { pack_f32_512(kernel, 1, n, n, k, width, dst) }
}

// ------------------------------------------------------------------------------------------------
// AVX512_BF16 kernel
// ------------------------------------------------------------------------------------------------

/// `vdpbf16ps` tile rows.
pub(super) const BF_MR: usize = 6;
/// `vdpbf16ps` tile width in vectors of 16.
pub(super) const BF_NV: usize = 4;

/// The `MR x 16 NV` bfloat16-pair microkernel: per step (two values of k), NV vector loads of B
/// pairs, MR 32-bit broadcasts of A pairs, MR * NV independent `vdpbf16ps`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_bf16_512<O: GemmOutput, const MR: usize, const NV: usize>(
    kp: usize,
    a: *const u32,
    a_row: usize,
    b: *const u32,
    w: *mut f32,
    first: bool,
    last: bool,
    tile: &Tile<O>,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    init_acc!(acc, MR, NV, first, w, tile);
    prefetch_next::<O, MR, NV>(w, last, tile);
    let mut b = b;
    // SAFETY: the panels hold kp packed steps (B 64-byte aligned); __m512i and __m512bh are both
    // 512 bits of plain data.
    unsafe {
        for_each_step!(kp, a, a_row, MR, |ai| {
            let mut bv = [_mm512_setzero_si512(); NV];
            unroll!(NV, |V| {
                bv[V] = _mm512_load_si512(b.add(V * 16).cast());
            });
            unroll!(MR, |I| {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(ai(I).read_unaligned() as i32));
                unroll!(NV, |V| {
                    acc[I][V] = _mm512_dpbf16_ps(
                        acc[I][V],
                        av,
                        std::mem::transmute::<__m512i, __m512bh>(bv[V]),
                    );
                });
            });
            b = b.add(NV * 16);
        });
    }
    store_acc!(acc, MR, NV, w, last, tile);
}

/// AVX512_BF16 kernel for bfloat16 inputs.
#[derive(Debug)]
pub(super) struct Avx512Bf16Kernel<const MR: usize, const NV: usize>;

// SAFETY: reads only the given panels, writes only the given tile; the dispatcher checks
// AVX512_BF16.
unsafe impl<O: GemmOutput, const MR: usize, const NV: usize> Kernel<bf16, O>
    for Avx512Bf16Kernel<MR, NV>
{
    type P = u32;
    const MR: usize = MR;
    const NR: usize = NV * 16;
    const KPACK: usize = 2;
    const KC: usize = 1536;
    const MC: usize = 96;
    const DIRECT_A: bool = true;
    const ACC_IN_C: bool = true;

    unsafe fn pack_a(
        &self,
        src: *const bf16,
        rs: usize,
        ps: usize,
        rows: usize,
        depth: usize,
        dst: *mut u32,
    ) -> usize {
        // SAFETY: forwarded (bf16 is a u16).
        unsafe {
            if ps == 1 {
                pack_rows_pairs_512(src.cast(), rs, rows, depth, MR, dst);
                depth.div_ceil(2)
            } else {
                pack_pairs_512(src.cast(), rs, ps, rows, depth, MR, dst);
                1
            }
        }
    }

    unsafe fn pack_b(
        &self,
        src: *const bf16,
        cs: usize,
        ps: usize,
        cols: usize,
        depth: usize,
        dst: *mut u32,
    ) {
        // SAFETY: forwarded (bf16 is a u16).
        unsafe { pack_pairs_512(src.cast(), cs, ps, cols, depth, NV * 16, dst) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        &self,
        kp: usize,
        a: *const u32,
        a_row: usize,
        b: *const u32,
        w: *mut f32,
        first: bool,
        last: bool,
        tile: &Tile<O>,
    ) {
        // SAFETY: forwarded.
        unsafe { micro_bf16_512::<O, MR, NV>(kp, a, a_row, b, w, first, last, tile) }
    }

    unsafe fn transpose_a(
        &self,
        src: *const bf16,
        ps: usize,
        rows: Range<usize>,
        k: usize,
        dst: *mut bf16,
        ld: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { transpose_rows_512(src, ps, rows, k, dst, ld) }
    }
}

// ------------------------------------------------------------------------------------------------
// AVX2 kernel
// ------------------------------------------------------------------------------------------------

/// Converts `len` contiguous elements to float32 (8 lanes at a time).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn cvt_run_avx2<T: GemmInput>(src: *const T, len: usize, dst: *mut f32) {
    let mut i = 0;
    // SAFETY: every access is below `len`.
    unsafe {
        while i + 8 <= len {
            let x = match T::DTYPE {
                DType::F32 => _mm256_loadu_ps(src.add(i).cast()),
                DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(src.add(i).cast())),
                DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(src.add(i).cast()),
                ))),
            };
            _mm256_storeu_ps(dst.add(i), x);
            i += 8;
        }
        while i < len {
            *dst.add(i) = (*src.add(i)).to_f32();
            i += 1;
        }
    }
}

/// Loads 8 elements as float32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<E: Element>(src: *const E) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements.
    unsafe {
        match E::DTYPE {
            DType::F32 => _mm256_loadu_ps(src.cast()),
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(src.cast())),
            DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(src.cast()),
            ))),
        }
    }
}

/// Stores 8 lanes as `E`, rounded to nearest even (bfloat16 exactly as `half` does).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store8<E: Element>(dst: *mut E, x: __m256) {
    // SAFETY: the caller guarantees 8 writable elements.
    unsafe {
        match E::DTYPE {
            DType::F32 => _mm256_storeu_ps(dst.cast(), x),
            DType::F16 => {
                _mm_storeu_si128(dst.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
            }
            DType::BF16 => {
                let bits = _mm256_castps_si256(x);
                let hi = _mm256_srli_epi32::<16>(bits);
                let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
                let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                    bits,
                    _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)),
                ));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
                let r = _mm256_blendv_epi8(rounded, quiet, nan);
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
                _mm_storeu_si128(dst.cast(), _mm256_castsi256_si128(packed));
            }
        }
    }
}

/// AVX2 float32 FMA tile rows.
const AVX2_MR: usize = 6;
/// AVX2 float32 FMA tile width in vectors of 8.
const AVX2_NV: usize = 2;

/// The `6 x 16` AVX2 float32 FMA microkernel.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_f32_avx2<O: GemmOutput>(
    kp: usize,
    a: *const f32,
    a_row: usize,
    b: *const f32,
    w: *mut f32,
    first: bool,
    last: bool,
    tile: &Tile<O>,
) {
    const MR: usize = AVX2_MR;
    const NV: usize = AVX2_NV;
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    // SAFETY: the workspace tile is MR x 8 NV floats, 64-byte aligned; the panels hold kp steps.
    unsafe {
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_load_ps(w.add((i * NV + v) * 8));
                }
            }
        }
        let mut b = b;
        for_each_step!(kp, a, a_row, MR, |ai| {
            let b0 = _mm256_load_ps(b);
            let b1 = _mm256_load_ps(b.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ai(i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            b = b.add(NV * 8);
        });
        if !last {
            for (i, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    _mm256_store_ps(w.add((i * NV + v) * 8), *x);
                }
            }
            return;
        }
        if tile.rows < MR || tile.cols < NV * 8 {
            let mut spill = [0.0f32; MR * NV * 8];
            for (i, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    _mm256_storeu_ps(spill.as_mut_ptr().add((i * NV + v) * 8), *x);
                }
            }
            store_tile_scalar(spill.as_ptr(), NV * 8, tile);
            return;
        }
        let zero = _mm256_setzero_ps();
        for (i, row) in acc.iter().enumerate() {
            let c = tile.c.add(i * tile.ldc);
            for (v, acc) in row.iter().enumerate() {
                let cv = c.add(v * 8);
                let mut x = _mm256_mul_ps(*acc, _mm256_set1_ps(tile.alpha));
                if tile.beta != 0.0 {
                    x = _mm256_fmadd_ps(_mm256_set1_ps(tile.beta), load8(cv), x);
                }
                if !tile.bias.is_null() {
                    x = _mm256_add_ps(x, _mm256_loadu_ps(tile.bias.add(v * 8)));
                }
                if tile.relu {
                    let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, zero);
                    x = _mm256_blendv_ps(x, zero, neg);
                }
                store8(cv, x);
            }
        }
    }
}

/// AVX2 float32 kernel (float16 and bfloat16 inputs widened while packing).
#[derive(Debug)]
pub(super) struct Avx2Kernel;

// SAFETY: reads only the given panels, writes only the given tile; the dispatcher checks AVX2,
// FMA and F16C.
unsafe impl<T: GemmInput, O: GemmOutput> Kernel<T, O> for Avx2Kernel {
    type P = f32;
    const MR: usize = AVX2_MR;
    const NR: usize = AVX2_NV * 8;
    const KPACK: usize = 1;
    const KC: usize = 256;
    const MC: usize = 72;
    const DIRECT_A: bool = matches!(T::DTYPE, DType::F32);

    unsafe fn pack_a(
        &self,
        src: *const T,
        rs: usize,
        ps: usize,
        rows: usize,
        depth: usize,
        dst: *mut f32,
    ) -> usize {
        // SAFETY: forwarded; the dispatcher checked AVX2 and F16C.
        unsafe {
            if ps == 1 {
                pack_rows_f32(src, rs, rows, depth, AVX2_MR, dst, cvt_run_avx2::<T>);
                depth
            } else {
                pack_f32(src, rs, ps, rows, depth, AVX2_MR, dst, cvt_run_avx2::<T>);
                1
            }
        }
    }

    unsafe fn pack_b(
        &self,
        src: *const T,
        cs: usize,
        ps: usize,
        cols: usize,
        depth: usize,
        dst: *mut f32,
    ) {
        // SAFETY: forwarded; the dispatcher checked AVX2 and F16C.
        unsafe {
            pack_f32(
                src,
                cs,
                ps,
                cols,
                depth,
                AVX2_NV * 8,
                dst,
                cvt_run_avx2::<T>,
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        &self,
        kp: usize,
        a: *const f32,
        a_row: usize,
        b: *const f32,
        w: *mut f32,
        first: bool,
        last: bool,
        tile: &Tile<O>,
    ) {
        // SAFETY: forwarded.
        unsafe { micro_f32_avx2(kp, a, a_row, b, w, first, last, tile) }
    }
}
