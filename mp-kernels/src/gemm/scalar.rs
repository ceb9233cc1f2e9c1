//! The portable kernel ([`crate::Isa::Scalar`]) and the packing code the SIMD kernels share.

use super::driver::{Kernel, Output, Tile};
use super::{GemmInput, GemmOutput, epilogue_scalar};

/// Converts `len` contiguous elements to float32.
pub(super) type CvtRun<T> = unsafe fn(src: *const T, len: usize, dst: *mut f32);

/// [`CvtRun`] in plain Rust.
///
/// # Safety
/// `src` must hold `len` readable elements and `dst` room for `len` floats.
pub(super) unsafe fn cvt_run_scalar<T: GemmInput>(src: *const T, len: usize, dst: *mut f32) {
    for i in 0..len {
        // SAFETY: i < len.
        unsafe { *dst.add(i) = (*src.add(i)).to_f32() };
    }
}

/// Asks the cache for `bytes` from `ptr` (packing reads rows that jump by a leading dimension,
/// which the hardware prefetchers pick up late). Never faults, whatever the address.
#[inline(always)]
pub(super) fn prefetch(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                ptr.wrapping_add(off).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, bytes);
}

/// Rows ahead that packing prefetches.
pub(super) const PREFETCH_ROWS: usize = 2;

/// Depth elements converted per chunk when packing along a contiguous depth.
const CHUNK: usize = 64;
/// The widest panel any kernel packs.
pub(super) const MAX_WIDTH: usize = 64;

/// Packs `rows x depth` elements (element (r, p) at `src + r * rs + p * ps`) into float32 panels
/// `width` wide (panel `q` at `dst + q * width * depth`, zero past `rows`), converting contiguous
/// runs with `cvt`.
///
/// # Safety
/// The source elements must be readable, `dst` must hold `rows.div_ceil(width) * width * depth`
/// floats, and `cvt` must be callable on this CPU.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) unsafe fn pack_f32<T: GemmInput>(
    src: *const T,
    rs: usize,
    ps: usize,
    rows: usize,
    depth: usize,
    width: usize,
    dst: *mut f32,
    cvt: CvtRun<T>,
) {
    debug_assert!(width <= MAX_WIDTH);
    let panels = rows.div_ceil(width);
    for q in 0..panels {
        let r0 = q * width;
        let rn = width.min(rows - r0);
        // SAFETY: panel q of dst.
        let panel = unsafe { dst.add(q * width * depth) };
        if rs == 1 {
            for p in 0..depth {
                // SAFETY: row p of the panel; elements r0..r0+rn at depth p are in the source.
                unsafe {
                    let d = panel.add(p * width);
                    cvt(src.add(r0 + p * ps), rn, d);
                    for r in rn..width {
                        *d.add(r) = 0.0;
                    }
                }
            }
        } else if ps == 1 {
            let mut tmp = [[0.0f32; CHUNK]; MAX_WIDTH];
            let mut p0 = 0;
            while p0 < depth {
                let pn = CHUNK.min(depth - p0);
                for (r, row) in tmp.iter_mut().enumerate().take(rn) {
                    // SAFETY: elements p0..p0+pn of row r0 + r are in the source.
                    unsafe { cvt(src.add((r0 + r) * rs + p0), pn, row.as_mut_ptr()) };
                }
                for p in 0..pn {
                    // SAFETY: row p0 + p of the panel.
                    let d = unsafe { panel.add((p0 + p) * width) };
                    for r in 0..width {
                        let v = if r < rn { tmp[r][p] } else { 0.0 };
                        // SAFETY: r < width.
                        unsafe { *d.add(r) = v };
                    }
                }
                p0 += pn;
            }
        } else {
            for p in 0..depth {
                for r in 0..width {
                    let v = if r < rn {
                        // SAFETY: element (r0 + r, p) is in the source.
                        unsafe { (*src.add((r0 + r) * rs + p * ps)).to_f32() }
                    } else {
                        0.0
                    };
                    // SAFETY: inside the panel.
                    unsafe { *panel.add(p * width + r) = v };
                }
            }
        }
    }
}

