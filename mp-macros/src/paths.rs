//! The paths that generated code names: the generated code refers to mp-layers' public and
//! hidden items by absolute paths, so it compiles wherever `#[model]` is used.

use proc_macro2::TokenStream;
use quote::quote;

/// `::mp_layers`, its hidden helpers, and mp-core through them.
pub(crate) fn paths() -> (TokenStream, TokenStream, TokenStream) {
    (
        quote!(::mp_layers),
        quote!(::mp_layers::__private),
        quote!(::mp_layers::__private::mp_core),
    )
}
