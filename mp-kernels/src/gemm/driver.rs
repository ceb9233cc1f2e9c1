//! The blocked GEMM driver shared by every instruction set: blocking, packing buffers, the static
//! split over threads and the loops around the microkernel.
//!
//! Loop order, per thread (the thread owns whole columns or whole rows of C):
//!
//! ```text
//! for jc in columns, NC at a time:               B~ = op(B)[0..K, jc..jc+NC], whole depth,
//!                                                packed one NR panel at a time on first use
//!   for ic2 in rows, M2 at a time:               (M2 x NC float32 partial sums fit W_BUDGET)
//!     for pc in 0..K, KC at a time:
//!       for ic in ic2..ic2+M2, MC at a time:     A~ = op(A)[ic..ic+MC, pc..pc+KC]: packed, or
//!                                                read in place when already in packed form
//!         for jr in NR-wide panels of B~:
//!           for ir in MR-tall panels of A~:      microkernel: MR x NR tile over KC
//! ```
//!
//! The depth loop sits outside the MC row blocks, so each KC x NC block of B~ is reused from
//! cache by all the row blocks of an M2 block before the next is read (the BLIS order, with the
//! row blocks of M2 between), while the partial sums of the M2 x NC block wait in a float32
//! workspace. The microkernel reloads its tile's partial sums into its accumulators, so every
//! element of C is a single float32 accumulation chain over `k` in order, whatever the blocking
//! or the split: results are bit-identical run to run and across thread counts. The epilogue
//! (alpha, beta, bias, ReLU, rounding to the output dtype) is applied once, in the last depth
//! block's store. The one exception to a single chain is [`depth_halves`]: a small, deep
//! float32 GEMM is two chains over the two halves of its depth, added at the end, a split fixed
//! by the shape, so still the same bits on any thread count.
//!
//! The budgets were tuned on a 2-core Zen 4 (1 MiB L2 per core, 32 MiB L3): at n = 4096 the
//! float32 path runs at ~94% of the measured FMA peak on 2 threads and bfloat16 at ~93% of the
//! `vdpbf16ps` peak, when the machine is otherwise idle.

use std::cell::RefCell;
use std::ops::Range;

use super::{GemmInput, GemmOutput};
use crate::threads;

/// Where and how results are stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output<O> {
    pub c: *mut O,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    /// The bias (length n) or null.
    pub bias: *const f32,
    pub relu: bool,
}

/// A checked problem: op(A) element (i, p) is at `a + i * a_rs + p * a_ps`, op(B) element (p, j) at
/// `b + j * b_cs + p * b_ps`, C element (i, j) at `out.c + i * out.ldc + j`.
#[derive(Debug)]
pub(crate) struct Problem<T, O> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const T,
    pub a_rs: usize,
    pub a_ps: usize,
    pub b: *const T,
    pub b_cs: usize,
    pub b_ps: usize,
    pub out: Output<O>,
}

impl<O> Output<O> {
    /// The `rows x cols` tile of C at (i, j), storing with this output's epilogue.
    ///
    /// # Safety
    /// (i, j) must be inside C (and j inside the bias, if any).
    pub(crate) unsafe fn tile(&self, i: usize, j: usize, rows: usize, cols: usize) -> Tile<O> {
        Tile {
            // SAFETY: (i, j) is inside C (the caller's promise).
            c: unsafe { self.c.add(i * self.ldc + j) },
            ldc: self.ldc,
            rows,
            cols,
            alpha: self.alpha,
            beta: self.beta,
            bias: if self.bias.is_null() {
                self.bias
            } else {
                // SAFETY: the bias has n elements and j < n.
                unsafe { self.bias.add(j) }
            },
            relu: self.relu,
            acc_in_c: false,
        }
    }
}

impl<T, O> Problem<T, O> {
    /// Depth `pc..pc + k` of this problem, storing through `out`.
    ///
    /// # Safety
    /// `pc + k` must be at most `self.k`.
    unsafe fn depth(&self, pc: usize, k: usize, out: Output<O>) -> Problem<T, O> {
        Problem {
            m: self.m,
            n: self.n,
            k,
            // SAFETY: depth pc.. of op(A) and op(B) is inside them (the caller's promise).
            a: unsafe { self.a.add(pc * self.a_ps) },
            a_rs: self.a_rs,
            a_ps: self.a_ps,
            // SAFETY: as above.
            b: unsafe { self.b.add(pc * self.b_ps) },
            b_cs: self.b_cs,
            b_ps: self.b_ps,
            out,
        }
    }
}

// SAFETY: the pointers come from slices borrowed for the whole call (A and B shared, C exclusive),
// and threads write disjoint parts of C.
unsafe impl<T: Sync, O: Send> Sync for Problem<T, O> {}

