//! Compile-fail tests of `#[model]`: one diagnostic per file in `tests/ui/`, with its `.stderr`.
//! Regenerate with `TRYBUILD=overwrite cargo test -p mp-macros --test compiletest` and read the
//! diff. The must-compile cases are in `tests/model.rs`, where they also run.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
