//! Dtype policies: which dtype layers compute in, and which dtype their variables are kept in.
//!
//! mp has Keras's three policies. Variables are float32 under every one of them:
//!
//! | policy | compute dtype | variable dtype | default loss scale |
//! |---|---|---|---|
//! | `float32` | float32 | float32 | none |
//! | `mixed_float16` | float16 | float32 | dynamic |
//! | `mixed_bfloat16` | bfloat16 | float32 | none |
//!
//! `float16` and `bfloat16` as whole policies (16-bit variables) are refused: updates to 16-bit
//! weights round away and training stalls, so mp always keeps float32 master weights.
//!
//! Policies exist twice: as the runtime value [`Policy`] (parsed from a string, e.g. a
//! `--policy` flag) and as marker types implementing [`PolicyKind`] ([`Float32`],
//! [`MixedFloat16`], [`MixedBFloat16`]) that layers and models are generic over, so the compute
//! dtype is known to the compiler. [`Policy::dispatch`] turns the one into the other.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::dtype::{BF16, DType, DTypeKind, F16, F32};
use crate::error::{Error, Result};
use crate::loss_scale::{DynamicLossScale, LossScale};

/// A dtype policy, as a runtime value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Compute and variables in float32.
    #[default]
    Float32,
    /// Compute in float16, variables in float32; needs loss scaling.
    MixedFloat16,
    /// Compute in bfloat16, variables in float32; float32's range, so no loss scaling.
    MixedBFloat16,
}

impl Policy {
    /// Every policy, in a fixed order.
    pub const ALL: [Policy; 3] = [Policy::Float32, Policy::MixedFloat16, Policy::MixedBFloat16];

    /// The Keras name: `float32`, `mixed_float16` or `mixed_bfloat16`.
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Float32 => "float32",
            Policy::MixedFloat16 => "mixed_float16",
            Policy::MixedBFloat16 => "mixed_bfloat16",
        }
    }

    /// The dtype layers compute in.
    pub const fn compute_dtype(self) -> DType {
        match self {
            Policy::Float32 => DType::F32,
            Policy::MixedFloat16 => DType::F16,
            Policy::MixedBFloat16 => DType::BF16,
        }
    }

    /// The dtype variables are kept in: float32 under every policy.
    pub const fn variable_dtype(self) -> DType {
        DType::F32
    }

    /// The policy whose compute dtype is `dtype`.
    pub const fn for_compute_dtype(dtype: DType) -> Policy {
        match dtype {
            DType::F32 => Policy::Float32,
            DType::F16 => Policy::MixedFloat16,
            DType::BF16 => Policy::MixedBFloat16,
        }
    }

    /// The loss scale training uses under this policy unless told otherwise (Keras's rule):
    /// dynamic for `mixed_float16`, none otherwise (bfloat16 has float32's range).
    pub fn default_loss_scale(self) -> Option<LossScale> {
        match self {
            Policy::MixedFloat16 => Some(LossScale::Dynamic(DynamicLossScale::default())),
            Policy::Float32 | Policy::MixedBFloat16 => None,
        }
    }

    /// Calls `visitor` with the marker type of this policy: the one place a runtime policy
    /// becomes a type.
    pub fn dispatch<V: PolicyVisitor>(self, visitor: V) -> V::Output {
        match self {
            Policy::Float32 => visitor.visit::<Float32>(),
            Policy::MixedFloat16 => visitor.visit::<MixedFloat16>(),
            Policy::MixedBFloat16 => visitor.visit::<MixedBFloat16>(),
        }
    }
}

impl fmt::Display for Policy {
    /// Prints the bare name (`mixed_float16`); `{:#}` prints it as Keras does,
    /// `<Policy "mixed_float16">`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "<Policy \"{}\">", self.name())
        } else {
            f.write_str(self.name())
        }
    }
}

impl FromStr for Policy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(Policy::Float32),
            "mixed_float16" => Ok(Policy::MixedFloat16),
            "mixed_bfloat16" => Ok(Policy::MixedBFloat16),
            "float16" | "half" => Err(Error::LowPrecisionVariables {
                name: s.to_string(),
                suggestion: "mixed_float16",
            }),
            "bfloat16" => Err(Error::LowPrecisionVariables {
                name: s.to_string(),
                suggestion: "mixed_bfloat16",
            }),
            _ => Err(Error::UnknownPolicy {
                name: s.to_string(),
            }),
        }
    }
}

/// Something generic over a policy marker type, called by [`Policy::dispatch`].
///
/// ```
/// use mp_core::{Policy, PolicyKind, PolicyVisitor, DTypeKind};
///
/// struct ComputeBytes;
/// impl PolicyVisitor for ComputeBytes {
///     type Output = usize;
///     fn visit<P: PolicyKind>(self) -> usize {
///         <P::Compute as DTypeKind>::DTYPE.size_in_bytes()
///     }
/// }
/// assert_eq!(Policy::MixedBFloat16.dispatch(ComputeBytes), 2);
/// ```
pub trait PolicyVisitor {
    /// What the visit returns.
    type Output;
    /// Runs with `P` the marker type of the policy.
    fn visit<P: PolicyKind>(self) -> Self::Output;
}