/// One tile of C as a microkernel stores it.
#[derive(Debug)]
pub(crate) struct Tile<O> {
    /// The tile's first element.
    pub c: *mut O,
    pub ldc: usize,
    /// Valid rows (`<= MR`).
    pub rows: usize,
    /// Valid columns (`<= NR`).
    pub cols: usize,
    pub alpha: f32,
    pub beta: f32,
    /// The bias at the tile's first column, or null.
    pub bias: *const f32,
    pub relu: bool,
    /// The partial sums live in C itself (float32 C, `alpha == 1`; see [`Kernel::ACC_IN_C`]):
    /// the first depth block starts from `beta * C` (zero when `beta == 0`), later ones from C;
    /// every block but the last stores its sums to C unrounded, and the last applies the bias and
    /// ReLU (its tile has `beta == 0`).
    pub acc_in_c: bool,
}

/// A microkernel and its packing routines.
///
/// Packed layouts: `pack_a` writes panels of `MR` rows, panel `q` at `dst + q * MR * kp` with
/// `kp = depth.div_ceil(KPACK)` packed steps, either k-major (`kp` steps of `MR` elements) or
/// row-major (`MR` rows of `kp` elements; what a source contiguous along the depth packs to
/// without a transpose), and returns the distance between rows (1 for k-major). `pack_b` writes
/// k-major panels of `NR` columns. Rows or columns past the edge and depth past `depth` are zero.
///
/// # Safety
/// Implementations must only read the packed panels they are given and write the tile they are
/// given, and be callable only where the CPU supports them (the caller checks).
pub(crate) unsafe trait Kernel<T, O>: Sync {
    /// A packed element: `f32`, or a `u32` holding a pair of bfloat16 along k.
    type P: Copy;
    /// Tile rows.
    const MR: usize;
    /// Tile columns.
    const NR: usize;
    /// Input elements along k per packed element (1, or 2 for pairs).
    const KPACK: usize;
    /// Depth block (a multiple of `KPACK`).
    const KC: usize;
    /// Row block (a multiple of `MR`).
    const MC: usize;
    /// Whether the microkernel can read op(A) in place when it is contiguous along the depth:
    /// the input is already the packed element (float32, or bfloat16 read as pairs), so full
    /// panels skip packing (row-major layout with the source's row stride).
    const DIRECT_A: bool;
    /// Whether the microkernel honours [`Tile::acc_in_c`], so a float32 C can hold the partial
    /// sums between depth blocks (what lets a deep GEMM pack B one depth block at a time and
    /// pack A once, instead of once per column block).
    const ACC_IN_C: bool = false;

    /// Packs `rows x depth` elements (element (r, p) at `src + r * rs + p * ps`) into `MR` panels;
    /// returns the packed row stride (1: k-major).
    ///
    /// # Safety
    /// The source elements must be readable and `dst` must hold the packed panels.
    unsafe fn pack_a(
        &self,
        src: *const T,
        rs: usize,
        ps: usize,
        rows: usize,
        depth: usize,
        dst: *mut Self::P,
    ) -> usize;

    /// Packs `cols x depth` elements (element (c, p) at `src + c * cs + p * ps`) into `NR` panels.
    ///
    /// # Safety
    /// As for [`Kernel::pack_a`].
    unsafe fn pack_b(
        &self,
        src: *const T,
        cs: usize,
        ps: usize,
        cols: usize,
        depth: usize,
        dst: *mut Self::P,
    );

    /// `kp` packed steps of one `MR x NR` tile (A row `i`, step `s` at `a + i * a_row + s * step`
    /// with `step = MR` if `a_row == 1`, else 1). Starts from zero when `first`, else from the tile
    /// workspace `w` (`MR x NR` float32, row-major, 64-byte aligned; the next tile's workspace
    /// follows it, so it can be prefetched); stores to `w` unless `last`, then applies the
    /// epilogue and stores to C.
    ///
    /// # Safety
    /// `a` and `b` must point to `kp` packed steps of a panel; `w` and the tile must be valid.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        &self,
        kp: usize,
        a: *const Self::P,
        a_row: usize,
        b: *const Self::P,
        w: *mut f32,
        first: bool,
        last: bool,
        tile: &Tile<O>,
    );

    /// `dst[i * ld + q] = src[i + q * ps]` for the rows `rows` of op(A) and depth `k`, zero from
    /// `k` to `ld`: a transposed op(A) copied into depth-contiguous rows. The default is the
    /// portable copy; SIMD kernels override it with vector transposes.
    ///
    /// # Safety
    /// The source elements and the destination rows must be valid.
    unsafe fn transpose_a(
        &self,
        src: *const T,
        ps: usize,
        rows: Range<usize>,
        k: usize,
        dst: *mut T,
        ld: usize,
    ) where
        T: Copy,
    {
        // SAFETY: forwarded.
        unsafe { transpose_rows(src, ps, rows, k, dst, ld) }
    }
}

/// Bytes of packed B one thread keeps (whole depth x NC columns); larger B is done in column
/// blocks, each reading all of A again. 8 MiB per thread keeps both threads' B~ within the 32 MiB
/// L3 of the machine this was tuned on (Zen 4, 2 threads): 16 MiB measured ~8% slower for bfloat16
/// at n = 4096, 4 MiB ~1% slower.
const B_BUDGET: usize = 8 << 20;

/// Bytes of float32 partial sums one thread keeps between depth blocks (`m2 x NC`): the depth loop
/// runs outside the row blocks of `m2` rows, so a depth block of B~ is reused from cache by every
/// row block of A before the next one is read.
const W_BUDGET: usize = 4 << 20;

