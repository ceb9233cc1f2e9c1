//! The generated code: the struct with its policy parameter, `new`, `Layer`, `Model` under the
//! float32-output bound, and `Debug`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, GenericArgument, PathArguments, Type, parse_quote_spanned};

use crate::ast::{Field, Model};
use crate::attr::{self, FieldPolicy};
use crate::ctxt::Ctxt;
use crate::paths::paths;
use crate::stub::stub;
use crate::valid;

/// The whole expansion of `#[model]` with arguments `args` on `input`: the code, followed by
/// every error found. When an error leaves the struct unusable, the code is a stub that keeps
/// the struct's name and implements the traits, so the error is the only one users see.
pub(crate) fn model(args: TokenStream, input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    valid::check_args(&args, &cx);
    let model = Model::from_syn(input, &cx);
    if let Some(model) = &model {
        valid::check(model, &cx);
    }
    let (errors, fatal) = cx.finish();
    let mut out = match &model {
        Some(model) if !fatal => expand(model),
        _ => stub(input),
    };
    if let Some(errors) = errors {
        out.extend(errors.into_compile_error());
    }
    out
}

/// A field with its policy appended to its type.
struct Layer<'a> {
    field: &'a Field<'a>,
    /// `Dense<P>`, `Softmax<::mp_layers::__private::mp_core::Float32>`.
    ty: Type,
    /// `<Dense<P> as ::mp_layers::Layer>`, and below `::mp_layers::Input<Dense<P>>`, spanned
    /// on the field's type: a type that is not a layer is then reported at the field, once
    /// (rustc merges identical errors at one span) instead of once per use.
    as_layer: TokenStream,
    compute: TokenStream,
}

