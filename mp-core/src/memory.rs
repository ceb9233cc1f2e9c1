//! Counts of the bytes held by tensors, for the benchmark's memory figures, and the cache of
//! freed tensor buffers.
//!
//! Every CPU tensor buffer is allocated through this module, which keeps the bytes currently held
//! and the peak since the last [`reset_peak`]. The counters are process-wide atomics; reading them
//! costs nothing on the hot path beyond two atomic adds per allocation.
//!
//! Large freed buffers (at least [`CACHE_MIN_BYTES`]) are kept for reuse, as PyTorch's caching
//! allocator does: a training step allocates the same activation and gradient shapes every step,
//! and a fresh allocation of that size is a fresh `mmap` whose every page faults and is zeroed by
//! the kernel on first touch (about 4% of a step of the guide's model here). Cached bytes are not
//! held by tensors, so [`live_bytes`] and [`peak_bytes`] do not count them; [`cached_bytes`]
//! reports them, [`release_cached`] returns them to the system, and `MP_BUFFER_CACHE_MIB` caps
//! them (default 1024; 0 turns the cache off). When full, the oldest cached buffers are freed
//! first.

use std::alloc::{self, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The alignment of CPU tensor buffers, in bytes (buffers of at least [`HUGE_MIN_BYTES`] are
/// aligned to [`HUGE_ALIGN`]).
pub const ALIGN: usize = 64;

/// Buffers at least this large are aligned to [`HUGE_ALIGN`] and backed by transparent huge
/// pages where Linux offers them ([`advise_huge_pages`]).
pub const HUGE_MIN_BYTES: usize = 2 << 20;

/// The alignment of large buffers: one x86-64 huge page.
pub const HUGE_ALIGN: usize = 2 << 20;

/// The layout of a buffer of `size` bytes: 64-byte aligned, or [`HUGE_ALIGN`]ed from
/// [`HUGE_MIN_BYTES`] up; `None` if the size is too large for any layout.
pub(crate) fn buffer_layout(size: usize) -> Option<Layout> {
    let align = if size >= HUGE_MIN_BYTES {
        HUGE_ALIGN
    } else {
        ALIGN
    };
    Layout::from_size_align(size, align).ok()
}

/// Asks Linux to back `[ptr, ptr + bytes)` with transparent huge pages (`madvise(MADV_HUGEPAGE)`,
/// what the default `madvise` setting of `/sys/kernel/mm/transparent_hugepage/enabled` waits
/// for), for the whole 4 KiB pages inside the range. Call it before the memory is first touched:
/// pages already faulted in stay small until the kernel collapses them. Nothing happens on other
/// systems, where THP is off, or for a range too small to hold an aligned huge page.
///
/// Why: a GEMM reads its operands across many pages at once (the rows of A at their stride, a
/// column block of B, the rows of C), and on 4 KiB pages in a virtual machine every TLB miss is
/// a two-level page walk. On the Intel Xeon KVM guest the README's figures come from, huge pages
/// alone took a 4096^3 float32 GEMM from 200 to 250 GFLOP/s.
pub fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize).saturating_add(bytes) / PAGE * PAGE;
        if !ptr.is_null() && end >= start + HUGE_ALIGN {
            // SAFETY: madvise only changes how the kernel backs these pages (whole pages inside
            // memory the caller owns); it never changes their contents or the mapping. Its
            // result is ignored: an unsupported advice leaves the pages as they were.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// Allocates `layout` (from [`buffer_layout`]) zeroed; a large one is advised huge pages before
/// it is zeroed, so its pages fault in huge. Null when the allocator fails.
///
/// # Safety
/// `layout` must have a non-zero size.
pub(crate) unsafe fn alloc_zeroed(layout: Layout) -> *mut u8 {
    if layout.align() < HUGE_ALIGN {
        // SAFETY: forwarded (non-zero size).
        return unsafe { alloc::alloc_zeroed(layout) };
    }
    // SAFETY: forwarded (non-zero size).
    let p = unsafe { alloc::alloc(layout) };
    if !p.is_null() {
        advise_huge_pages(p, layout.size());
        // SAFETY: p holds layout.size() bytes.
        unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
    }
    p
}

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently held by tensors.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes held by tensors at once since the last [`reset_peak`] (or process start).
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Restarts peak tracking from the bytes held now.
pub fn reset_peak() {
    PEAK.store(live_bytes(), Ordering::Relaxed);
}

pub(crate) fn on_alloc(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

pub(crate) fn on_free(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

/// The smallest buffer the cache keeps, in bytes (smaller ones come from the allocator's own
/// free lists, without page faults).
pub const CACHE_MIN_BYTES: usize = 256 << 10;

/// Freed buffers, oldest first: (size in bytes, address), each allocated with [`cache_layout`].
struct Cache {
    free: Vec<(usize, usize)>,
    bytes: usize,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(Cache {
            free: Vec::new(),
            bytes: 0,
        })
    })
}

/// The knob that caps the cache.
pub const KNOB: &str = "MP_BUFFER_CACHE_MIB";

/// The cap `MP_BUFFER_CACHE_MIB` asks for, in bytes (default 1024 MiB; at most 1 TiB).
fn parse_cap(value: Option<&str>) -> std::result::Result<usize, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(1024 << 20);
    };
    match v.parse::<usize>() {
        Ok(mib) if mib <= 1 << 20 => Ok(mib << 20),
        _ => Err(format!(
            "{KNOB}={v:?} is not a whole number of MiB from 0 to 1048576"
        )),
    }
}

