//! The error collector (serde_derive's `Ctxt`): every check reports into it, so one expansion
//! shows every error at once, each spanned on its own tokens.

use std::cell::{Cell, RefCell};
use std::fmt::Display;

use quote::ToTokens;

/// Collects every error, so one expansion reports all of them.
///
/// Errors are *recoverable* when the full expansion can still be generated around them (a bad
/// `#[dtype]` falls back to float32; arguments to `#[model(...)]` are ignored), so users see only
/// the error itself; otherwise *fatal*, and the expansion is a stub. [`Ctxt::finish`] must be
/// called: dropping a collector that still holds errors is a bug in the macro (the errors would
/// be lost), which the drop guard reports.
pub(crate) struct Ctxt {
    /// `None` once [`Ctxt::finish`] took the errors.
    errors: RefCell<Option<Vec<syn::Error>>>,
    fatal: Cell<bool>,
}

impl Ctxt {
    /// A collector with no errors.
    pub(crate) fn new() -> Self {
        Ctxt {
            errors: RefCell::new(Some(Vec::new())),
            fatal: Cell::new(false),
        }
    }

    fn push(&self, error: syn::Error) {
        if let Some(errors) = self.errors.borrow_mut().as_mut() {
            errors.push(error);
        }
    }

    /// A recoverable error at `tokens`.
    pub(crate) fn error_spanned(&self, tokens: impl ToTokens, msg: impl Display) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }

    /// An error after which the struct cannot be expanded.
    pub(crate) fn fatal(&self, error: syn::Error) {
        self.fatal.set(true);
        self.push(error);
    }

    /// A fatal error at `tokens`.
    pub(crate) fn fatal_spanned(&self, tokens: impl ToTokens, msg: impl Display) {
        self.fatal(syn::Error::new_spanned(tokens, msg));
    }

    /// Every error combined (in the order found), and whether any was fatal.
    pub(crate) fn finish(self) -> (Option<syn::Error>, bool) {
        let errors = self.errors.take().unwrap_or_default();
        let combined = errors.into_iter().reduce(|mut all, e| {
            all.combine(e);
            all
        });
        (combined, self.fatal.get())
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        let forgotten = self
            .errors
            .get_mut()
            .as_ref()
            .is_some_and(|e| !e.is_empty());
        if forgotten && !std::thread::panicking() {
            panic!("mp-macros bug: a Ctxt holding errors was dropped without `finish`");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_combines_in_order_and_reports_fatal() {
        let cx = Ctxt::new();
        cx.error_spanned(quote::quote!(a), "first");
        cx.fatal_spanned(quote::quote!(b), "second");
        let (errors, fatal) = cx.finish();
        let msgs: Vec<String> = errors.unwrap().into_iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs, ["first", "second"]);
        assert!(fatal);
        let (none, fatal) = Ctxt::new().finish();
        assert!(none.is_none() && !fatal);
    }

    #[test]
    fn dropping_unfinished_errors_is_caught() {
        let caught = std::panic::catch_unwind(|| {
            let cx = Ctxt::new();
            cx.error_spanned(quote::quote!(a), "lost");
        });
        assert!(caught.is_err());
        // An empty collector may be dropped.
        drop(Ctxt::new());
    }
}