/// The cache blocking budgets (tests shrink them to reach every blocking path on small shapes;
/// results do not depend on them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocking {
    /// Bytes of packed B per thread ([`B_BUDGET`]).
    pub b_bytes: usize,
    /// Bytes of float32 partial sums per thread ([`W_BUDGET`]).
    pub w_bytes: usize,
}

impl Blocking {
    /// The budgets for this machine class.
    pub const DEFAULT: Blocking = Blocking {
        b_bytes: B_BUDGET,
        w_bytes: W_BUDGET,
    };
}

/// Below this many multiply-adds a GEMM runs on the calling thread alone (handing work to the
/// pool costs a few microseconds: at 64^3 two threads were 4x slower than one, at 96^3 faster).
const PARALLEL_MIN_MACS: usize = 1 << 19;

/// Runs the whole problem: splits it over the pool and runs each part.
///
/// # Safety
/// `p` must describe checked matrices, and the CPU must support the kernel.
pub(crate) unsafe fn run<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    blocking: Blocking,
) {
    let ks = depth_super_block::<T, O, K>(p);
    if ks < p.k {
        // Deep GEMM into float32: one depth super-block at a time, each accumulated into C.
        let mut pc = 0;
        while pc < p.k {
            let kcur = ks.min(p.k - pc);
            let last = pc + kcur == p.k;
            let out = Output {
                beta: if pc == 0 { p.out.beta } else { 1.0 },
                bias: if last { p.out.bias } else { std::ptr::null() },
                relu: last && p.out.relu,
                ..p.out
            };
            // SAFETY: pc + kcur <= k.
            let q = unsafe { p.depth(pc, kcur, out) };
            // SAFETY: q is a checked sub-problem of p (C unchanged in shape).
            unsafe { run_one(kernel, &q, blocking) };
            pc += kcur;
        }
        return;
    }
    // SAFETY: forwarded.
    unsafe { run_one(kernel, p, blocking) }
}

/// The depth above which a GEMM into float32 runs in super-blocks.
const SUPER_BLOCK_DEPTH: usize = 4096;

/// The depth of one super-block: `k` itself unless C is float32 and `k` exceeds
/// [`SUPER_BLOCK_DEPTH`], then `k` split into equal super-blocks of at most that (a multiple of
/// `KPACK`). The whole-depth packed B of [`run_block_with`] limits a column block to
/// `B_BUDGET / depth` columns, and all of A is read again for each, from memory once A passes
/// the cache: at k = 8192 (a weight gradient over a batch of 8192) that was 8 reads of A per
/// thread and ~78% of peak, where k = 4096 runs at ~90%. Each super-block's float32 result is
/// added to C (`beta` in the first, 1 after, the bias and ReLU in the last), so an element of C
/// is a chain of float32 sums in depth order; the split depends on `k` only, never on threads.
fn depth_super_block<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(p: &Problem<T, O>) -> usize {
    if O::DTYPE != mp_core::DType::F32 || p.k <= SUPER_BLOCK_DEPTH {
        return p.k;
    }
    let blocks = p.k.div_ceil(SUPER_BLOCK_DEPTH);
    p.k.div_ceil(blocks).div_ceil(K::KPACK) * K::KPACK
}

/// Runs a problem whose depth is one super-block.
///
/// # Safety
/// As for [`run`].
unsafe fn run_one<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    blocking: Blocking,
) {
    if transposes_a::<T, O, K>(p) {
        // SAFETY: forwarded.
        if unsafe { run_with_a_transposed(kernel, p, blocking) } {
            return;
        }
    }
    if let Some(k0) = depth_halves::<T, O, K>(p) {
        // SAFETY: forwarded.
        unsafe { run_depth_halves(kernel, p, k0, blocking) };
        return;
    }
    // SAFETY: forwarded.
    unsafe { run_split(kernel, p, blocking) }
}

/// The most elements of C a GEMM may have to run as two depth halves ([`depth_halves`]).
const HALVES_MAX_MN: usize = 128 * 128;
/// The least depth a GEMM must have to run as two depth halves.
const HALVES_MIN_K: usize = 1024;

/// Where a small, deep GEMM into float32 splits its depth, if it does: C at most
/// [`HALVES_MAX_MN`] elements, depth from [`HALVES_MIN_K`] to one super-block, `alpha == 1`, no
/// bias, no ReLU (a weight gradient of a transformer layer: `64 x 64` over 2176 tokens). Tiles
/// of C split such a GEMM badly (11 tiles of 6 rows: 6 on one thread, 5 on the other) and every
/// thread reads all of both operands; halves of the depth split it evenly, and each half reads
/// only its own rows of the activations, which the thread that made them still has in cache.
/// The split depends on the problem only, never on the thread count, so results stay
/// bit-identical across thread counts: `C = (beta C + Σ_{p < k0}) + Σ_{p >= k0}`, each sum one
/// float32 chain in depth order.
fn depth_halves<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(p: &Problem<T, O>) -> Option<usize> {
    let eligible = O::DTYPE == mp_core::DType::F32
        && p.out.alpha == 1.0
        && p.out.bias.is_null()
        && !p.out.relu
        && p.m.saturating_mul(p.n) <= HALVES_MAX_MN
        && (HALVES_MIN_K..=SUPER_BLOCK_DEPTH).contains(&p.k);
    eligible.then(|| (p.k / 2).div_ceil(K::KPACK) * K::KPACK)
}