impl<'a> Layer<'a> {
    fn new(field: &'a Field<'a>) -> Layer<'a> {
        let ty = with_policy(field.ty, field.policy);
        let span = field.ty.span();
        let as_layer = quote_spanned!(span=> <#ty as ::mp_layers::Layer>);
        let compute = quote_spanned!(span=> ::mp_layers::Input<#ty>);
        Layer {
            field,
            ty,
            as_layer,
            compute,
        }
    }
}

/// `ty` with `policy` as its last generic argument. The added tokens carry the type's span, so
/// an error about them (a type that takes no policy) points at the field.
fn with_policy(ty: &Type, policy: FieldPolicy) -> Type {
    let span = ty.span();
    let arg: GenericArgument = match policy {
        FieldPolicy::Model => parse_quote_spanned!(span=> P),
        FieldPolicy::Fixed(fixed) => {
            let marker = format_ident!("{}", fixed.marker(), span = span);
            parse_quote_spanned!(span=> ::mp_layers::__private::mp_core::#marker)
        }
    };
    with_arg(ty, arg)
}

/// `ty` (stripped of a written policy) with `arg` appended to its last segment's arguments.
fn with_arg(ty: &Type, arg: GenericArgument) -> Type {
    let mut ty = valid::strip(ty).clone();
    let span = ty.span();
    if let Type::Path(p) = &mut ty
        && let Some(last) = p.path.segments.last_mut()
    {
        match &mut last.arguments {
            PathArguments::None => {
                last.arguments = PathArguments::AngleBracketed(parse_quote_spanned!(span=> <#arg>));
            }
            PathArguments::AngleBracketed(args) => args.args.push(arg),
            // Rejected by `valid::check`.
            PathArguments::Parenthesized(_) => {}
        }
    }
    ty
}

fn expand(model: &Model<'_>) -> TokenStream {
    let (mp, private, core) = paths();
    let layers: Vec<Layer<'_>> = model.fields.iter().map(Layer::new).collect();
    let Some(last) = layers.last() else {
        // `valid::check` makes an empty struct fatal; never panic if that changes.
        return stub(model.input);
    };
    let input = model.input;
    let ident = &input.ident;
    let vis = &input.vis;
    let name = &model.name;
    let attrs = input.attrs.iter().filter(|a| !attr::is_dtype(a));

    // The struct.
    let uses_p = model.fields.iter().any(|f| f.policy == FieldPolicy::Model);
    let phantom_field = (!uses_p).then(|| {
        quote! {
            #[doc(hidden)]
            __mp_policy: ::core::marker::PhantomData<P>,
        }
    });
    let phantom_init = (!uses_p).then(|| quote!(__mp_policy: ::core::marker::PhantomData,));
    let fields = layers.iter().map(|l| {
        let (attrs, vis, id, ty) = (&l.field.attrs, l.field.vis, l.field.ident, &l.ty);
        quote!(#(#attrs)* #vis #id: #ty,)
    });
    let ids: Vec<_> = layers.iter().map(|l| l.field.ident).collect();
    let tys: Vec<_> = layers.iter().map(|l| &l.ty).collect();
    let as_layers: Vec<_> = layers.iter().map(|l| &l.as_layer).collect();
    let names: Vec<_> = layers.iter().map(|l| l.field.name.as_str()).collect();

    // The float32-output rule: a trait only `F32` implements, required of the last layer's
    // output where `Model` is implemented, spanned on the last field so the error shows it.
    let rule = format_ident!("__Mp{}OutputMustBeFloat32", name);
    let last_name = &last.field.name;
    let message =
        format!("model `{name}` would output `{{Self}}`, but a model's output must be float32");
    let label = format!(
        "`{name}` is a layer but not a `Model` under this policy: its last field `{last_name}` \
         does not output float32"
    );
    let note = format!(
        "add `#[dtype = \"float32\"]` to the last field `{last_name}` so it computes in float32 \
         whatever the model's policy (the Keras mixed precision guide's float32 softmax); a \
         float16 or bfloat16 output loses precision in the loss"
    );
    let rule_doc = format!("The float32-output rule of [`{name}`]: implemented only for `F32`.");
    let last_ty = &last.ty;
    let last_as_layer = &last.as_layer;
    let output_item = quote_spanned!(last.field.ty.span()=> type Output = #last_as_layer::Output;);
    let first_compute = &layers[0].compute;
    let (first_id, first_as_layer) = (layers[0].field.ident, &layers[0].as_layer);
    // The field's name: what rustc underlines in its "required for ..." note.
    let span = last.field.ident.span();
    // Every token of the bound and of the `Model` impl's header carries the last field's span
    // (idents included: `quote_spanned!` does not respan them), so rustc's "required for
    // `Digits<MixedFloat16>` to implement `Model`" note shows that field.
    let mut rule_at_last = rule.clone();
    rule_at_last.set_span(span);
    let mut ident_at_last = ident.clone();
    ident_at_last.set_span(span);
    let bound = quote_spanned!(span=> <#last_ty as ::mp_layers::Layer>::Output: #rule_at_last);
    let model_header = quote_spanned! {span=>
        impl<P: ::mp_layers::__private::mp_core::PolicyKind> ::mp_layers::Model for #ident_at_last<P>
    };

    let new_doc = format!(
        "Creates the model from its layers, in declaration order ({}).",
        names.join(", ")
    );
    let forward = forward_chain(&layers, quote!(&), quote!(forward));
    let forward_train = forward_train_chain(&layers);
    let last_id = last.field.ident;
    let backward = backward_chain(
        &layers,
        |need| quote!(#last_as_layer::backward(&mut self.#last_id, dy, #need)),
    );
    let backward_softmax = backward_chain(
        &layers,
        |need| quote!(#last_as_layer::backward_from_softmax_input(&mut self.#last_id, dz, #need)),
    );
    let build = layers.iter().enumerate().map(|(i, l)| {
        let (id, ty, field) = (l.field.ident, &l.ty, &l.field.name);
        let (previous, input) = match i.checked_sub(1) {
            None => ("the model input", quote!(input_shape)),
            Some(p) => (names[p], quote!(&shape)),
        };
        let build = if l.field.residual {
            quote!(build_residual)
        } else {
            quote!(build_child)
        };
        quote!(let shape = #private::#build::<#ty>(&mut self.#id, #field, #previous, #input)?;)
    });
    let residual_rules = residual_rules(model, &layers);
    let debug = (!attr::derives_debug(&input.attrs)).then(|| {
        quote! {
            #[automatically_derived]
            impl<P: #core::PolicyKind> ::core::fmt::Debug for #ident<P> {
                fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    f.debug_struct(#name)
                        .field("policy", &::core::format_args!("{}", <P as #core::PolicyKind>::POLICY))
                        #(.field(#names, &::core::format_args!(
                            "{} ({})",
                            #as_layers::type_name(&self.#ids),
                            <#as_layers::Policy as #core::PolicyKind>::POLICY,
                        )))*
                        .finish()
                }
            }
        }
    });

    quote! {
        #(#attrs)*
        #vis struct #ident<P: #core::PolicyKind> {
            #(#fields)*
            #phantom_field
        }

        #[doc = #rule_doc]
        #[diagnostic::on_unimplemented(message = #message, label = #label, note = #note)]
        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        pub trait #rule {}

        #[automatically_derived]
        impl #rule for #core::F32 {}

        #[automatically_derived]
        impl<P: #core::PolicyKind> #ident<P> {
            #[doc = #new_doc]
            #[allow(clippy::too_many_arguments)]
            #vis fn new(#(#ids: #tys),*) -> Self {
                Self { #(#ids,)* #phantom_init }
            }
        }

        #[automatically_derived]
        impl<P: #core::PolicyKind> #mp::Layer for #ident<P> {
            type Policy = P;
            type Input = #first_compute;
            #output_item

            fn type_name(&self) -> &'static str {
                #name
            }

            fn name(&self) -> &str {
                #name
            }

            /// A model's name is its type's; renaming it does nothing.
            fn set_name(&mut self, _name: &str) {}

            fn build(&mut self, input_shape: &[usize]) -> #mp::Result<::std::vec::Vec<usize>> {
                #(#build)*
                ::core::result::Result::Ok(shape)
            }

            fn output_shape(&self) -> ::core::option::Option<&[usize]> {
                #last_as_layer::output_shape(&self.#last_id)
            }

            /// The model's input is its first layer's.
            fn check_input(
                &self,
                x: &#private::ndarray::ArrayViewD<'_, f32>,
            ) -> #mp::Result<()> {
                #first_as_layer::check_input(&self.#first_id, x)
            }

            fn forward(
                &self,
                x: &#core::Tensor<<Self as #mp::Layer>::Input>,
            ) -> #mp::Result<#core::Tensor<<Self as #mp::Layer>::Output>> {
                #forward
            }

            fn forward_train(
                &mut self,
                x: &#core::Tensor<<Self as #mp::Layer>::Input>,
            ) -> #mp::Result<#core::Tensor<<Self as #mp::Layer>::Output>> {
                #forward_train
            }

            fn backward(
                &mut self,
                dy: &#core::Tensor<<Self as #mp::Layer>::Output>,
                need_dx: bool,
            ) -> #mp::Result<::core::option::Option<#core::Tensor<<Self as #mp::Layer>::Input>>> {
                #backward
            }

            fn ends_in_softmax(&self) -> bool {
                #last_as_layer::ends_in_softmax(&self.#last_id)
            }

            fn backward_from_softmax_input(
                &mut self,
                dz: &#core::Tensor<#core::F32>,
                need_dx: bool,
            ) -> #mp::Result<::core::option::Option<#core::Tensor<<Self as #mp::Layer>::Input>>> {
                #backward_softmax
            }

