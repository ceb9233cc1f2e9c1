//! The expansion when the struct cannot be a model: one error, not a cascade.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

use crate::paths::paths;

/// The expansion when the struct cannot be a model: the struct's name with the policy
/// parameter, and `Layer` and `Model` implementations that are never run (the crate does not
/// compile), so code using the model reports nothing more.
pub(crate) fn stub(input: &DeriveInput) -> TokenStream {
    let (mp, _, core) = paths();
    let (ident, vis) = (&input.ident, &input.vis);
    let docs = input.attrs.iter().filter(|a| a.path().is_ident("doc"));
    let unreachable = quote!(::core::unreachable!("`#[model]` reported an error"));
    quote! {
        #(#docs)*
        #vis struct #ident<P: #core::PolicyKind> {
            __mp_policy: ::core::marker::PhantomData<P>,
        }

        #[automatically_derived]
        impl<P: #core::PolicyKind> #mp::Layer for #ident<P> {
            type Policy = P;
            type Input = <P as #core::PolicyKind>::Compute;
            type Output = #core::F32;
            fn type_name(&self) -> &'static str { #unreachable }
            fn name(&self) -> &str { #unreachable }
            fn set_name(&mut self, _: &str) { #unreachable }
            fn build(&mut self, _: &[usize]) -> #mp::Result<::std::vec::Vec<usize>> { #unreachable }
            fn output_shape(&self) -> ::core::option::Option<&[usize]> { #unreachable }
            fn forward(
                &self,
                _: &#core::Tensor<#mp::Compute<Self>>,
            ) -> #mp::Result<#core::Tensor<#core::F32>> {
                #unreachable
            }
            fn forward_train(
                &mut self,
                _: &#core::Tensor<#mp::Compute<Self>>,
            ) -> #mp::Result<#core::Tensor<#core::F32>> {
                #unreachable
            }
            fn backward(
                &mut self,
                _: &#core::Tensor<#core::F32>,
                _: bool,
            ) -> #mp::Result<::core::option::Option<#core::Tensor<#mp::Compute<Self>>>> {
                #unreachable
            }
            fn visit_variables(
                &mut self,
                _: &str,
                _: &mut dyn ::core::ops::FnMut(&str, &mut #core::Variable) -> #mp::Result<()>,
            ) -> #mp::Result<()> {
                #unreachable
            }
            fn saved_bytes(&self) -> usize { #unreachable }
            fn param_count(&self) -> usize { #unreachable }
        }

        #[automatically_derived]
        impl<P: #core::PolicyKind> #mp::Model for #ident<P> {
            fn forward_f32(
                &self,
                _: &#core::Tensor<#mp::Compute<Self>>,
            ) -> #mp::Result<#core::Tensor<#core::F32>> {
                #unreachable
            }
            fn forward_train_f32(
                &mut self,
                _: &#core::Tensor<#mp::Compute<Self>>,
            ) -> #mp::Result<#core::Tensor<#core::F32>> {
                #unreachable
            }
            fn backward_f32(&mut self, _: &#core::Tensor<#core::F32>) -> #mp::Result<()> {
                #unreachable
            }
        }
    }
}
