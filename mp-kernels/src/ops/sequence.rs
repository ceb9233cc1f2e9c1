//! Ops over token sequences and attention: embedding lookup, learned tables added per sample,
//! a prepended class token, pooling over tokens, and scaled dot-product attention
//! ([`crate::sequence`], [`crate::attention`]). CPU kernels only so far: on a CUDA device each
//! is an error naming the op.

use mp_core::{DTypeKind, Device, F32, Tensor};

use super::{device, for_overwrite, nb, on_cpu, same_shape};
use crate::attention::Attention;
use crate::error::{Error, Result};
use crate::profile::{self, OpClass};
use crate::sequence::Pool;

/// `[batch, seq, dim]` of a sequence tensor, or an error naming `op`.
fn seq_dims(op: &'static str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [b, s, d] => Ok((b, s, d)),
        _ => Err(Error::InvalidArgument {
            op,
            what: format!("expected a sequence [batch, tokens, features], got shape {shape:?}"),
        }),
    }
}

/// The rows of `table` (`[vocab, dim]`, float32) at the integer token ids `ids` (float32, any
/// shape), as `ids.shape() + [dim]` in dtype `D`.
///
/// # Errors
/// A table that is not `[vocab, dim]`; an id that is not an integer in `[0, vocab)` (naming it
/// and its position); `WrongDevice`; on CUDA, no kernel yet.
pub fn embedding<D: DTypeKind>(ids: &Tensor<F32>, table: &Tensor<F32>) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "embedding";
    let &[vocab, dim] = table.shape() else {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "the table must be [vocab, dim], got shape {:?}",
                table.shape()
            ),
        });
    };
    let dev = device(OP, &[ids.device(), table.device()])?;
    on_cpu(OP, dev)?;
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let mut y = for_overwrite::<D>(&shape, dev)?;
    crate::sequence::embedding(
        ids.as_slice()?,
        table.as_slice()?,
        vocab,
        dim,
        y.as_mut_slice()?,
    )?;
    Ok(y)
}

/// The gradient of [`embedding`]: adds each row of `dy` (`ids.shape() + [dim]`) into the row of
/// `grad` (`[vocab, dim]`) its id selects, in float32.
///
/// # Errors
/// As [`embedding`]; `dy` of another shape.
pub fn embedding_backward<D: DTypeKind>(
    ids: &Tensor<F32>,
    dy: &Tensor<D>,
    grad: &mut Tensor<F32>,
) -> Result<()> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "embedding_backward";
    let &[vocab, dim] = grad.shape() else {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "the gradient must be [vocab, dim], got shape {:?}",
                grad.shape()
            ),
        });
    };
    let mut want = ids.shape().to_vec();
    want.push(dim);
    same_shape(OP, "dy", &want, dy.shape())?;
    let dev = device(OP, &[ids.device(), dy.device(), grad.device()])?;
    on_cpu(OP, dev)?;
    crate::sequence::embedding_backward(
        ids.as_slice()?,
        dy.as_slice()?,
        vocab,
        dim,
        grad.as_mut_slice()?,
    )?;
    Ok(())
}

/// How many elements of `table` (`[rows, ...]`) one sample of `x` (`[batch, seq, ...]`, `seq
/// <= rows`, the rest equal) uses: its first `seq` rows.
fn table_prefix(op: &'static str, sample: &[usize], table: &[usize]) -> Result<usize> {
    match (sample.split_first(), table.split_first()) {
        (Some((&seq, rest)), Some((&rows, trest))) if rest == trest && seq <= rows => {
            Ok(sample.iter().product())
        }
        _ => Err(Error::InvalidArgument {
            op,
            what: format!(
                "samples of shape {sample:?} do not fit a table of shape {table:?} (a sample may \
                 have at most as many rows as the table, each of the table's width)"
            ),
        }),
    }
}

/// `x + table[..seq]` for every sample, where `table` (float32, `[rows, ...]`) has at least as
/// many rows as a sample of `x` (`[batch, seq, ...]`) and the same width: learned positional
/// embeddings, the first `seq` positions.
///
/// # Errors
/// A table that does not fit; `WrongDevice`; on CUDA, no kernel yet.
pub fn add_table<D: DTypeKind>(x: &Tensor<D>, table: &Tensor<F32>) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "add_table";
    let used = table_prefix(OP, x.shape().get(1..).unwrap_or(&[]), table.shape())?;
    let dev = device(OP, &[x.device(), table.device()])?;
    on_cpu(OP, dev)?;
    let mut y = for_overwrite::<D>(x.shape(), dev)?;
    crate::sequence::add_table(x.as_slice()?, &table.as_slice()?[..used], y.as_mut_slice()?)?;
    Ok(y)
}

/// The table's gradient of [`add_table`]: `grad[..seq] += sum over samples of dy`.
///
/// # Errors
/// As [`add_table`].
pub fn add_table_backward<D: DTypeKind>(dy: &Tensor<D>, grad: &mut Tensor<F32>) -> Result<()> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "add_table_backward";
    let used = table_prefix(OP, dy.shape().get(1..).unwrap_or(&[]), grad.shape())?;
    let dev = device(OP, &[dy.device(), grad.device()])?;
    on_cpu(OP, dev)?;
    crate::sequence::add_table_backward(dy.as_slice()?, &mut grad.as_mut_slice()?[..used])
}

