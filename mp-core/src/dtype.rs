//! Floating-point dtypes: the runtime [`DType`], the element types and the marker types.
//!
//! mp computes in three dtypes. `float32` is [`f32`]; `float16` (IEEE binary16) and `bfloat16`
//! (the top half of a float32) are [`half::f16`] and [`half::bf16`]. Conversions from wider types
//! round to nearest, ties to even, and keep NaN and infinities (what `half` does).
//!
//! A tensor's dtype is a type parameter ([`crate::Tensor<D>`] with `D` one of [`F32`], [`F16`],
//! [`BF16`]), so kernels cannot be handed mixed dtypes by mistake and the compiler can prove that a
//! model's output is float32.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// The runtime name of a floating-point dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16: 5 exponent bits, 10 mantissa bits.
    F16,
    /// bfloat16: 8 exponent bits (float32's range), 7 mantissa bits.
    BF16,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// The name Keras and mp use: `float32`, `float16`, `bfloat16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether this is a 16-bit dtype.
    pub const fn is_low_precision(self) -> bool {
        !matches!(self, DType::F32)
    }

    /// The numeric facts of this dtype.
    pub fn info(self) -> FloatInfo {
        match self {
            DType::F32 => FloatInfo {
                max: f32::MAX as f64,
                min_positive_normal: f32::MIN_POSITIVE as f64,
                min_positive_subnormal: f32::from_bits(1) as f64,
                epsilon: f32::EPSILON as f64,
                mantissa_bits: 23,
            },
            DType::F16 => FloatInfo {
                max: f16::MAX.to_f64(),
                min_positive_normal: f16::MIN_POSITIVE.to_f64(),
                min_positive_subnormal: f16::MIN_POSITIVE_SUBNORMAL.to_f64(),
                epsilon: f16::EPSILON.to_f64(),
                mantissa_bits: 10,
            },
            DType::BF16 => FloatInfo {
                max: bf16::MAX.to_f64(),
                min_positive_normal: bf16::MIN_POSITIVE.to_f64(),
                min_positive_subnormal: bf16::MIN_POSITIVE_SUBNORMAL.to_f64(),
                epsilon: bf16::EPSILON.to_f64(),
                mantissa_bits: 7,
            },
        }
    }

    /// The largest relative error of rounding one value to this dtype (half an ulp:
    /// `2^-(mantissa_bits + 1)`), for values in the normal range.
    pub fn unit_roundoff(self) -> f64 {
        self.info().epsilon / 2.0
    }

    /// Rounds `x` to this dtype and back (round to nearest even; NaN and infinities kept).
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// Numeric facts of a floating-point dtype, as `f64` so every dtype's values are exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloatInfo {
    /// The largest finite value.
    pub max: f64,
    /// The smallest positive normal value.
    pub min_positive_normal: f64,
    /// The smallest positive subnormal value.
    pub min_positive_subnormal: f64,
    /// The distance from 1.0 to the next larger value.
    pub epsilon: f64,
    /// Explicit mantissa bits.
    pub mantissa_bits: u32,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Parses `float32`, `float16` or `bfloat16`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(DType::F32),
            "float16" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::UnknownDType {
                name: s.to_string(),
            }),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for super::F32 {}
    impl Sealed for super::F16 {}
    impl Sealed for super::BF16 {}
}

/// The bound element types need for device storage: `cudarc::driver::DeviceRepr` with the `cuda`
/// feature, nothing without it.
#[cfg(feature = "cuda")]
pub trait DeviceElement: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceElement for T {}

/// The bound element types need for device storage: `cudarc::driver::DeviceRepr` with the `cuda`
/// feature, nothing without it.
#[cfg(not(feature = "cuda"))]
pub trait DeviceElement {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElement for T {}

/// An element type: `f32`, `half::f16` or `half::bf16`.
///
/// Conversions round to nearest, ties to even, and keep NaN and infinities.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + PartialEq
    + PartialOrd
    + fmt::Debug
    + fmt::Display
    + Send
    + Sync
    + DeviceElement
    + 'static
{
    /// The runtime dtype of this element type.
    const DTYPE: DType;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Rounds an `f32` to this type.
    fn from_f32(x: f32) -> Self;
    /// Widens to `f32` (exact).
    fn to_f32(self) -> f32;
    /// Rounds an `f64` to this type (one rounding, not two).
    fn from_f64(x: f64) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const ZERO: Self = f16::ZERO;
    const ONE: Self = f16::ONE;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_f32(f64_to_f32_round_to_odd(x))
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const ZERO: Self = bf16::ZERO;
    const ONE: Self = bf16::ONE;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_to_odd(x))
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
}

