//! The rules a `#[model]` struct must follow.

use proc_macro2::TokenStream;
use syn::spanned::Spanned;
use syn::{GenericArgument, PathArguments, Type};

use crate::ast::{Field, Model};
use crate::ctxt::Ctxt;

/// `#[model]` takes no arguments.
pub(crate) fn check_args(args: &TokenStream, cx: &Ctxt) {
    if !args.is_empty() {
        cx.error_spanned(
            args,
            "`#[model]` takes no arguments; a model's policy is its type parameter \
             (`Digits<MixedFloat16>`) and a field's is set with `#[dtype = \"...\"]`",
        );
    }
}

/// The rules on a struct that parsed as a model.
pub(crate) fn check(model: &Model<'_>, cx: &Ctxt) {
    let generics = &model.input.generics;
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        let msg = "`#[model]` adds the policy parameter itself (`Digits<P: PolicyKind>`); \
                   remove the struct's generics";
        match &generics.where_clause {
            Some(w) if generics.params.is_empty() => cx.fatal_spanned(w, msg),
            _ => cx.fatal_spanned(generics, msg),
        }
    }
    if model.fields.is_empty() {
        cx.fatal_spanned(
            &model.input.ident,
            "a model needs at least one layer: add fields such as `dense_1: Dense`",
        );
    }
    for attr in model
        .input
        .attrs
        .iter()
        .filter(|a| crate::attr::is_dtype(a))
    {
        cx.error_spanned(
            attr,
            "`#[dtype]` goes on a field, not on the model: the model's policy is its type \
             parameter (`Digits<MixedFloat16>`)",
        );
    }
    for field in &model.fields {
        check_field(field, cx);
    }
    if let Some(last) = model.fields.last().filter(|f| f.residual) {
        cx.error_spanned(
            last.ident,
            "the last field cannot be `#[residual]`: its output is the model's output (float32); \
             add the layer that follows the residual block (an `Activation`, a `Softmax`) after \
             it",
        );
    }
}

/// A field's type must be a path to a layer type, written without its policy.
fn check_field(field: &Field<'_>, cx: &Ctxt) {
    let ty = field.ty;
    let path = match strip(ty) {
        Type::Path(p) if p.qself.is_none() => &p.path,
        _ => {
            cx.fatal_spanned(
                ty,
                "a model field's type must be a layer type such as `Dense` or `Softmax`, \
                 written without its policy parameter",
            );
            return;
        }
    };
    let Some(last) = path.segments.last() else {
        cx.fatal_spanned(ty, "expected a layer type");
        return;
    };
    match &last.arguments {
        PathArguments::None => {}
        PathArguments::AngleBracketed(args) => {
            // Naming a policy here is the mistake most worth catching: the macro adds it.
            if let Some(arg) = args.args.iter().find(|a| names_policy(a)) {
                cx.fatal(syn::Error::new(
                    arg.span(),
                    "leave the policy out of the field's type: `#[model]` appends it (the \
                     model's `P`, or the one named by `#[dtype = \"...\"]`)",
                ));
            }
        }
        PathArguments::Parenthesized(args) => cx.fatal_spanned(
            args,
            "a model field's type must be a layer type such as `Dense` or `Softmax`",
        ),
    }
}

/// `Float32`, `MixedFloat16`, `MixedBFloat16` or `P`, possibly behind a path.
fn names_policy(arg: &GenericArgument) -> bool {
    let GenericArgument::Type(Type::Path(p)) = arg else {
        return false;
    };
    p.path.segments.last().is_some_and(|s| {
        s.arguments.is_none()
            && ["P", "Float32", "MixedFloat16", "MixedBFloat16"]
                .iter()
                .any(|n| s.ident == n)
    })
}

/// The type inside invisible groups and parentheses (as macro_rules hands them over).
pub(crate) fn strip(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => strip(&g.elem),
        Type::Paren(p) => strip(&p.elem),
        other => other,
    }
}