            fn visit_variables(
                &mut self,
                prefix: &str,
                f: &mut dyn ::core::ops::FnMut(&str, &mut #core::Variable) -> #mp::Result<()>,
            ) -> #mp::Result<()> {
                #(#as_layers::visit_variables(
                    &mut self.#ids,
                    &#private::child_prefix(prefix, #names),
                    f,
                )?;)*
                ::core::result::Result::Ok(())
            }

            fn foreign_tensors(
                &mut self,
                prefix: &str,
                out: &mut #mp::checkpoint::ForeignTensors,
            ) -> #mp::Result<()> {
                #(#as_layers::foreign_tensors(
                    &mut self.#ids,
                    &#private::child_prefix(prefix, #names),
                    out,
                )?;)*
                ::core::result::Result::Ok(())
            }

            fn saved_bytes(&self) -> usize {
                #(#as_layers::saved_bytes(&self.#ids))+*
            }

            fn param_count(&self) -> usize {
                #(#as_layers::param_count(&self.#ids))+*
            }

            fn non_trainable_param_count(&self) -> usize {
                #(#as_layers::non_trainable_param_count(&self.#ids))+*
            }

            fn frozen_param_count(&self) -> usize {
                #(#as_layers::frozen_param_count(&self.#ids))+*
            }

            fn begin_step(&mut self, step: u64) {
                #(#as_layers::begin_step(&mut self.#ids, step);)*
            }

            fn end_step(&mut self, applied: bool) -> #mp::Result<()> {
                #(#as_layers::end_step(&mut self.#ids, applied)?;)*
                ::core::result::Result::Ok(())
            }

            fn summary_rows(&self, path: &str, rows: &mut ::std::vec::Vec<#mp::SummaryRow>) {
                #(#as_layers::summary_rows(
                    &self.#ids,
                    &#private::child_path(path, #names),
                    rows,
                );)*
            }
        }

        #[automatically_derived]
        // `forward_f32` and the rest are `Model`'s defaults: conversions to `F32` that the bound
        // makes no-ops.
        #model_header
        where
            #bound
        {
        }

        #residual_rules

        #debug
    }
}

