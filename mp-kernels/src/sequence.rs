//! Kernels over token sequences `[batch, seq, features]`: embedding lookup and its gradient, a
//! learned table added to every sample (positional embeddings), a token prepended to every
//! sample (a class token), and pooling over the tokens (the first token, or their mean).
//!
//! Tables, tokens and their gradients are float32; activations are any [`Element`]; all
//! arithmetic is float32 and a value written in the compute dtype is rounded once. Gradients
//! are summed over samples in sample order, so results do not depend on the thread count.
//!
//! ```
//! use mp_kernels::sequence::{embedding, embedding_backward};
//!
//! // A vocabulary of 3 tokens of width 2; look up tokens 2 and 0.
//! let table = [0.0f32, 0.5, 1.0, 1.5, 2.0, 2.5];
//! let mut y = [0.0f32; 4];
//! embedding(&[2.0, 0.0], &table, 3, 2, &mut y)?;
//! assert_eq!(y, [2.0, 2.5, 0.0, 0.5]);
//! let mut grad = [0.0f32; 6];
//! embedding_backward(&[2.0, 2.0], &[1.0f32, 1.0, 1.0, 1.0], 3, 2, &mut grad)?;
//! assert_eq!(grad, [0.0, 0.0, 0.0, 0.0, 2.0, 2.0]);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::error::{Error, Result, check_len};

/// The row of token id `id` (a float32 holding an integer) in a table of `vocab` rows, or an
/// error naming the id and where it is.
fn token_row(op: &'static str, id: f32, at: usize, vocab: usize) -> Result<usize> {
    if id >= 0.0 && id.fract() == 0.0 && (id as usize) < vocab {
        Ok(id as usize)
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!(
                "token id {id} at position {at} is not an integer in [0, {vocab}) (the \
                 vocabulary size is {vocab})"
            ),
        })
    }
}

/// Checks every id before anything is written.
///
/// # Errors
/// The first id that is not an integer in `[0, vocab)`, with its position.
pub fn check_ids(op: &'static str, ids: &[f32], vocab: usize) -> Result<()> {
    for (at, &id) in ids.iter().enumerate() {
        token_row(op, id, at, vocab)?;
    }
    Ok(())
}

/// `out[r] = table[ids[r]]` rounded to `T`, for a `[vocab, dim]` table.
///
/// # Errors
/// Slices of the wrong length; an id that is not an integer in `[0, vocab)`.
pub fn embedding<T: Element>(
    ids: &[f32],
    table: &[f32],
    vocab: usize,
    dim: usize,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "embedding";
    check_len(OP, "table", table.len(), vocab * dim)?;
    check_len(OP, "out", out.len(), ids.len() * dim)?;
    check_ids(OP, ids, vocab)?;
    for (o, &id) in out.chunks_exact_mut(dim.max(1)).zip(ids) {
        let r = id as usize;
        for (o, &t) in o.iter_mut().zip(&table[r * dim..(r + 1) * dim]) {
            *o = T::from_f32(t);
        }
    }
    Ok(())
}

/// `grad[ids[r]] += dy[r]` in float32, rows in order.
///
/// # Errors
/// As [`embedding`].
pub fn embedding_backward<T: Element>(
    ids: &[f32],
    dy: &[T],
    vocab: usize,
    dim: usize,
    grad: &mut [f32],
) -> Result<()> {
    const OP: &str = "embedding_backward";
    check_len(OP, "grad", grad.len(), vocab * dim)?;
    check_len(OP, "dy", dy.len(), ids.len() * dim)?;
    check_ids(OP, ids, vocab)?;
    for (g, &id) in dy.chunks_exact(dim.max(1)).zip(ids) {
        let r = id as usize;
        for (o, x) in grad[r * dim..(r + 1) * dim].iter_mut().zip(g) {
            *o += x.to_f32();
        }
    }
    Ok(())
}

/// `out[n] = x[n] + table` for every sample `n` (each `table.len()` long), in float32, rounded
/// once: learned positional embeddings added to `[batch, seq, dim]`.
///
/// # Errors
/// `x` not a whole number of samples, `out` of another length.
pub fn add_table<T: Element>(x: &[T], table: &[f32], out: &mut [T]) -> Result<()> {
    const OP: &str = "add_table";
    check_len(OP, "out", out.len(), x.len())?;
    if table.is_empty() || !x.len().is_multiple_of(table.len()) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "{} input elements are not a whole number of samples of {}",
                x.len(),
                table.len()
            ),
        });
    }
    for (o, x) in out
        .chunks_exact_mut(table.len())
        .zip(x.chunks_exact(table.len()))
    {
        for ((o, x), t) in o.iter_mut().zip(x).zip(table) {
            *o = T::from_f32(x.to_f32() + t);
        }
    }
    Ok(())
}

/// `grad += sum over samples of dy`, in float32, samples in order (the gradient of
/// [`add_table`]'s table).
///
/// # Errors
/// As [`add_table`].
pub fn add_table_backward<T: Element>(dy: &[T], grad: &mut [f32]) -> Result<()> {
    const OP: &str = "add_table_backward";
    if grad.is_empty() || !dy.len().is_multiple_of(grad.len()) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "{} gradient elements are not a whole number of samples of {}",
                dy.len(),
                grad.len()
            ),
        });
    }
    let n = grad.len();
    let mut acc = vec![0.0f32; n];
    for d in dy.chunks_exact(n) {
        for (a, x) in acc.iter_mut().zip(d) {
            *a += x.to_f32();
        }
    }
    for (g, a) in grad.iter_mut().zip(&acc) {
        *g += a;
    }
    Ok(())
}