/// `[batch, seq, dim]` to `[batch, seq + 1, dim]` with `token` (`[dim]`, float32) first.
///
/// # Errors
/// A token of another width; `WrongDevice`; on CUDA, no kernel yet.
pub fn prepend_token<D: DTypeKind>(x: &Tensor<D>, token: &Tensor<F32>) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "prepend_token";
    let (b, s, d) = seq_dims(OP, x.shape())?;
    same_shape(OP, "token", &[d], token.shape())?;
    let dev = device(OP, &[x.device(), token.device()])?;
    on_cpu(OP, dev)?;
    let mut y = for_overwrite::<D>(&[b, s + 1, d], dev)?;
    if b > 0 {
        crate::sequence::prepend_token(x.as_slice()?, token.as_slice()?, b, y.as_mut_slice()?)?;
    }
    Ok(y)
}

/// The gradient of [`prepend_token`]: adds the first token's gradient (summed over samples)
/// into `grad` and returns the rest, `[batch, seq, dim]`.
///
/// # Errors
/// `dy` not a sequence of at least one token of `grad`'s width; `WrongDevice`; on CUDA, no
/// kernel yet.
pub fn prepend_token_backward<D: DTypeKind>(
    dy: &Tensor<D>,
    grad: &mut Tensor<F32>,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "prepend_token_backward";
    let (b, s, d) = seq_dims(OP, dy.shape())?;
    same_shape(OP, "grad", &[d], grad.shape())?;
    if s == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: "the gradient has no token to take the class token's from".into(),
        });
    }
    let dev = device(OP, &[dy.device(), grad.device()])?;
    on_cpu(OP, dev)?;
    let mut dx = for_overwrite::<D>(&[b, s - 1, d], dev)?;
    if b > 0 {
        crate::sequence::prepend_token_backward(
            dy.as_slice()?,
            b,
            grad.as_mut_slice()?,
            dx.as_mut_slice()?,
        )?;
    }
    Ok(dx)
}

/// Pools `[batch, seq, dim]` to `[batch, dim]` ([`Pool::First`] or [`Pool::Mean`]).
///
/// # Errors
/// Not a sequence, or an empty one; on CUDA, no kernel yet.
pub fn sequence_pool<D: DTypeKind>(how: Pool, x: &Tensor<D>) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "sequence_pool";
    let (b, s, d) = seq_dims(OP, x.shape())?;
    on_cpu(OP, x.device())?;
    let mut y = for_overwrite::<D>(&[b, d], x.device())?;
    crate::sequence::pool(how, x.as_slice()?, b, s, d, y.as_mut_slice()?)?;
    Ok(y)
}

/// The gradient of [`sequence_pool`] over sequences of `seq` tokens: `[batch, dim]` back to
/// `[batch, seq, dim]`.
///
/// # Errors
/// `dy` not `[batch, dim]`, `seq` 0; on CUDA, no kernel yet.
pub fn sequence_pool_backward<D: DTypeKind>(
    how: Pool,
    dy: &Tensor<D>,
    seq: usize,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "sequence_pool_backward";
    let &[b, d] = dy.shape() else {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "expected a gradient [batch, features], got shape {:?}",
                dy.shape()
            ),
        });
    };
    on_cpu(OP, dy.device())?;
    let mut dx = for_overwrite::<D>(&[b, seq, d], dy.device())?;
    crate::sequence::pool_backward(how, dy.as_slice()?, b, seq, d, dx.as_mut_slice()?)?;
    Ok(dx)
}