/// Packs `rows x depth` elements (element (r, p) at `src + r * rs + p`, contiguous along the
/// depth) into row-major float32 panels: panel `q` at `dst + q * width * depth` holds `width` rows
/// of `depth` values (zero rows past `rows`). The microkernels read it with row stride `depth`.
///
/// # Safety
/// As for [`pack_f32`].
pub(super) unsafe fn pack_rows_f32<T: GemmInput>(
    src: *const T,
    rs: usize,
    rows: usize,
    depth: usize,
    width: usize,
    dst: *mut f32,
    cvt: CvtRun<T>,
) {
    let panels = rows.div_ceil(width);
    for r in 0..panels * width {
        // SAFETY: row r of the packed panels; source row r when r < rows.
        unsafe {
            let d = dst.add(r * depth);
            if r + PREFETCH_ROWS < rows {
                prefetch(
                    src.wrapping_add((r + PREFETCH_ROWS) * rs).cast(),
                    depth * size_of::<T>(),
                );
            }
            if r < rows {
                cvt(src.add(r * rs), depth, d);
            } else {
                std::ptr::write_bytes(d, 0, depth);
            }
        }
    }
}

/// Stores a float32 tile (`tile.rows x tile.cols` of `acc`, row stride `lda`) to C through the
/// epilogue.
///
/// # Safety
/// The tile must be valid and `acc` hold the rows.
pub(super) unsafe fn store_tile_scalar<O: GemmOutput>(acc: *const f32, lda: usize, tile: &Tile<O>) {
    for i in 0..tile.rows {
        for j in 0..tile.cols {
            // SAFETY: (i, j) is inside the tile, whose bias (if any) has `cols` elements.
            unsafe {
                let c = tile.c.add(i * tile.ldc + j);
                let old = if tile.beta != 0.0 { (*c).to_f32() } else { 0.0 };
                let bias = if tile.bias.is_null() {
                    None
                } else {
                    Some(*tile.bias.add(j))
                };
                let x = epilogue_scalar(
                    *acc.add(i * lda + j),
                    tile.alpha,
                    tile.beta,
                    old,
                    bias,
                    tile.relu,
                );
                *c = O::from_f32(x);
            }
        }
    }
}

/// `C = epilogue(beta * C)` (the `k == 0` case).
///
/// # Safety
/// `out` must describe `m` rows of `n` elements with stride `ldc` (and a bias of `n`, if any).
pub(super) unsafe fn epilogue_only<O: GemmOutput>(m: usize, n: usize, out: &Output<O>) {
    let zeros = [0.0f32; 64];
    for i in 0..m {
        let mut j = 0;
        while j < n {
            let cols = 64.min(n - j);
            // SAFETY: (i, j) is inside C.
            let tile = unsafe { out.tile(i, j, 1, cols) };
            // SAFETY: one row of `cols` elements.
            unsafe { store_tile_scalar(zeros.as_ptr(), 0, &tile) };
            j += cols;
        }
    }
}

/// The portable kernel: a 4 x 16 float32 tile in plain Rust.
#[derive(Debug)]
pub(super) struct ScalarKernel;

const SMR: usize = 4;
const SNR: usize = 16;

// SAFETY: reads only the given panels, writes only the given tile; needs no CPU feature.
unsafe impl<T: GemmInput, O: GemmOutput> Kernel<T, O> for ScalarKernel {
    type P = f32;
    const MR: usize = SMR;
    const NR: usize = SNR;
    const KPACK: usize = 1;
    const KC: usize = 256;
    const MC: usize = 64;
    const DIRECT_A: bool = matches!(T::DTYPE, mp_core::DType::F32);

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
                pack_rows_f32(src, rs, rows, depth, SMR, dst, cvt_run_scalar::<T>);
                depth
            } else {
                pack_f32(src, rs, ps, rows, depth, SMR, dst, cvt_run_scalar::<T>);
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
        unsafe { pack_f32(src, cs, ps, cols, depth, SNR, dst, cvt_run_scalar::<T>) }
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
        let a_step = if a_row == 1 { SMR } else { 1 };
        let mut acc = [[0.0f32; SNR]; SMR];
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    // SAFETY: the workspace tile is SMR x SNR.
                    *x = unsafe { *w.add(i * SNR + j) };
                }
            }
        }
        for p in 0..kp {
            // SAFETY: step p of both panels.
            let bp = unsafe { &*b.add(p * SNR).cast::<[f32; SNR]>() };
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: element (i, p) of the A panel.
                let ai = unsafe { *a.add(i * a_row + p * a_step) };
                for (x, bj) in row.iter_mut().zip(bp) {
                    *x += ai * bj;
                }
            }
        }
        if last {
            // SAFETY: the tile is valid.
            unsafe { store_tile_scalar(acc.as_ptr().cast(), SNR, tile) };
        } else {
            for (i, row) in acc.iter().enumerate() {
                for (j, x) in row.iter().enumerate() {
                    // SAFETY: the workspace tile is SMR x SNR.
                    unsafe { *w.add(i * SNR + j) = *x };
                }
            }
        }
    }
}
