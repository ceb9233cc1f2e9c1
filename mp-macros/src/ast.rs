//! The macro's model of a `#[model]` struct: borrows the `syn` tree, so every piece keeps its span.

use syn::ext::IdentExt;
use syn::{Attribute, Data, DeriveInput, Fields, Ident, Type, Visibility};

use crate::attr::{self, FieldPolicy};
use crate::ctxt::Ctxt;

/// A struct with named fields, one layer each.
pub(crate) struct Model<'a> {
    pub(crate) input: &'a DeriveInput,
    /// The struct's name without `r#`, for messages and summaries.
    pub(crate) name: String,
    pub(crate) fields: Vec<Field<'a>>,
}

/// One layer of a model.
pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    /// The field's name without `r#`: the layer's name and its variables' path prefix.
    pub(crate) name: String,
    pub(crate) vis: &'a Visibility,
    /// The attributes to keep (all but `#[dtype]` and `#[residual]`).
    pub(crate) attrs: Vec<&'a Attribute>,
    /// The type as written, without its policy.
    pub(crate) ty: &'a Type,
    pub(crate) policy: FieldPolicy,
    /// `#[residual]`: the output is `input + layer(input)`.
    pub(crate) residual: bool,
}

impl<'a> Model<'a> {
    /// The model of `input`, or `None` (with the error in `cx`) when it is not a struct with
    /// named fields.
    pub(crate) fn from_syn(input: &'a DeriveInput, cx: &Ctxt) -> Option<Model<'a>> {
        const SHAPE: &str = "`#[model]` expects a struct with named fields, one per layer: \
                             `struct Digits { dense_1: Dense, predictions: Softmax }`";
        let fields = match &input.data {
            Data::Struct(s) => match &s.fields {
                Fields::Named(named) => named
                    .named
                    .iter()
                    .filter_map(|f| Field::from_syn(f, cx))
                    .collect(),
                Fields::Unit => vec![],
                Fields::Unnamed(unnamed) => {
                    cx.fatal_spanned(
                        unnamed,
                        format!("a tuple struct cannot be a model; {SHAPE}"),
                    );
                    return None;
                }
            },
            Data::Enum(e) => {
                cx.fatal_spanned(e.enum_token, format!("an enum cannot be a model; {SHAPE}"));
                return None;
            }
            Data::Union(u) => {
                cx.fatal_spanned(u.union_token, format!("a union cannot be a model; {SHAPE}"));
                return None;
            }
        };
        Some(Model {
            input,
            name: input.ident.unraw().to_string(),
            fields,
        })
    }
}

impl<'a> Field<'a> {
    fn from_syn(field: &'a syn::Field, cx: &Ctxt) -> Option<Field<'a>> {
        let Some(ident) = &field.ident else {
            // syn gives every named field an ident; never panic if that changes.
            cx.fatal_spanned(field, "expected a named field");
            return None;
        };
        Some(Field {
            ident,
            name: ident.unraw().to_string(),
            vis: &field.vis,
            attrs: field
                .attrs
                .iter()
                .filter(|a| !attr::is_dtype(a) && !attr::is_residual(a))
                .collect(),
            ty: &field.ty,
            policy: attr::field_policy(&field.attrs, cx),
            residual: attr::residual(&field.attrs, cx),
        })
    }
}