/// Runs `p` as two depth halves (`0..k0` into C, `k0..k` into a float32 scratch then added to
/// C), one per kernel thread where there are two, one after the other on one thread.
///
/// # Safety
/// As for [`run`]; [`depth_halves`] must have returned `k0`.
unsafe fn run_depth_halves<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    k0: usize,
    blocking: Blocking,
) {
    let (m, n) = (p.m, p.n);
    threads::with_scratch(m * n, |scratch| {
        let tail = SendPtr(scratch.as_mut_ptr());
        let half = |i: usize| {
            let tail = &tail;
            let (pc, k) = if i == 0 { (0, k0) } else { (k0, p.k - k0) };
            let out = if i == 0 {
                p.out
            } else {
                Output {
                    // O is float32 (checked by `depth_halves`): the scratch is C's stand-in.
                    c: tail.0.cast::<O>(),
                    ldc: n,
                    beta: 0.0,
                    ..p.out
                }
            };
            // SAFETY: pc + k == p.k.
            let q = unsafe { p.depth(pc, k, out) };
            // SAFETY: q is a checked sub-problem writing C (half 0) or the scratch (half 1),
            // each on one thread.
            unsafe { run_block(kernel, &q, 0..m, 0..n, blocking) };
        };
        if threads::num_threads() > 1 {
            threads::pool().for_each_index(2, half);
        } else {
            half(0);
            half(1);
        }
        let c = p.out.c.cast::<f32>();
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside C (float32, row stride ldc) and inside the scratch.
                unsafe { *c.add(i * p.out.ldc + j) += *tail.0.add(i * n + j) };
            }
        }
    });
}

/// Below this many elements in each dimension, a transposed op(A) is packed as it is.
const TRANSPOSE_A_MIN_DIM: usize = 1024;

/// Whether op(A) is first copied into depth-contiguous rows: a large GEMM on a kernel that reads
/// op(A) in place (float32, or bfloat16 pairs), every dimension at least [`TRANSPOSE_A_MIN_DIM`]
/// (a hidden layer's weight gradient `Xt dY`), whose op(A) is stored transposed. With the copy's
/// vector transposes ([`Kernel::transpose_a`]), the 4096 x 4096 x 8192 weight gradient measured
/// 1348 ms in float32 and 689 ms in bfloat16 on a 2-core Zen 4, against 1431 ms (the copy
/// element by element) and 804 ms (pairs packed from the transposed layout, ~5% of the time in
/// packing since every thread packs all of A), and 665 ms for bfloat16 with A already stored
/// depth-contiguous. At m = 784 (the first layer) the copy measured no faster, so the bound stays.
/// It depends on the problem only, so results stay bit-identical across thread counts.
fn transposes_a<T, O, K: Kernel<T, O>>(p: &Problem<T, O>) -> bool {
    K::DIRECT_A
        && p.a_rs == 1
        && p.a_ps != 1
        && p.m >= TRANSPOSE_A_MIN_DIM
        && p.n >= TRANSPOSE_A_MIN_DIM
        && p.k >= TRANSPOSE_A_MIN_DIM
}

/// Copies op(A) into a buffer of depth-contiguous rows (row stride `k`, rounded up to `KPACK`
/// with a zero pad) on all threads, then runs the problem reading it in place. The buffer comes
/// from mp-core's tensor allocator, so it is counted like a tensor and reused across steps.
/// Returns `false` (nothing done) if the buffer cannot be allocated.
///
/// # Safety
/// As for [`run`].
unsafe fn run_with_a_transposed<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    blocking: Blocking,
) -> bool {
    let ld = p.k.div_ceil(K::KPACK) * K::KPACK;
    let Some(len) = p.m.checked_mul(ld) else {
        return false;
    };
    let Ok(mut buf) = mp_core::tensor::AlignedBuf::<T>::for_overwrite(len) else {
        return false;
    };
    let dst = SendPtr(buf.as_mut_slice().as_mut_ptr());
    let threads = threads::num_threads();
    let parts = threads::static_ranges(p.m, threads, 16);
    let copy = |rows: &Range<usize>| {
        let dst = &dst;
        // SAFETY: the ranges are disjoint rows of the buffer; op(A)[i, q] is at a + i + q * a_ps.
        unsafe { kernel.transpose_a(p.a, p.a_ps, rows.clone(), p.k, dst.0, ld) }
    };
    if parts.len() <= 1 {
        copy(&(0..p.m));
    } else {
        threads::pool().for_each_part(&parts, copy);
    }
    let q = Problem {
        m: p.m,
        n: p.n,
        k: p.k,
        a: buf.as_slice().as_ptr(),
        a_rs: ld,
        a_ps: 1,
        b: p.b,
        b_cs: p.b_cs,
        b_ps: p.b_ps,
        out: p.out,
    };
    // SAFETY: q reads the buffer (m rows of ld >= k elements) instead of A; the rest is p's.
    unsafe { run_split(kernel, &q, blocking) };
    true
}