/// A policy as a type. Layers and models are generic over it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an mp dtype policy",
    note = "use one of `mp_core::Float32`, `mp_core::MixedFloat16`, `mp_core::MixedBFloat16`"
)]
pub trait PolicyKind: Copy + Default + fmt::Debug + Send + Sync + 'static {
    /// The dtype layers compute in.
    type Compute: DTypeKind;
    /// The runtime policy.
    const POLICY: Policy;
}

/// The `float32` policy as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Float32;
/// The `mixed_float16` policy as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MixedFloat16;
/// The `mixed_bfloat16` policy as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MixedBFloat16;

impl PolicyKind for Float32 {
    type Compute = F32;
    const POLICY: Policy = Policy::Float32;
}
impl PolicyKind for MixedFloat16 {
    type Compute = F16;
    const POLICY: Policy = Policy::MixedFloat16;
}
impl PolicyKind for MixedBFloat16 {
    type Compute = BF16;
    const POLICY: Policy = Policy::MixedBFloat16;
}

static GLOBAL_POLICY: AtomicU8 = AtomicU8::new(0);

/// The process-wide default policy (Keras's `global_policy()`); `float32` until set.
///
/// Library code and tests should pass policies explicitly; the global one is a convenience for
/// applications.
pub fn global_policy() -> Policy {
    Policy::ALL[GLOBAL_POLICY.load(Ordering::Acquire) as usize]
}

/// Sets the process-wide default policy (Keras's `set_global_policy`). Thread-safe.
pub fn set_global_policy(policy: Policy) {
    let index = Policy::ALL.iter().position(|&p| p == policy).unwrap_or(0);
    GLOBAL_POLICY.store(index as u8, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_properties() {
        let p: Policy = "mixed_float16".parse().unwrap();
        assert_eq!(p, Policy::MixedFloat16);
        assert_eq!(p.name(), "mixed_float16");
        assert_eq!(p.compute_dtype(), DType::F16);
        assert_eq!(p.variable_dtype(), DType::F32);
        assert_eq!(format!("{p:#}"), "<Policy \"mixed_float16\">");
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
            assert_eq!(p.variable_dtype(), DType::F32);
            assert_eq!(Policy::for_compute_dtype(p.compute_dtype()), p);
        }
        assert_eq!(Policy::MixedBFloat16.compute_dtype(), DType::BF16);
    }

    #[test]
    fn default_loss_scale_follows_keras() {
        match Policy::MixedFloat16.default_loss_scale() {
            Some(LossScale::Dynamic(d)) => assert_eq!(d.scale(), 32768.0),
            other => panic!("expected a dynamic loss scale, got {other:?}"),
        }
        assert!(Policy::Float32.default_loss_scale().is_none());
        assert!(Policy::MixedBFloat16.default_loss_scale().is_none());
    }

    #[test]
    fn unknown_names_are_errors_listing_valid_names() {
        let err = "mixed_float8".parse::<Policy>().unwrap_err().to_string();
        assert!(err.contains("\"mixed_float8\""), "{err}");
        for name in ["float32", "mixed_float16", "mixed_bfloat16"] {
            assert!(err.contains(name), "{err}");
        }
        assert!("".parse::<Policy>().is_err());
        assert!("Mixed_Float16".parse::<Policy>().is_err());
    }

    #[test]
    fn whole_low_precision_policies_point_to_mixed() {
        let err = "float16".parse::<Policy>().unwrap_err().to_string();
        assert!(
            err.contains("mixed_float16") && err.contains("float32"),
            "{err}"
        );
        let err = "bfloat16".parse::<Policy>().unwrap_err().to_string();
        assert!(err.contains("mixed_bfloat16"), "{err}");
    }

    #[test]
    fn dispatch_reaches_the_marker_type() {
        struct Name;
        impl PolicyVisitor for Name {
            type Output = (Policy, DType);
            fn visit<P: PolicyKind>(self) -> Self::Output {
                (P::POLICY, <P::Compute as DTypeKind>::DTYPE)
            }
        }
        for p in Policy::ALL {
            assert_eq!(p.dispatch(Name), (p, p.compute_dtype()));
        }
    }

    #[test]
    fn global_policy_get_set() {
        // The only test that touches the global policy (others pass policies explicitly).
        assert_eq!(global_policy(), Policy::Float32);
        set_global_policy(Policy::MixedBFloat16);
        assert_eq!(global_policy(), Policy::MixedBFloat16);
        let handle = std::thread::spawn(global_policy);
        assert_eq!(handle.join().unwrap(), Policy::MixedBFloat16);
        set_global_policy(Policy::Float32);
        assert_eq!(global_policy(), Policy::Float32);
    }
}