/// `[batch, seq, dim]` to `[batch, seq + 1, dim]` with `token` (`dim`, float32) first in every
/// sample.
///
/// # Errors
/// Slices of the wrong length.
pub fn prepend_token<T: Element>(
    x: &[T],
    token: &[f32],
    batch: usize,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "prepend_token";
    let dim = token.len();
    if batch == 0 || dim == 0 || !x.len().is_multiple_of(batch * dim) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "{} input elements are not {batch} samples of tokens of {dim}",
                x.len()
            ),
        });
    }
    let per = x.len() / batch;
    check_len(OP, "out", out.len(), x.len() + batch * dim)?;
    for (o, x) in out.chunks_exact_mut(per + dim).zip(x.chunks_exact(per)) {
        for (o, &t) in o[..dim].iter_mut().zip(token) {
            *o = T::from_f32(t);
        }
        o[dim..].copy_from_slice(x);
    }
    Ok(())
}

/// The gradient of [`prepend_token`]: `dx` is `dy` without each sample's first token, and the
/// first tokens are summed (samples in order) into `grad` (`dim`).
///
/// # Errors
/// Slices of the wrong length.
pub fn prepend_token_backward<T: Element>(
    dy: &[T],
    batch: usize,
    grad: &mut [f32],
    dx: &mut [T],
) -> Result<()> {
    const OP: &str = "prepend_token_backward";
    let dim = grad.len();
    if batch == 0 || dim == 0 || !dy.len().is_multiple_of(batch) || dy.len() / batch < dim {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "{} gradient elements are not {batch} samples with a token of {dim}",
                dy.len()
            ),
        });
    }
    let per = dy.len() / batch;
    check_len(OP, "dx", dx.len(), dy.len() - batch * dim)?;
    let mut acc = vec![0.0f32; dim];
    for (d, g) in dx.chunks_exact_mut(per - dim).zip(dy.chunks_exact(per)) {
        for (a, x) in acc.iter_mut().zip(&g[..dim]) {
            *a += x.to_f32();
        }
        d.copy_from_slice(&g[dim..]);
    }
    for (g, a) in grad.iter_mut().zip(&acc) {
        *g += a;
    }
    Ok(())
}

/// How a sequence `[batch, seq, dim]` pools to `[batch, dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    /// The first token (a class token).
    First,
    /// The mean over the tokens (Keras's `GlobalAveragePooling1D`).
    Mean,
}

/// Pools `[batch, seq, dim]` to `[batch, dim]`, in float32, rounded once.
///
/// # Errors
/// Slices of the wrong length, an empty sequence.
pub fn pool<T: Element>(
    how: Pool,
    x: &[T],
    batch: usize,
    seq: usize,
    dim: usize,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "sequence_pool";
    if seq == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: "cannot pool an empty sequence".into(),
        });
    }
    check_len(OP, "x", x.len(), batch * seq * dim)?;
    check_len(OP, "out", out.len(), batch * dim)?;
    for (o, x) in out
        .chunks_exact_mut(dim.max(1))
        .zip(x.chunks_exact((seq * dim).max(1)))
    {
        match how {
            Pool::First => o.copy_from_slice(&x[..dim]),
            Pool::Mean => {
                let inv = 1.0 / seq as f32;
                for (c, o) in o.iter_mut().enumerate() {
                    let mut sum = 0.0f32;
                    for t in 0..seq {
                        sum += x[t * dim + c].to_f32();
                    }
                    *o = T::from_f32(sum * inv);
                }
            }
        }
    }
    Ok(())
}

/// The gradient of [`pool`]: `[batch, dim]` back to `[batch, seq, dim]` (zeros but the first
/// token for [`Pool::First`]; `dy / seq` on every token for [`Pool::Mean`]).
///
/// # Errors
/// As [`pool`].
pub fn pool_backward<T: Element>(
    how: Pool,
    dy: &[T],
    batch: usize,
    seq: usize,
    dim: usize,
    dx: &mut [T],
) -> Result<()> {
    const OP: &str = "sequence_pool_backward";
    if seq == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: "cannot pool an empty sequence".into(),
        });
    }
    check_len(OP, "dy", dy.len(), batch * dim)?;
    check_len(OP, "dx", dx.len(), batch * seq * dim)?;
    let zero = T::from_f32(0.0);
    let inv = 1.0 / seq as f32;
    for (d, g) in dx
        .chunks_exact_mut((seq * dim).max(1))
        .zip(dy.chunks_exact(dim.max(1)))
    {
        match how {
            Pool::First => {
                d.fill(zero);
                d[..dim].copy_from_slice(g);
            }
            Pool::Mean => {
                let g: Vec<T> = g.iter().map(|x| T::from_f32(x.to_f32() * inv)).collect();
                for t in d.chunks_exact_mut(dim.max(1)) {
                    t.copy_from_slice(&g);
                }
            }
        }
    }
    Ok(())
}