/// A pointer the copy threads share (each writes its own rows).
struct SendPtr<T>(*mut T);
// SAFETY: the threads write disjoint rows.
unsafe impl<T> Sync for SendPtr<T> {}

/// `dst[i * ld + q] = src[i + q * ps]` for rows `rows`, depth `k` (and zero in the pad up to
/// `ld`), in 16 x 64 blocks so both sides stay in cache.
///
/// # Safety
/// The source elements and the destination rows must be valid.
pub(super) unsafe fn transpose_rows<T: Copy>(
    src: *const T,
    ps: usize,
    rows: Range<usize>,
    k: usize,
    dst: *mut T,
    ld: usize,
) {
    const BI: usize = 16;
    const BQ: usize = 64;
    let mut i0 = rows.start;
    while i0 < rows.end {
        let i1 = (i0 + BI).min(rows.end);
        let mut q0 = 0;
        while q0 < k {
            let q1 = (q0 + BQ).min(k);
            for i in i0..i1 {
                for q in q0..q1 {
                    // SAFETY: i < m and q < k are inside both matrices.
                    unsafe { *dst.add(i * ld + q) = *src.add(i + q * ps) };
                }
            }
            q0 = q1;
        }
        for i in i0..i1 {
            for q in k..ld {
                // SAFETY: the pad of row i is inside the buffer; zero bits are 0.0 in every
                // element type, so the pad adds nothing (and no stale NaN) to a pair.
                unsafe { std::ptr::write_bytes(dst.add(i * ld + q), 0, 1) };
            }
        }
        i0 = i1;
    }
}

/// Splits the problem over the pool and runs each part.
///
/// # Safety
/// As for [`run`].
unsafe fn run_split<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    blocking: Blocking,
) {
    let threads = if p.m.saturating_mul(p.n).saturating_mul(p.k) < PARALLEL_MIN_MACS {
        1
    } else {
        threads::num_threads()
    };
    let split = choose_split::<T, O, K>(p, threads);
    let parts = match split {
        Split::Columns => threads::static_ranges(p.n, threads, K::NR),
        Split::Rows => threads::static_ranges(p.m, threads, K::MR),
    };
    let block = |range: &Range<usize>| {
        let (rows, cols) = match split {
            Split::Columns => (0..p.m, range.clone()),
            Split::Rows => (range.clone(), 0..p.n),
        };
        // SAFETY: the parts are disjoint, so each element of C is written by one thread.
        unsafe { run_block(kernel, p, rows, cols, blocking) }
    };
    if parts.len() <= 1 {
        block(&(0..if split == Split::Columns { p.n } else { p.m }));
        return;
    }
    threads::pool().for_each_part(&parts, block);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    Columns,
    Rows,
}

/// Picks the split with the lower estimated cost: the slowest thread's tiles (edges padded to the
/// tile) plus its packing (a column split makes every thread pack all of A, a row split all of B).
fn choose_split<T, O, K: Kernel<T, O>>(p: &Problem<T, O>, threads: usize) -> Split {
    if threads <= 1 {
        return Split::Columns;
    }
    let t = threads;
    let m_pad = p.m.div_ceil(K::MR) * K::MR;
    let n_pad = p.n.div_ceil(K::NR) * K::NR;
    let n_per = p.n.div_ceil(K::NR).div_ceil(t) * K::NR;
    let m_per = p.m.div_ceil(K::MR).div_ceil(t) * K::MR;
    // One unit: one tile-column element of one multiply-add step, ~1/16 cycle; packing one
    // element costs ~1 cycle.
    let k = p.k as f64;
    let cost_cols = (m_pad * n_per) as f64 * k / 16.0 + (p.m as f64) * k + (n_per as f64) * k;
    let cost_rows = (m_per * n_pad) as f64 * k / 16.0 + (m_per as f64) * k + (p.n as f64) * k;
    if cost_cols <= cost_rows {
        Split::Columns
    } else {
        Split::Rows
    }
}

/// A 64-byte aligned chunk of a reusable buffer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A thread's packing buffers, reused across calls (grown, never shrunk).
#[derive(Default)]
struct Buffers {
    a: Vec<Line>,
    b: Vec<Line>,
    w: Vec<Line>,
}

fn grow(buf: &mut Vec<Line>, bytes: usize) -> *mut u8 {
    let lines = bytes.div_ceil(64).max(1);
    if buf.len() < lines {
        // Huge pages asked for before the buffer is first touched (packed B spans megabytes).
        let mut fresh: Vec<Line> = Vec::with_capacity(lines);
        mp_core::memory::advise_huge_pages(fresh.as_mut_ptr().cast(), lines * 64);
        fresh.resize(lines, Line([0; 64]));
        *buf = fresh;
    }
    buf.as_mut_ptr().cast()
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// Computes C[rows, cols] on the calling thread.
///
/// # Safety
/// As for [`run`]; no other thread may write C[rows, cols] meanwhile.
unsafe fn run_block<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    rows: Range<usize>,
    cols: Range<usize>,
    blocking: Blocking,
) {
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        // SAFETY: forwarded.
        Ok(mut bufs) => unsafe { run_block_with(kernel, p, rows, cols, blocking, &mut bufs) },
        // SAFETY: forwarded (re-entered on this thread: use fresh buffers).
        Err(_) => unsafe {
            run_block_with(kernel, p, rows, cols, blocking, &mut Buffers::default())
        },
    })
}