/// The cap, or the knob's error (the cache is then off).
fn cap_or_error() -> &'static std::result::Result<usize, String> {
    static CAP: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    CAP.get_or_init(|| parse_cap(std::env::var(KNOB).ok().as_deref()))
}

fn cache_cap() -> usize {
    cap_or_error().as_ref().map_or(0, |c| *c)
}

/// An error naming `MP_BUFFER_CACHE_MIB` when its value is malformed (mp-kernels refuses to run
/// then, instead of ignoring it).
pub fn check_knob() -> crate::Result<()> {
    cap_or_error()
        .as_ref()
        .map(|_| ())
        .map_err(|what| crate::Error::InvalidArgument { what: what.clone() })
}

/// Bytes of freed tensor buffers kept for reuse (not held by any tensor).
pub fn cached_bytes() -> usize {
    cache().lock().map_or(0, |c| c.bytes)
}

/// Returns every cached buffer to the system (like `torch.cuda.empty_cache()`).
pub fn release_cached() {
    let Ok(mut c) = cache().lock() else { return };
    let free = std::mem::take(&mut c.free);
    c.bytes = 0;
    drop(c);
    for (size, p) in free {
        // SAFETY: each address was allocated with this layout and handed to the cache, which
        // owned it exclusively.
        unsafe { alloc::dealloc(p as *mut u8, cache_layout(size)) };
    }
}

fn cache_layout(size: usize) -> Layout {
    buffer_layout(size).expect("a layout that was valid before")
}

/// A cached buffer of exactly `size` bytes (laid out by [`buffer_layout`], contents left over),
/// if one is free: the most recently freed one.
pub(crate) fn take_cached(size: usize) -> Option<*mut u8> {
    if size < CACHE_MIN_BYTES {
        return None;
    }
    let mut c = cache().lock().ok()?;
    let i = c.free.iter().rposition(|&(s, _)| s == size)?;
    let (_, p) = c.free.remove(i);
    c.bytes -= size;
    Some(p as *mut u8)
}

/// Offers a freed buffer of `size` bytes (allocated with [`buffer_layout`]) to the cache, which
/// frees its oldest buffers to make room (what a training step frees now is what the next step
/// allocates); `false` when it declines (too small, or larger than the cap), and the caller
/// frees it.
pub(crate) fn give_cached(ptr: *mut u8, size: usize) -> bool {
    if size < CACHE_MIN_BYTES || size > cache_cap() {
        return false;
    }
    let Ok(mut c) = cache().lock() else {
        return false;
    };
    let mut evicted = Vec::new();
    while c.bytes + size > cache_cap() && !c.free.is_empty() {
        let (s, p) = c.free.remove(0);
        c.bytes -= s;
        evicted.push((s, p));
    }
    c.bytes += size;
    c.free.push((size, ptr as usize));
    drop(c);
    for (s, p) in evicted {
        // SAFETY: the cache owned this buffer exclusively; it was allocated with this layout.
        unsafe { alloc::dealloc(p as *mut u8, cache_layout(s)) };
    }
    true
}

