//! `#[dtype = "..."]`: a field's fixed policy.

use syn::{Attribute, Expr, ExprLit, Lit, LitStr, Meta};

use crate::ctxt::Ctxt;

/// The policy markers a field can be fixed to (mp-core's `Float32`, `MixedFloat16`,
/// `MixedBFloat16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fixed {
    Float32,
    MixedFloat16,
    MixedBFloat16,
}

impl Fixed {
    /// The marker type's name in mp-core.
    pub(crate) fn marker(self) -> &'static str {
        match self {
            Fixed::Float32 => "Float32",
            Fixed::MixedFloat16 => "MixedFloat16",
            Fixed::MixedBFloat16 => "MixedBFloat16",
        }
    }
}

/// A field's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldPolicy {
    /// No `#[dtype]`: the model's policy parameter.
    Model,
    /// `#[dtype = "..."]`.
    Fixed(Fixed),
}

/// The names `#[dtype]` accepts. `float16` and `bfloat16` name the layer's compute dtype; its
/// variables stay float32, so they are the mixed policies.
const NAMES: [(&str, Fixed); 5] = [
    ("float32", Fixed::Float32),
    ("mixed_float16", Fixed::MixedFloat16),
    ("mixed_bfloat16", Fixed::MixedBFloat16),
    ("float16", Fixed::MixedFloat16),
    ("bfloat16", Fixed::MixedBFloat16),
];

/// Other spellings users reach for, and the name they mean.
const ALIASES: [(&str, &str); 9] = [
    ("f32", "float32"),
    ("fp32", "float32"),
    ("float", "float32"),
    ("f16", "float16"),
    ("fp16", "float16"),
    ("half", "float16"),
    ("bf16", "bfloat16"),
    ("mixed_f16", "mixed_float16"),
    ("mixed_bf16", "mixed_bfloat16"),
];

/// The field's policy from its `#[dtype]` attributes. Every problem is recorded in `cx`; a
/// broken attribute still yields a policy (float32, what a fixed dtype is almost always for) so
/// the rest of the expansion adds no errors of its own.
pub(crate) fn field_policy(attrs: &[Attribute], cx: &Ctxt) -> FieldPolicy {
    let mut policy = None;
    for attr in attrs.iter().filter(|a| is_dtype(a)) {
        if policy.is_some() {
            cx.error_spanned(
                attr,
                "duplicate `#[dtype]` attribute: a field has one policy; keep one of them",
            );
            continue;
        }
        policy = Some(parse_dtype(attr, cx).unwrap_or(Fixed::Float32));
    }
    policy.map_or(FieldPolicy::Model, FieldPolicy::Fixed)
}

/// Whether `attrs` mark the field `#[residual]`: its layer's output is added to its input
/// (`y = x + block(x)`). A malformed or repeated attribute is recorded in `cx`.
pub(crate) fn residual(attrs: &[Attribute], cx: &Ctxt) -> bool {
    let mut found = false;
    for attr in attrs.iter().filter(|a| is_residual(a)) {
        if found {
            cx.error_spanned(attr, "duplicate `#[residual]` attribute: keep one");
        } else if !matches!(attr.meta, Meta::Path(_)) {
            cx.error_spanned(
                attr,
                "`#[residual]` takes no arguments: write `#[residual] block: Block`",
            );
        }
        found = true;
    }
    found
}

/// Whether `attr` is `#[residual ...]`.
pub(crate) fn is_residual(attr: &Attribute) -> bool {
    attr.path().is_ident("residual")
}

/// Whether `attr` is `#[dtype ...]`.
pub(crate) fn is_dtype(attr: &Attribute) -> bool {
    attr.path().is_ident("dtype")
}

/// Whether the struct's attributes derive `Debug` (then the macro does not implement it).
pub(crate) fn derives_debug(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .any(|a| {
            let mut found = false;
            // A derive list that does not parse is rustc's to report; it is not ours.
            let _ = a.parse_nested_meta(|meta| {
                found |= meta
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "Debug");
                Ok(())
            });
            found
        })
}

fn parse_dtype(attr: &Attribute, cx: &Ctxt) -> Option<Fixed> {
    const USAGE: &str = "expected `#[dtype = \"float32\"]` (or \"mixed_float16\", \
                         \"mixed_bfloat16\", \"float16\", \"bfloat16\")";
    match &attr.meta {
        Meta::NameValue(nv) => match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) => parse_name(s, cx),
            other => {
                let hint = match other {
                    Expr::Path(p) => p
                        .path
                        .get_ident()
                        .map(|i| format!(": `#[dtype = \"{i}\"]`")),
                    _ => None,
                };
                let msg = format!(
                    "the dtype must be a string literal{}",
                    hint.unwrap_or_else(|| format!("; {USAGE}"))
                );
                cx.error_spanned(other, msg);
                None
            }
        },
        Meta::List(list) => {
            let hint = list
                .parse_args::<syn::Ident>()
                .map(|i| i.to_string())
                .or_else(|_| list.parse_args::<LitStr>().map(|s| s.value()))
                .map(|name| format!("write `#[dtype = \"{name}\"]`"))
                .unwrap_or_else(|_| USAGE.to_string());
            cx.error_spanned(
                attr,
                format!("`#[dtype(...)]` is not the attribute's form; {hint}"),
            );
            None
        }
        Meta::Path(_) => {
            cx.error_spanned(attr, format!("`#[dtype]` needs a dtype name; {USAGE}"));
            None
        }
    }
}

fn parse_name(lit: &LitStr, cx: &Ctxt) -> Option<Fixed> {
    let name = lit.value();
    if let Some((_, fixed)) = NAMES.iter().find(|(n, _)| *n == name) {
        return Some(*fixed);
    }
    let valid: Vec<String> = NAMES.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    let mut msg = format!(
        "unknown dtype \"{name}\"; expected one of {}",
        valid.join(", ")
    );
    if let Some(guess) = suggest(&name) {
        msg.push_str(&format!(" (did you mean \"{guess}\"?)"));
    }
    cx.error_spanned(lit, msg);
    None
}

/// The name a misspelt dtype most likely meant: a known alias, a case difference, or the one
/// name within two edits (a transposition counting as one).
fn suggest(name: &str) -> Option<&'static str> {
    let lower = name.trim().to_ascii_lowercase().replace('-', "_");
    if let Some((_, n)) = ALIASES.iter().find(|(a, _)| *a == lower) {
        return Some(n);
    }
    let mut best: Option<(usize, &'static str)> = None;
    let mut tie = false;
    for (n, _) in NAMES {
        let d = distance(&lower, n);
        match best {
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tie = true,
            _ => {
                best = Some((d, n));
                tie = false;
            }
        }
    }
    match best {
        Some((d, n)) if d <= 2 && !tie => Some(n),
        _ => None,
    }
}

/// Optimal string alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions each cost one.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * w + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut v = (d[(i - 1) * w + j] + 1)
                    .min(d[i * w + j - 1] + 1)
                    .min(d[(i - 1) * w + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    v = v.min(d[(i - 2) * w + j - 2] + 1);
                }
                v
            };
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("float23"), Some("float32"));
        assert_eq!(suggest("Float32"), Some("float32"));
        assert_eq!(suggest("fp16"), Some("float16"));
        assert_eq!(suggest("bf16"), Some("bfloat16"));
        assert_eq!(suggest("mixed_float61"), Some("mixed_float16"));
        assert_eq!(suggest("int8"), None);
    }

    #[test]
    fn distances() {
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("float16", "float32"), 2);
    }
}