unsafe fn run_block_with<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    rows: Range<usize>,
    cols: Range<usize>,
    blocking: Blocking,
    bufs: &mut Buffers,
) {
    if uses_acc_in_c::<T, O, K>(p) {
        // SAFETY: forwarded.
        unsafe { run_block_acc_in_c(kernel, p, rows, cols, blocking, bufs) };
        return;
    }
    let (mr, nr) = (K::MR, K::NR);
    let psize = size_of::<K::P>();
    let kp_total = p.k.div_ceil(K::KPACK);
    let nc = ((blocking.b_bytes / (kp_total * nr * psize)).max(1) * nr)
        .min(cols.len().div_ceil(nr) * nr);
    let mc = K::MC.min(rows.len().div_ceil(mr) * mr);
    let kc = depth_block::<T, O, K>(p.k);
    let multi_block = p.k > kc;
    // Rows whose partial sums the workspace holds across depth blocks: a multiple of mc.
    let m2 = if multi_block {
        ((blocking.w_bytes / (nc * size_of::<f32>())) / mc).max(1) * mc
    } else {
        mc
    }
    .min(rows.len().div_ceil(mc) * mc);

    let b_pack: *mut K::P = grow(&mut bufs.b, nc * kp_total * psize).cast();
    let a_pack: *mut K::P = grow(&mut bufs.a, mc * kc.div_ceil(K::KPACK) * psize).cast();
    let w: *mut f32 = if multi_block {
        grow(&mut bufs.w, m2 * nc * size_of::<f32>()).cast()
    } else {
        std::ptr::null_mut()
    };
    let out = &p.out;

    let mut jc = cols.start;
    while jc < cols.end {
        let ncur = nc.min(cols.end - jc);
        let mut ic2 = rows.start;
        while ic2 < rows.end {
            let m2cur = m2.min(rows.end - ic2);
            let mut pc = 0;
            while pc < p.k {
                let kcur = kc.min(p.k - pc);
                let kp = kcur.div_ceil(K::KPACK);
                let first = pc == 0;
                let last = pc + kcur == p.k;
                // Full panels are read in place when op(A) is contiguous along the depth (pairs
                // need an even row stride and an even depth block).
                let direct = K::DIRECT_A
                    && p.a_ps == 1
                    && (K::KPACK == 1
                        || (p.a_rs.is_multiple_of(K::KPACK) && kcur.is_multiple_of(K::KPACK)));
                let mut ic = ic2;
                while ic < ic2 + m2cur {
                    let mcur = mc.min(ic2 + m2cur - ic);
                    let full = if direct { mcur / mr * mr } else { 0 };
                    let a_row = if full < mcur {
                        // SAFETY: op(A)[ic+full..ic+mcur, pc..pc+kcur] is inside A; a_pack holds
                        // mc x kp.
                        unsafe {
                            kernel.pack_a(
                                p.a.add((ic + full) * p.a_rs + pc * p.a_ps),
                                p.a_rs,
                                p.a_ps,
                                mcur - full,
                                kcur,
                                a_pack,
                            )
                        }
                    } else {
                        0
                    };
                    // B~ is packed one panel at a time, on first use (the first depth block of the
                    // first row block), so the panel is still in cache for its first tiles.
                    let pack_panels = ic2 == rows.start && pc == 0 && ic == ic2;
                    let mut jr = 0;
                    while jr < ncur {
                        if pack_panels {
                            // SAFETY: op(B)[0..k, jc+jr..jc+jr+nr] is inside B; panel jr / nr of
                            // b_pack holds kp_total x nr elements.
                            unsafe {
                                kernel.pack_b(
                                    p.b.add((jc + jr) * p.b_cs),
                                    p.b_cs,
                                    p.b_ps,
                                    nr.min(ncur - jr),
                                    p.k,
                                    b_pack.add((jr / nr) * kp_total * nr),
                                )
                            };
                        }
                        // SAFETY: inside b_pack: panel jr / nr, packed step pc / KPACK.
                        let b_panel =
                            unsafe { b_pack.add((jr / nr) * kp_total * nr + (pc / K::KPACK) * nr) };
                        let mut ir = 0;
                        while ir < mcur {
                            let (i, j) = (ic + ir, jc + jr);
                            // SAFETY: (i, j) is inside C.
                            let tile =
                                unsafe { out.tile(i, j, mr.min(mcur - ir), nr.min(ncur - jr)) };
                            let w_tile = if multi_block {
                                // SAFETY: tile ((i - ic2) / mr, jr / nr) of the m2 x nc
                                // workspace, stored in the order the ir loop visits them.
                                unsafe { w.add(((jr / nr) * (m2 / mr) + (i - ic2) / mr) * mr * nr) }
                            } else {
                                w
                            };
                            let (a_panel, a_row) = if ir < full {
                                // SAFETY: rows i..i+mr, depth pc..pc+kcur of A, read in place
                                // (the packed element is the input element, or a pair of them).
                                (
                                    unsafe { p.a.add(i * p.a_rs + pc).cast::<K::P>() },
                                    p.a_rs / K::KPACK,
                                )
                            } else {
                                // SAFETY: panel (ir - full) / mr of a_pack.
                                (
                                    unsafe { a_pack.add(((ir - full) / mr) * mr * kp) }
                                        .cast_const(),
                                    a_row,
                                )
                            };
                            // SAFETY: the panels hold kp packed steps; the tile is inside C and
                            // owned by this thread.
                            unsafe {
                                kernel
                                    .micro(kp, a_panel, a_row, b_panel, w_tile, first, last, &tile)
                            };
                            ir += mr;
                        }
                        jr += nr;
                    }
                    ic += mcur;
                }
                pc += kcur;
            }
            ic2 += m2cur;
        }
        jc += ncur;
    }
}