/// The residual rule, checked where the model is defined: under each policy, every
/// `#[residual]` field's layer outputs its input's dtype (so `x + block(x)` needs no cast). One
/// trait per field, so the error names it.
fn residual_rules(model: &Model<'_>, layers: &[Layer<'_>]) -> TokenStream {
    let (_, _, core) = paths();
    let mut out = TokenStream::new();
    for l in layers.iter().filter(|l| l.field.residual) {
        let (field, name) = (&l.field.name, &model.name);
        let rule = format_ident!("__Mp{}_{}_ResidualKeepsItsDtype", name, field);
        let message = format!(
            "the residual block `{field}` of `{name}` outputs `{{Self}}` but takes `{{D}}`: a \
             residual block must output its input's dtype"
        );
        let label = format!("`{field}(x) + x` would add `{{Self}}` to `{{D}}`");
        let note = "end the block with a layer of the block's policy (not a `#[dtype = \
                    \"float32\"]` one), or drop `#[residual]`";
        let span = l.field.ty.span();
        let checks = ["Float32", "MixedFloat16", "MixedBFloat16"].map(|p| {
            let policy = format_ident!("{}", p, span = span);
            let ty = with_policy_marker(l.field.ty, l.field.policy, &policy);
            quote_spanned! {span=>
                check::<<#ty as ::mp_layers::Layer>::Output, ::mp_layers::Input<#ty>>();
            }
        });
        out.extend(quote! {
            #[diagnostic::on_unimplemented(message = #message, label = #label, note = #note)]
            #[doc(hidden)]
            #[allow(non_camel_case_types)]
            pub trait #rule<D> {}

            #[automatically_derived]
            impl<D: #core::DTypeKind> #rule<D> for D {}

            #[automatically_derived]
            const _: () = {
                #[allow(dead_code)]
                fn check<O: #rule<D>, D>() {}
                #[allow(dead_code)]
                fn every_policy() {
                    #(#checks)*
                }
            };
        });
    }
    out
}