/// Rounds `x` to float32 *to odd* (truncate, then set the last bit if anything was lost).
///
/// Rounding the result once more to a format with at least two fewer mantissa bits (float16,
/// bfloat16) then gives the correctly rounded value of `x`: the intermediate keeps enough
/// information to break ties right, which plain double rounding through float32 does not.
fn f64_to_f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !x.is_finite() || nearest as f64 == x || nearest.is_infinite() {
        return nearest;
    }
    // Step toward zero if rounding went away from zero, then mark the result inexact.
    let mut bits = nearest.to_bits();
    if (nearest as f64).abs() > x.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// A dtype as a type: the marker types [`F32`], [`F16`] and [`BF16`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an mp dtype marker",
    note = "use one of `mp_core::F32`, `mp_core::F16`, `mp_core::BF16`"
)]
pub trait DTypeKind:
    sealed::Sealed + Copy + Default + fmt::Debug + PartialEq + Eq + Send + Sync + 'static
{
    /// The element type.
    type Elem: Element;
    /// The runtime dtype.
    const DTYPE: DType;
}

/// The float32 dtype as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct F32;
/// The float16 dtype as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct F16;
/// The bfloat16 dtype as a type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BF16;

impl DTypeKind for F32 {
    type Elem = f32;
    const DTYPE: DType = DType::F32;
}
impl DTypeKind for F16 {
    type Elem = f16;
    const DTYPE: DType = DType::F16;
}
impl DTypeKind for BF16 {
    type Elem = bf16;
    const DTYPE: DType = DType::BF16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(DType::F32.size_in_bytes(), 4);
        assert_eq!(DType::F16.size_in_bytes(), 2);
        assert_eq!(DType::BF16.size_in_bytes(), 2);
    }

    #[test]
    fn unknown_dtype_lists_valid_names() {
        let err = "float64".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("float64"), "{err}");
        assert!(err.contains("float32") && err.contains("float16") && err.contains("bfloat16"));
    }

    #[test]
    fn numeric_facts() {
        let h = DType::F16.info();
        assert_eq!(h.max, 65504.0);
        assert_eq!(h.min_positive_normal, 2f64.powi(-14));
        assert_eq!(h.min_positive_subnormal, 2f64.powi(-24));
        assert_eq!(h.epsilon, 2f64.powi(-10));
        let b = DType::BF16.info();
        assert_eq!(b.min_positive_normal, 2f64.powi(-126));
        assert_eq!(b.min_positive_subnormal, 2f64.powi(-133));
        assert_eq!(b.epsilon, 2f64.powi(-7));
        assert_eq!(b.max, (2.0 - 2f64.powi(-7)) * 2f64.powi(127));
        let s = DType::F32.info();
        assert_eq!(s.epsilon, 2f64.powi(-23));
        assert_eq!(s.min_positive_subnormal, 2f64.powi(-149));
    }

    /// The guide's examples: 256² overflows in float16, (1e-5)² underflows in float16.
    #[test]
    fn guide_overflow_and_underflow() {
        let sq16 = |x: f32| f16::from_f32(x) * f16::from_f32(x);
        assert!(sq16(256.0).is_infinite());
        assert_eq!(sq16(1e-5).to_f32(), 0.0);
        let sqb = |x: f32| bf16::from_f32(x).to_f32() * bf16::from_f32(x).to_f32();
        assert_eq!(bf16::from_f32(sqb(256.0)).to_f32(), 65536.0);
        assert!(bf16::from_f32(sqb(1e-5)).to_f32() > 0.0);
        let (big, small) = (std::hint::black_box(256f32), std::hint::black_box(1e-5f32));
        assert_eq!(big * big, 65536.0);
        assert!(small * small > 0.0);
    }

    #[test]
    fn conversions_round_to_nearest_even_and_keep_specials() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10 in float16: ties to even gives 1.
        assert_eq!(f16::from_f32(1.0 + 2f32.powi(-11)).to_f32(), 1.0);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to even gives 1 + 2^-9.
        assert_eq!(
            f16::from_f32(1.0 + 3.0 * 2f32.powi(-11)).to_f32(),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
        assert_eq!(
            bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_f32(),
            1.0 + 2f32.powi(-6)
        );
        for d in DType::ALL {
            assert!(d.round_f32(f32::NAN).is_nan());
            assert_eq!(d.round_f32(f32::INFINITY), f32::INFINITY);
            assert_eq!(d.round_f32(f32::NEG_INFINITY), f32::NEG_INFINITY);
        }
        assert!(<bf16 as Element>::from_f32(f32::NAN).to_f32().is_nan());
        // One rounding from float64: just above a float16 tie rounds up, although the value
        // rounded to float32 first would sit exactly on the tie and round to even (down).
        let above_tie = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(
            <f16 as Element>::from_f64(above_tie).to_f64(),
            1.0 + 2f64.powi(-10)
        );
        assert_eq!(
            <f16 as Element>::from_f64(-above_tie).to_f64(),
            -(1.0 + 2f64.powi(-10))
        );
        assert_eq!(
            <f16 as Element>::from_f64(1.0 + 2f64.powi(-11)).to_f64(),
            1.0
        );
        let above_tie = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(
            <bf16 as Element>::from_f64(above_tie).to_f64(),
            1.0 + 2f64.powi(-7)
        );
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(
            <f16 as Element>::from_f64(f64::NEG_INFINITY).to_f64(),
            f64::NEG_INFINITY
        );
        assert!(<f16 as Element>::from_f64(1e6).to_f32().is_infinite());
    }
}