/// The depth block for depth `k`: all of it up to 1.25 `KC` (a second block of a few steps
/// would cost more in partial-sum traffic than it saves in cache), else `k` split into the
/// fewest blocks of at most `KC`, of equal size (a multiple of `KPACK`), so no block is short.
/// It depends on `k` only, so the blocking is the same on every thread.
fn depth_block<T, O, K: Kernel<T, O>>(k: usize) -> usize {
    let whole = k.div_ceil(K::KPACK) * K::KPACK;
    if k <= K::KC + K::KC / 4 {
        return whole.max(K::KPACK);
    }
    let blocks = k.div_ceil(K::KC);
    k.div_ceil(blocks).div_ceil(K::KPACK) * K::KPACK
}

/// Whether op(A) can be read in place by the microkernel (full panels skip packing).
fn a_is_direct<T, O, K: Kernel<T, O>>(p: &Problem<T, O>) -> bool {
    K::DIRECT_A && p.a_ps == 1 && (K::KPACK == 1 || p.a_rs.is_multiple_of(K::KPACK))
}

/// Whether a problem runs with its partial sums in C ([`run_block_acc_in_c`]): a float32 C with
/// `alpha == 1` (weight gradients), more than one depth block, and an op(A) that must be packed.
/// It depends on the problem only, never on the thread count or the budgets, so results stay
/// bit-identical across them.
fn uses_acc_in_c<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(p: &Problem<T, O>) -> bool {
    K::ACC_IN_C
        && O::DTYPE == mp_core::DType::F32
        && p.out.alpha == 1.0
        && p.k > depth_block::<T, O, K>(p.k)
        && !a_is_direct::<T, O, K>(p)
}

/// Computes C[rows, cols] with the partial sums kept in C (the BLIS order): for each column block
/// and depth block, B~ holds only that depth block, so the column block can span the thread's
/// whole share and each block of op(A) is packed once, where the whole-depth B~ of
/// [`run_block_with`] would limit a deep GEMM (a weight gradient, `k` = the batch) to a few
/// panels and pack all of A again for each of them.
///
/// # Safety
/// As for [`run_block_with`]; [`uses_acc_in_c`] must hold.
unsafe fn run_block_acc_in_c<T: GemmInput, O: GemmOutput, K: Kernel<T, O>>(
    kernel: &K,
    p: &Problem<T, O>,
    rows: Range<usize>,
    cols: Range<usize>,
    blocking: Blocking,
    bufs: &mut Buffers,
) {
    let (mr, nr) = (K::MR, K::NR);
    let psize = size_of::<K::P>();
    let kc = depth_block::<T, O, K>(p.k);
    let kcp = kc.div_ceil(K::KPACK);
    let nc =
        ((blocking.b_bytes / (kcp * nr * psize)).max(1) * nr).min(cols.len().div_ceil(nr) * nr);
    let mc = K::MC.min(rows.len().div_ceil(mr) * mr);
    let b_pack: *mut K::P = grow(&mut bufs.b, nc * kcp * psize).cast();
    let a_pack: *mut K::P = grow(&mut bufs.a, mc * kcp * psize).cast();
    let out = &p.out;

    let mut jc = cols.start;
    while jc < cols.end {
        let ncur = nc.min(cols.end - jc);
        let mut pc = 0;
        while pc < p.k {
            let kcur = kc.min(p.k - pc);
            let kp = kcur.div_ceil(K::KPACK);
            let first = pc == 0;
            let last = pc + kcur == p.k;
            let mut ic = rows.start;
            while ic < rows.end {
                let mcur = mc.min(rows.end - ic);
                // SAFETY: op(A)[ic..ic+mcur, pc..pc+kcur] is inside A; a_pack holds mc x kcp.
                let a_row = unsafe {
                    kernel.pack_a(
                        p.a.add(ic * p.a_rs + pc * p.a_ps),
                        p.a_rs,
                        p.a_ps,
                        mcur,
                        kcur,
                        a_pack,
                    )
                };
                let mut jr = 0;
                while jr < ncur {
                    // SAFETY: panel jr / nr of b_pack holds kcp x nr elements.
                    let b_panel = unsafe { b_pack.add((jr / nr) * kcp * nr) };
                    if ic == rows.start {
                        // B~ for this depth block, one panel at a time on first use.
                        // SAFETY: op(B)[pc..pc+kcur, jc+jr..jc+jr+nr] is inside B.
                        unsafe {
                            kernel.pack_b(
                                p.b.add((jc + jr) * p.b_cs + pc * p.b_ps),
                                p.b_cs,
                                p.b_ps,
                                nr.min(ncur - jr),
                                kcur,
                                b_panel,
                            )
                        };
                    }
                    let mut ir = 0;
                    while ir < mcur {
                        let (i, j) = (ic + ir, jc + jr);
                        let tile = Tile {
                            // alpha is 1 here; beta applies once, to the first block's load.
                            beta: if first { out.beta } else { 0.0 },
                            acc_in_c: true,
                            // SAFETY: (i, j) is inside C.
                            ..unsafe { out.tile(i, j, mr.min(mcur - ir), nr.min(ncur - jr)) }
                        };
                        // SAFETY: panel ir / mr of a_pack; the panels hold kp packed steps; the
                        // tile is inside C and owned by this thread.
                        unsafe {
                            let a_panel = a_pack.add((ir / mr) * mr * kp).cast_const();
                            kernel.micro(
                                kp,
                                a_panel,
                                a_row,
                                b_panel,
                                std::ptr::null_mut(),
                                first,
                                last,
                                &tile,
                            )
                        };
                        ir += mr;
                    }
                    jr += nr;
                }
                ic += mcur;
            }
            pc += kcur;
        }
        jc += ncur;
    }
}