/// `ty` under the concrete policy marker `marker` (a field fixed by `#[dtype]` keeps its own).
fn with_policy_marker(ty: &Type, policy: FieldPolicy, marker: &syn::Ident) -> Type {
    match policy {
        FieldPolicy::Fixed(_) => with_policy(ty, policy),
        FieldPolicy::Model => {
            let span = ty.span();
            with_arg(
                ty,
                parse_quote_spanned!(span=> ::mp_layers::__private::mp_core::#marker),
            )
        }
    }
}

/// The body of `forward` or `forward_train`: the model input (the first layer's input dtype)
/// to the first layer, then each layer with its input cast from the previous layer's output
/// dtype (a no-op when the dtypes agree). `layers` is not empty.
fn forward_chain(layers: &[Layer<'_>], borrow: TokenStream, method: TokenStream) -> TokenStream {
    let (_, private, _) = paths();
    let mut out = TokenStream::new();
    for (i, l) in layers.iter().enumerate() {
        let (id, as_layer, compute) = (l.field.ident, &l.as_layer, &l.compute);
        let name = &l.field.name;
        // `#[residual]`: the layer's input `h` is added to its output.
        let skip = l.field.residual.then(|| {
            quote!(let y = #private::residual_add::<#as_layer::Output, #compute>(y, &h, #name)?;)
        });
        out.extend(match i.checked_sub(1) {
            None => quote! {
                let h = x;
                let y = #as_layer::#method(#borrow self.#id, h)?;
                #skip
            },
            Some(p) => {
                let prev_as_layer = &layers[p].as_layer;
                quote! {
                    let h = #private::convert::<#prev_as_layer::Output, #compute>(y)?;
                    let h = &h;
                    let y = #as_layer::#method(#borrow self.#id, h)?;
                    #skip
                }
            }
        });
    }
    out.extend(quote!(::core::result::Result::Ok(y)));
    out
}

/// The body of `forward_train`: as [`forward_chain`], each field through
/// `forward_train_fusing`, which runs a field together with the next one's activation where the
/// layer can (a `BatchNormalization` followed by a ReLU `Activation`: one pass instead of two,
/// no saved output for the ReLU), and the next one then only records that its work was done.
/// Fields on either side of a `#[residual]` field's addition are never fused: the addition
/// needs the first field's own output.
fn forward_train_chain(layers: &[Layer<'_>]) -> TokenStream {
    let (_, private, _) = paths();
    let mut out = TokenStream::new();
    // Whether fields i and i + 1 may fuse.
    let pair = |i: usize| {
        i + 1 < layers.len() && !layers[i].field.residual && !layers[i + 1].field.residual
    };
    for (i, l) in layers.iter().enumerate() {
        let (id, ty, compute) = (l.field.ident, &l.ty, &l.compute);
        let name = &l.field.name;
        let skip = l.field.residual.then(|| {
            let as_layer = &l.as_layer;
            quote!(let y = #private::residual_add::<#as_layer::Output, #compute>(y, &h, #name)?;)
        });
        let absorbed = if i > 0 && pair(i - 1) {
            quote!(__fused)
        } else {
            quote!(false)
        };
        let next = if pair(i) {
            let next_id = layers[i + 1].field.ident;
            quote!(::core::option::Option::Some(&self.#next_id))
        } else {
            quote!(::core::option::Option::None::<&#ty>)
        };
        let input = match i.checked_sub(1) {
            None => quote!(let h = x;),
            Some(p) => {
                let prev_as_layer = &layers[p].as_layer;
                quote! {
                    let h = #private::convert::<#prev_as_layer::Output, #compute>(y)?;
                    let h = &h;
                }
            }
        };
        out.extend(quote! {
            #input
            let (y, __fused) =
                #private::forward_train_fusing(&mut self.#id, #next, h, #absorbed)?;
            #skip
        });
    }
    out.extend(quote!(let _ = __fused; ::core::result::Result::Ok(y)));
    out
}

/// The body of `backward` or `backward_from_softmax_input`: `start(need)` calls the last layer,
/// then the layers run in reverse, each gradient cast to the previous layer's output dtype. The
/// first layer gets the caller's `need_dx`, every other `true` (and must return a gradient);
/// the result is the first layer's input gradient, the model's. `layers` is not empty.
fn backward_chain(layers: &[Layer<'_>], start: impl Fn(TokenStream) -> TokenStream) -> TokenStream {
    let (_, private, _) = paths();
    let mut out = TokenStream::new();
    for (i, l) in layers.iter().enumerate().rev() {
        let (id, name) = (l.field.ident, &l.field.name);
        let (as_layer, compute) = (&l.as_layer, &l.compute);
        let need = if i == 0 {
            quote!(need_dx)
        } else {
            quote!(true)
        };
        let call = if i + 1 == layers.len() {
            start(need)
        } else if l.field.residual {
            // The gradient reaches the input through the block and around it.
            quote! {
                #private::residual_grad::<#compute, #as_layer::Output>(
                    #as_layer::backward(&mut self.#id, &g, true)?,
                    &g,
                    #name,
                )
            }
        } else {
            quote!(#as_layer::backward(&mut self.#id, &g, #need))
        };
        out.extend(quote!(let g = #call?;));
        if let Some(p) = i.checked_sub(1) {
            let prev_as_layer = &layers[p].as_layer;
            out.extend(quote! {
                let g = #private::required_grad(g, #name)?;
                let g = #private::convert::<#compute, #prev_as_layer::Output>(g)?;
            });
        }
    }
    // The model's input is its first layer's, so the gradient needs no cast.
    out.extend(quote!(::core::result::Result::Ok(g)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(args: TokenStream, item: TokenStream) -> String {
        let input: DeriveInput =
            syn::parse2(item.clone()).unwrap_or_else(|e| panic!("{e}: {item}"));
        model(args, &input).to_string()
    }

    #[test]
    fn guide_model() {
        let out = expand_str(
            quote!(),
            quote! {
                pub struct Digits {
                    dense_1: Dense,
                    dense_2: Dense,
                    dense_logits: Dense,
                    #[dtype = "float32"]
                    predictions: Softmax,
                }
            },
        );
        for piece in [
            "pub struct Digits < P : :: mp_layers :: __private :: mp_core :: PolicyKind >",
            "dense_1 : Dense < P >",
            "predictions : Softmax < :: mp_layers :: __private :: mp_core :: Float32 >",
            "pub fn new (dense_1 : Dense < P > , dense_2 : Dense < P > ,",
            "type Output = < Softmax < :: mp_layers :: __private :: mp_core :: Float32 > as \
             :: mp_layers :: Layer > :: Output",
            "build_child :: < Dense < P > > (& mut self . dense_2 , \"dense_2\" , \"dense_1\" , \
             & shape) ?",
            "< Dense < P > as :: mp_layers :: Layer > :: check_input (& self . dense_1 , x)",
            "Output : __MpDigitsOutputMustBeFloat32",
            "impl __MpDigitsOutputMustBeFloat32 for :: mp_layers :: __private :: mp_core :: F32",
        ] {
            assert!(out.contains(piece), "no `{piece}` in\n{out}");
        }
        assert!(!out.contains("compile_error"), "{out}");
        assert!(!out.contains("__mp_policy"), "{out}");
        assert!(!out.contains("# [dtype"), "{out}");
    }

    #[test]
    fn phantom_when_no_field_uses_the_policy() {
        let out = expand_str(
            quote!(),
            quote!(
                struct Head {
                    #[dtype = "bfloat16"]
                    out: Softmax,
                }
            ),
        );
        assert!(
            out.contains("out : Softmax < :: mp_layers :: __private :: mp_core :: MixedBFloat16 >")
        );
        assert!(
            out.contains("__mp_policy : :: core :: marker :: PhantomData < P >"),
            "{out}"
        );
    }

    #[test]
    fn every_error_is_reported() {
        let out = expand_str(
            quote!(float16),
            quote! {
                struct Digits {
                    #[dtype = "half16"]
                    a: Dense,
                    #[dtype = "float32"]
                    #[dtype = "float32"]
                    b: Dense,
                    #[dtype = 3]
                    c: Softmax,
                }
            },
        );
        assert_eq!(out.matches("compile_error").count(), 4, "{out}");
        // Recoverable errors: the full expansion is still there.
        assert!(out.contains("impl < P : :: mp_layers :: __private :: mp_core :: PolicyKind > :: mp_layers :: Layer for Digits < P >"), "{out}");
    }

    #[test]
    fn dtype_on_the_struct_is_an_error() {
        let out = expand_str(
            quote!(),
            quote!(
                #[dtype = "float32"]
                struct Digits {
                    a: Dense,
                }
            ),
        );
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("goes on a field"), "{out}");
        assert!(!out.contains("# [dtype"), "{out}");
    }

    #[test]
    fn fatal_errors_give_a_stub() {
        for item in [
            quote!(
                struct Digits<P> {
                    a: Dense,
                }
            ),
            quote!(
                struct Digits {}
            ),
            quote!(
                struct Digits;
            ),
            quote!(
                struct Digits(Dense);
            ),
            quote!(
                enum Digits {
                    A,
                }
            ),
            quote!(union Digits { a: u32 }),
            quote!(
                struct Digits {
                    a: &'static Dense,
                }
            ),
            quote!(
                struct Digits {
                    a: <X as Y>::Dense,
                }
            ),
            quote!(
                struct Digits {
                    a: [Dense; 2],
                }
            ),
        ] {
            let out = expand_str(quote!(), item);
            assert_eq!(out.matches("compile_error").count(), 1, "{out}");
            assert!(out.contains("__mp_policy"), "{out}");
            assert!(out.contains("unreachable"), "{out}");
        }
    }
}