fn check_qkv<D: DTypeKind>(
    op: &'static str,
    a: &Attention,
    tensors: &[(&'static str, &Tensor<D>)],
    mask: Option<&Tensor<F32>>,
) -> Result<Device> {
    let want = [a.batch, a.seq, a.heads * a.head_dim];
    for (what, t) in tensors {
        same_shape(op, what, &want, t.shape())?;
    }
    if let Some(m) = mask {
        same_shape(op, "mask", &[a.batch, a.seq], m.shape())?;
    }
    let mut devices: Vec<Device> = tensors.iter().map(|(_, t)| t.device()).collect();
    devices.extend(mask.map(Tensor::device));
    let dev = device(op, &devices)?;
    on_cpu(op, dev)?;
    Ok(dev)
}

/// The floating-point operations of `products` seq × seq × head_dim products per sample and
/// head.
fn attention_flop(a: &Attention, products: f64) -> f64 {
    2.0 * products * (a.batch * a.heads * a.seq * a.seq * a.head_dim) as f64
}

/// Scaled dot-product attention ([`crate::attention`]) of `q`, `k`, `v`, each `[batch, seq,
/// heads × head_dim]`, with an optional key padding mask `[batch, seq]` (1 attend, 0 padding):
/// the output in `q`'s shape and dtype, and the float32 probabilities `[batch, heads, seq, seq]`
/// that [`attention_backward`] needs.
///
/// # Errors
/// Shapes that do not match `a`; mask values other than 0 and 1; `WrongDevice`; on CUDA, no
/// kernel yet.
pub fn attention<D: DTypeKind>(
    a: &Attention,
    q: &Tensor<D>,
    k: &Tensor<D>,
    v: &Tensor<D>,
    mask: Option<&Tensor<F32>>,
) -> Result<(Tensor<D>, Tensor<F32>)> {
    let _span = profile::span(OpClass::Attention)
        .flop(attention_flop(a, 2.0))
        .bytes(4 * nb(q) + 4 * a.probs_len());
    const OP: &str = "attention";
    let dev = check_qkv(OP, a, &[("q", q), ("k", k), ("v", v)], mask)?;
    let mut out = for_overwrite::<D>(q.shape(), dev)?;
    let mut probs = for_overwrite::<F32>(&[a.batch, a.heads, a.seq, a.seq], dev)?;
    crate::attention::attention(
        a,
        q.as_slice()?,
        k.as_slice()?,
        v.as_slice()?,
        mask.map(Tensor::as_slice).transpose()?,
        out.as_mut_slice()?,
        probs.as_mut_slice()?,
    )?;
    Ok((out, probs))
}

/// The gradients `(dq, dk, dv)` of [`attention`] from the output gradient `dout` and the
/// forward's probabilities.
///
/// # Errors
/// As [`attention`].
pub fn attention_backward<D: DTypeKind>(
    a: &Attention,
    q: &Tensor<D>,
    k: &Tensor<D>,
    v: &Tensor<D>,
    mask: Option<&Tensor<F32>>,
    probs: &Tensor<F32>,
    dout: &Tensor<D>,
) -> Result<(Tensor<D>, Tensor<D>, Tensor<D>)> {
    let _span = profile::span(OpClass::Attention)
        .flop(attention_flop(a, 4.0))
        .bytes(7 * nb(q) + 4 * a.probs_len());
    const OP: &str = "attention_backward";
    let dev = check_qkv(OP, a, &[("q", q), ("k", k), ("v", v), ("dout", dout)], mask)?;
    same_shape(
        OP,
        "probs",
        &[a.batch, a.heads, a.seq, a.seq],
        probs.shape(),
    )?;
    device(OP, &[dev, probs.device()])?;
    let mut dq = for_overwrite::<D>(q.shape(), dev)?;
    let mut dk = for_overwrite::<D>(q.shape(), dev)?;
    let mut dv = for_overwrite::<D>(q.shape(), dev)?;
    crate::attention::attention_backward(
        a,
        q.as_slice()?,
        k.as_slice()?,
        v.as_slice()?,
        mask.map(Tensor::as_slice).transpose()?,
        probs.as_slice()?,
        dout.as_slice()?,
        dq.as_mut_slice()?,
        dk.as_mut_slice()?,
        dv.as_mut_slice()?,
    )?;
    Ok((dq, dk, dv))
}

/// The rows `rows` of `x` viewed as `[rows, cols]` (the last axis is `cols`), in order, as a
/// `[rows.len(), cols]` tensor: what a loss with ignored positions keeps.
///
/// # Errors
/// A row index out of range; on CUDA, no kernel yet.
pub fn select_rows(x: &Tensor<F32>, rows: &[usize]) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "select_rows";
    let (n, cols) = super::rows_cols(x.shape());
    on_cpu(OP, x.device())?;
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("row {bad} of a tensor of {n} rows"),
        });
    }
    let src = x.as_slice()?;
    Tensor::<F32>::from_writer(&[rows.len(), cols], |out| {
        for (o, &r) in out.chunks_exact_mut(cols.max(1)).zip(rows) {
            o.copy_from_slice(&src[r * cols..(r + 1) * cols]);
        }
    })
    .map_err(Into::into)
}

/// The inverse of [`select_rows`]: a tensor of `shape` (viewed as `[rows, cols]`) holding row
/// `i` of `x` at row `rows[i]` and zeros elsewhere.
///
/// # Errors
/// `x` not `[rows.len(), cols]`, a row index out of range; on CUDA, no kernel yet.
pub fn scatter_rows(x: &Tensor<F32>, rows: &[usize], shape: &[usize]) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Other);
    const OP: &str = "scatter_rows";
    let (n, cols) = super::rows_cols(shape);
    same_shape(OP, "x", &[rows.len(), cols], x.shape())?;
    on_cpu(OP, x.device())?;
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("row {bad} of a tensor of {n} rows"),
        });
    }
    let src = x.as_slice()?;
    let mut out = Tensor::<F32>::zeros(shape)?;
    let dst = out.as_mut_slice()?;
    for (s, &r) in src.chunks_exact(cols.max(1)).zip(rows) {
        dst[r * cols..(r + 1) * cols].copy_from_slice(s);
    }
    Ok(out)
}
