//! Kernel threads that cannot be started (a process thread limit: `ulimit -u 8` made
//! `mnist_fit` panic in the compatibility check) are an error naming `MP_NUM_THREADS` at every
//! entry point, never a panic; a kernel reached anyway runs on the calling thread.
//!
//! The limit is injected in the pool builder's spawn handler (CI runs as root, where `ulimit -u`
//! is not enforced). The pool is built once per process, so this file holds a single test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mp_core::Policy;
use mp_kernels::gelu::{self, Gelu};
use mp_kernels::{Cpu, Isa, calibrate, peak, threads};

#[test]
fn a_thread_limit_is_an_error_naming_the_knob_at_every_entry_point() {
    // SAFETY: this binary's only test sets the variable before anything reads the environment
    // on another thread (the kernel pool is not built yet).
    unsafe { std::env::set_var(threads::KNOB, "2") };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    threads::set_spawn_handler(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "Resource temporarily unavailable (injected)",
        ))
    })
    .unwrap();

    let names_the_limit = |e: &dyn std::fmt::Display| {
        let e = e.to_string();
        for part in [
            "MP_NUM_THREADS",
            "cannot start 2 kernel threads (MP_NUM_THREADS=2)",
            "Resource temporarily unavailable (injected)",
            "ulimit -u",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e:?}");
        }
    };
    names_the_limit(&threads::try_pool().unwrap_err());
    // The path that panicked: the compatibility check's calibration and its machine key.
    names_the_limit(&calibrate::check(Policy::MixedBFloat16).unwrap_err());
    names_the_limit(&calibrate::calibration().unwrap_err());
    names_the_limit(&calibrate::recommended_policy().unwrap_err());
    names_the_limit(&Cpu::with(Isa::Scalar).unwrap_err());
    names_the_limit(&Cpu::global().unwrap_err());
    // The pool was tried once; the error is the same at every call.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let e = threads::set_spawn_handler(|_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("already started"), "{e}");

    // What does not need a Cpu runs on the calling thread.
    assert_eq!(threads::num_threads(), 1);
    assert_eq!(threads::pool().current_num_threads(), 1);
    let me = std::thread::current().id();
    assert_eq!(
        threads::pool().broadcast(|| std::thread::current().id()),
        [me]
    );
    assert!(peak::describe_cpu().contains("1 kernel threads"));
    // Large enough to be split over the threads if there were any.
    let x: Vec<f32> = (0..1 << 20).map(|i| (i % 97) as f32 / 16.0 - 3.0).collect();
    let mut y = vec![0.0f32; x.len()];
    gelu::gelu(Gelu::Exact, &x, &mut y).unwrap();
    for (&x, &y) in x.iter().zip(&y) {
        assert_eq!(y, gelu::forward_f32(Gelu::Exact, x));
    }
}