/// The rate of `kernel`'s microkernel alone on the calling thread, GFLOP/s (one multiply-add = 2
/// FLOP): calls on one `MR x NR` tile over `depth`, A cycling through 4 packed panels and B one
/// packed panel (packed from fixed values), its partial sums loaded and stored through the tile
/// workspace as between depth blocks, for about `seconds`. Nothing is packed or split while it
/// runs: the ceiling of any GEMM on this kernel, and the operands stay in L1 when the B panel
/// is small (`depth x NR` elements).
///
/// # Safety
/// The CPU must support the kernel.
pub(crate) unsafe fn microkernel_gflops<T: GemmInput, K: Kernel<T, f32>>(
    kernel: &K,
    depth: usize,
    seconds: f64,
) -> f64 {
    const PANELS: usize = 4;
    let (mr, nr) = (K::MR, K::NR);
    let depth = depth.max(1).div_ceil(K::KPACK) * K::KPACK;
    let kp = depth / K::KPACK;
    let psize = size_of::<K::P>();
    let value = |i: usize| T::from_f32(((i % 7) as f32 - 3.0) / 64.0);
    let a_src: Vec<T> = (0..PANELS * mr * depth).map(value).collect();
    let b_src: Vec<T> = (0..nr * depth).map(value).collect();
    let (mut a_buf, mut b_buf, mut w_buf) = (Vec::new(), Vec::new(), Vec::new());
    let a: *mut K::P = grow(&mut a_buf, PANELS * mr * kp * psize).cast();
    let b: *mut K::P = grow(&mut b_buf, nr * kp * psize).cast();
    let w: *mut f32 = grow(&mut w_buf, 2 * mr * nr * size_of::<f32>()).cast();
    let mut c = vec![0.0f32; mr * nr];
    // SAFETY: the sources hold PANELS * MR rows and NR columns of `depth` elements (row-major
    // A, k-major B), and the buffers the packed panels.
    let a_row = unsafe {
        let a_row = kernel.pack_a(a_src.as_ptr(), depth, 1, PANELS * mr, depth, a);
        kernel.pack_b(b_src.as_ptr(), 1, nr, nr, depth, b);
        a_row
    };
    // A row-major pack (rows of kp) puts panel q at q * MR rows; k-major at q * MR * kp too.
    let out = Output {
        c: c.as_mut_ptr(),
        ldc: nr,
        alpha: 1.0,
        beta: 0.0,
        bias: std::ptr::null(),
        relu: false,
    };
    // SAFETY: (0, 0) with MR x NR is C itself.
    let tile = unsafe { out.tile(0, 0, mr, nr) };
    let start = std::time::Instant::now();
    let mut calls = 0usize;
    loop {
        for q in 0..64 {
            // SAFETY: panel q % PANELS of the packed A, the packed B panel, the workspace tile.
            unsafe {
                kernel.micro(
                    kp,
                    a.add((q % PANELS) * mr * kp),
                    a_row,
                    b,
                    w,
                    calls == 0 && q == 0,
                    false,
                    &tile,
                )
            };
        }
        calls += 64;
        if start.elapsed().as_secs_f64() >= seconds {
            break;
        }
    }
    std::hint::black_box((&c, &w_buf));
    let flop = 2.0 * (calls * mr * nr * depth) as f64;
    flop / start.elapsed().as_secs_f64() / 1e9
}