#[cfg(test)]
mod tests {
    use crate::{F32, Tensor};

    #[test]
    fn the_cache_knob_is_validated() {
        assert_eq!(super::parse_cap(None), Ok(1024 << 20));
        assert_eq!(super::parse_cap(Some("0")), Ok(0));
        assert_eq!(super::parse_cap(Some(" 64 ")), Ok(64 << 20));
        for bad in ["abc", "-5", "1e20", "99999999999"] {
            let e = super::parse_cap(Some(bad)).unwrap_err();
            assert!(e.contains("MP_BUFFER_CACHE_MIB") && e.contains(bad), "{e}");
        }
    }

    /// A buffer of 2 MiB or more starts on a huge-page boundary, is zeroed when fresh, and goes
    /// through the cache with the same layout (a size no other test uses).
    #[test]
    fn large_buffers_are_aligned_to_huge_pages() {
        let n = (3 << 20) / 4 + 17;
        let a = Tensor::<F32>::full(&[n], 1.5).unwrap();
        let p = a.as_slice().unwrap().as_ptr();
        assert_eq!(p as usize % super::HUGE_ALIGN, 0);
        assert!(a.as_slice().unwrap().iter().all(|&x| x == 1.5));
        drop(a);
        let b = Tensor::<F32>::zeros(&[n]).unwrap();
        assert_eq!(
            b.as_slice().unwrap().as_ptr() as usize % super::HUGE_ALIGN,
            0
        );
        assert!(b.as_slice().unwrap().iter().all(|&x| x == 0.0));
        let small = Tensor::<F32>::zeros(&[1000]).unwrap();
        assert_eq!(
            small.as_slice().unwrap().as_ptr() as usize % super::ALIGN,
            0
        );
    }

    /// Advice on any range, aligned or not, empty or null, changes no byte.
    #[test]
    fn huge_page_advice_leaves_contents_alone() {
        super::advise_huge_pages(std::ptr::null_mut(), 0);
        super::advise_huge_pages(std::ptr::null_mut(), 8 << 20);
        let mut v: Vec<u8> = (0..(5 << 20) + 3).map(|i| (i % 251) as u8).collect();
        super::advise_huge_pages(v.as_mut_ptr().wrapping_add(1), v.len() - 2);
        assert!(v.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
    }

    /// A dropped large buffer is reused by the next allocation of its size: `for_overwrite` sees
    /// the old values, `zeros` still gives zeros, and the bytes move between the tensor count
    /// and the cache. (A size no other test uses, so parallel tests cannot take it.)
    #[test]
    fn freed_large_buffers_are_reused() {
        if super::cache_cap() == 0 {
            eprintln!("skipped: MP_BUFFER_CACHE_MIB=0 turns the cache off");
            return;
        }
        let n = 333_331;
        let a = Tensor::<F32>::full(&[n], 2.5).unwrap();
        let p = a.as_slice().unwrap().as_ptr();
        drop(a);
        let b = Tensor::<F32>::for_overwrite(&[n]).unwrap();
        assert_eq!(
            b.as_slice().unwrap().as_ptr(),
            p,
            "the freed buffer was not reused"
        );
        assert!(b.as_slice().unwrap().iter().all(|&x| x == 2.5));
        drop(b);
        let c = Tensor::<F32>::zeros(&[n]).unwrap();
        assert_eq!(c.as_slice().unwrap().as_ptr(), p);
        assert!(c.as_slice().unwrap().iter().all(|&x| x == 0.0));
        // A different dtype of the same byte size reuses it too, and reads valid numbers.
        drop(c);
        let d = Tensor::<crate::BF16>::for_overwrite(&[2 * n]).unwrap();
        assert_eq!(d.as_slice().unwrap().as_ptr().cast::<f32>(), p);
        assert!(d.to_f32_vec().unwrap().iter().all(|x| *x == 0.0));
    }

    #[test]
    fn small_buffers_are_not_cached() {
        let mut x = [0u8; 64];
        assert!(!super::give_cached(x.as_mut_ptr(), 4000));
        assert!(super::take_cached(4000).is_none());
    }
}
