//! # mp-macros
//!
//! `#[model]`: declares a model as a struct of layers, generates its typed forward and backward
//! code, and rejects a float16 or bfloat16 model output at compile time. Use it through
//! `mp_layers::model`; the generated code names `::mp_layers` only.
//!
//! The crate follows thiserror-impl and serde_derive: `ast.rs` builds a small model of the struct
//! that borrows the `syn` tree (and so keeps every span), `attr.rs` parses `#[dtype = "..."]`,
//! `valid.rs` holds the rules, `ctxt.rs` collects every error (with a drop guard for a forgotten
//! check), `expand.rs` writes the code and `stub.rs` the stand-in emitted when the struct cannot
//! be expanded.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod paths;
mod stub;
mod valid;

use proc_macro::TokenStream;

/// Turns a struct of layers into a model.
///
/// ```
/// use mp_core::{F32, MixedFloat16, Tensor};
/// use mp_layers::{Dense, Layer, Model, Softmax, model};
///
/// #[model]
/// pub struct Digits {
///     dense_1: Dense,            // computes in the model's policy `P`
///     dense_2: Dense,
///     dense_logits: Dense,
///     #[dtype = "float32"]       // float32 whatever the model's policy is
///     predictions: Softmax,
/// }
///
/// let mut model = Digits::<MixedFloat16>::new(
///     Dense::new(64).relu(),
///     Dense::new(64).relu(),
///     Dense::new(10),
///     Softmax::new(),
/// );
/// model.build(&[784])?;
/// let x = Tensor::from_f32(&[2, 784], &[0.5; 2 * 784])?; // float16, the policy's compute dtype
/// let probabilities: Tensor<F32> = model.forward_f32(&x)?;
/// assert_eq!(probabilities.shape(), &[2, 10]);
/// println!("{}", model.summary());
/// # Ok::<(), mp_layers::Error>(())
/// ```
///
/// # What it generates
///
/// - The struct with a policy parameter, `Digits<P: PolicyKind>`. Field types are written
///   without the policy; the macro appends it as the type's last generic argument: `Dense<P>`,
///   or the marker named by the field's `#[dtype = "..."]`. When every field carries
///   `#[dtype]` (so none uses `P`), a hidden `PhantomData<P>` field is added and the struct can
///   only be built with `new`.
/// - `pub fn new(dense_1, dense_2, ...)` taking the layers in declaration order, with the
///   struct's visibility.
/// - `mp_layers::Layer`, so models nest: the layers run in declaration order, each input cast
///   to the layer's compute dtype (a move when it already has it), `build` names each layer after
///   its field and chains the shapes, `backward` runs in reverse with the gradients cast back,
///   and variables and summary rows are named `field/...` (`block/dense_1/kernel` in a nested
///   model). The model's `Output` is its last field's.
/// - `mp_layers::Model` (`summary`, `get_weights`, `fit`, ...) only where the last field's
///   output dtype is float32. Using `Digits<MixedFloat16>` as a `Model` without the
///   `#[dtype = "float32"]` above is a compile error that names the last field and the fix;
///   `Digits<Float32>` is a model either way. A block that ends in float16 is still a `Layer`
///   and can be a field of another model.
/// - `Debug`, printing the policy and each layer's type, unless the struct derives `Debug`.
///
/// # `#[dtype = "..."]`
///
/// Fixes a field's policy whatever the model's: `"float32"`; `"mixed_float16"` or `"float16"`
/// (compute in float16); `"mixed_bfloat16"` or `"bfloat16"` (compute in bfloat16). Variables
/// are float32 under every policy: mp does not train pure float16 or bfloat16 weights.
///
/// # Errors
///
/// Arguments to `#[model(...)]`, generics on the struct (the macro adds the policy parameter),
/// an enum, a union, a tuple struct, a struct without fields, a field type that is not a type
/// path, an unknown dtype name, a `#[dtype]` that is not `#[dtype = "name"]`, and two
/// `#[dtype]` on one field are all reported together, each at the offending tokens.
#[proc_macro_attribute]
pub fn model(args: TokenStream, input: TokenStream) -> TokenStream {
    syn::parse::<syn::DeriveInput>(input)
        .map(|input| expand::model(args.into(), &input))
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
