//! Weights in other frameworks' layouts: the names, shapes and element orders PyTorch, Hugging
//! Face tools and candle expect, and the 16-bit dtypes a serving copy is stored in.
//!
//! Each layer says how its variables appear in a foreign layout
//! ([`Layer::foreign_tensors`](crate::Layer::foreign_tensors)); `#[model]` walks its fields in
//! order, so a `Dense` right after a `Flatten` of channels-last images learns the image's shape
//! and exports its rows in channels-first order. A foreign tensor is one or more of the model's
//! variables, each rearranged by a [`Transform`], concatenated along the first axis (PyTorch's
//! packed attention projection is the query, key and value kernels stacked).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use mp_core::Variable;

/// The names and layouts of a weights file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layout {
    /// mp's own, Keras's: variables named by path (`block_1/conv_a/kernel`), dense kernels as
    /// `[in, out]`, convolution kernels as `[kh, kw, in, out]`.
    #[default]
    Mp,
    /// PyTorch's, as Hugging Face tools and candle read it: names joined with `.`,
    /// `weight`/`bias`, dense weights as `[out, in]`, convolution weights as `[out, in, kh, kw]`,
    /// BatchNormalization's `running_mean`/`running_var`/`num_batches_tracked`, attention as
    /// Hugging Face stores it (`q_proj`, `k_proj`, `v_proj`, `out_proj`), the class token and
    /// position embeddings under Hugging Face ViT's names (`cls_token` `[1, 1, d]`,
    /// `position_embeddings` `[1, tokens, d]`).
    PyTorch,
    /// [`Layout::PyTorch`] with attention as `torch.nn.MultiheadAttention` stores it: the query,
    /// key and value projections packed as `in_proj_weight` `[3 d, d]` and `in_proj_bias`, the
    /// output projection as `out_proj`.
    PyTorchPackedAttention,
}

impl Layout {
    /// Every layout, in the order an unlabelled file is matched against them.
    pub const ALL: [Layout; 3] = [Layout::Mp, Layout::PyTorch, Layout::PyTorchPackedAttention];

    /// The name stored in a file's `mp.layout` metadata: `mp`, `pytorch`,
    /// `pytorch-packed-attention`.
    pub const fn name(self) -> &'static str {
        match self {
            Layout::Mp => "mp",
            Layout::PyTorch => "pytorch",
            Layout::PyTorchPackedAttention => "pytorch-packed-attention",
        }
    }

    /// Whether attention's query, key and value projections are one packed tensor.
    pub const fn packs_attention(self) -> bool {
        matches!(self, Layout::PyTorchPackedAttention)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Layout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| crate::Error::InvalidArgument {
                what: format!(
                    "unknown weights layout {s:?}: the layouts are \"mp\", \"pytorch\" and \
                     \"pytorch-packed-attention\""
                ),
            })
    }
}

/// The dtype a weights file stores its values in. Float32 is exact; bfloat16 and float16 are a
/// serving copy at half the bytes (each value rounded to nearest, ties to even), and float16
/// refuses a value past its largest finite value, 65504.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WeightDtype {
    /// `F32`.
    #[default]
    F32,
    /// `BF16`.
    BF16,
    /// `F16`.
    F16,
}

impl WeightDtype {
    /// The safetensors dtype name: `F32`, `BF16`, `F16`.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "F32",
            WeightDtype::BF16 => "BF16",
            WeightDtype::F16 => "F16",
        }
    }

    /// Bytes per value.
    pub const fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::BF16 | WeightDtype::F16 => 2,
        }
    }

    /// The dtype of a safetensors name, `None` for dtypes weights are not read from.
    pub fn from_safetensors_name(name: &str) -> Option<WeightDtype> {
        [WeightDtype::F32, WeightDtype::BF16, WeightDtype::F16]
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// `values` as little-endian bytes of this dtype; for float16, the index and value of the
    /// first value that would round to infinity.
    pub(crate) fn encode(self, values: &[f32]) -> Result<Vec<u8>, (usize, f32)> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            WeightDtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            WeightDtype::BF16 => values.iter().for_each(|&v| {
                out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }),
            WeightDtype::F16 => {
                for (i, &v) in values.iter().enumerate() {
                    let h = half::f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        return Err((i, v));
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Little-endian bytes of this dtype as float32 (exact: both 16-bit dtypes widen exactly).
    pub(crate) fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            WeightDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WeightDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WeightDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "float32",
            WeightDtype::BF16 => "bfloat16",
            WeightDtype::F16 => "float16",
        })
    }
}

impl FromStr for WeightDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "float32" | "F32" => Ok(WeightDtype::F32),
            "bfloat16" | "BF16" => Ok(WeightDtype::BF16),
            "float16" | "F16" => Ok(WeightDtype::F16),
            _ => Err(crate::Error::InvalidArgument {
                what: format!(
                    "unknown weights dtype {s:?}: the dtypes are \"float32\", \"bfloat16\" and \
                     \"float16\""
                ),
            }),
        }
    }
}

/// How one variable's values are rearranged into (part of) a foreign tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transform {
    /// The same values in the same order, under the foreign shape (`[d]` as `[1, 1, d]`).
    Same,
    /// A dense kernel `[in, out]` as `[out, in]`.
    Transpose,
    /// A convolution kernel `[kh, kw, in, out]` as `[out, in, kh, kw]`.
    ConvOihw,
    /// The kernel `[h * w * c, out]` of a dense layer after a `Flatten` of channels-last
    /// `[h, w, c]` images, as `[out, c * h * w]`: transposed, and its inputs in the channels-first
    /// order in which PyTorch flattens `[c, h, w]`.
    FlattenedTranspose {
        /// Image height.
        h: usize,
        /// Image width.
        w: usize,
        /// Channels.
        c: usize,
    },
}

impl Transform {
    /// The foreign shape of a variable of shape `shape`.
    fn shape(&self, shape: &[usize]) -> Vec<usize> {
        match (self, shape) {
            (Transform::Transpose | Transform::FlattenedTranspose { .. }, [i, o]) => vec![*o, *i],
            (Transform::ConvOihw, [kh, kw, i, o]) => vec![*o, *i, *kh, *kw],
            _ => shape.to_vec(),
        }
    }

    /// Where each of the variable's values (in row-major order) goes in the foreign order.
    fn destinations(&self, shape: &[usize]) -> Option<Vec<usize>> {
        Some(match (self, shape) {
            (Transform::Same, _) => return None,
            (Transform::Transpose, &[i, o]) => (0..i * o).map(|k| (k % o) * i + k / o).collect(),
            (Transform::FlattenedTranspose { h, w, c }, &[i, o]) if h * w * c == i => (0..i * o)
                .map(|k| {
                    let (row, out) = (k / o, k % o);
                    let (y, x, ch) = (row / (w * c), row / c % w, row % c);
                    out * i + (ch * h + y) * w + x
                })
                .collect(),
            (Transform::ConvOihw, &[kh, kw, ci, co]) => (0..kh * kw * ci * co)
                .map(|k| {
                    let (o, i) = (k % co, k / co % ci);
                    let (y, x) = (k / (co * ci * kw), k / (co * ci) % kw);
                    ((o * ci + i) * kh + y) * kw + x
                })
                .collect(),
            _ => return None,
        })
    }

    /// The variable's values (row-major in `shape`) in the foreign order.
    pub(crate) fn mp_to_foreign(&self, shape: &[usize], values: &[f32]) -> Vec<f32> {
        match self.destinations(shape) {
            None => values.to_vec(),
            Some(dest) => {
                let mut out = vec![0.0; values.len()];
                for (v, &d) in values.iter().zip(&dest) {
                    out[d] = *v;
                }
                out
            }
        }
    }

    /// The inverse of [`Transform::mp_to_foreign`].
    pub(crate) fn foreign_to_mp(&self, shape: &[usize], foreign: &[f32]) -> Vec<f32> {
        match self.destinations(shape) {
            None => foreign.to_vec(),
            Some(dest) => dest.iter().map(|&d| foreign[d]).collect(),
        }
    }
}

/// One of the model's variables inside a foreign tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The variable's path in mp's layout (`block_1/conv_a/kernel`).
    pub path: String,
    /// Its shape in the model.
    pub shape: Vec<usize>,
    /// How its values are rearranged.
    pub transform: Transform,
}

/// A tensor of a foreign layout: its parts concatenated along the first axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignTensor {
    /// Its name in the file (`block_1.conv_a.weight`).
    pub name: String,
    /// Its shape in the file.
    pub shape: Vec<usize>,
    /// The variables it holds, in order; none for PyTorch's `num_batches_tracked`, written as
    /// an int64 0 and ignored when read.
    pub parts: Vec<Part>,
}

/// The tensors of a model in a foreign layout, collected by
/// [`Layer::foreign_tensors`](crate::Layer::foreign_tensors) as `#[model]` walks its fields.
#[derive(Debug)]
pub struct ForeignTensors {
    layout: Layout,
    tensors: Vec<ForeignTensor>,
    hyperparameters: BTreeMap<String, String>,
    flattened: Option<[usize; 3]>,
}

impl ForeignTensors {
    /// An empty collection for `layout`.
    pub fn new(layout: Layout) -> Self {
        ForeignTensors {
            layout,
            tensors: vec![],
            hyperparameters: BTreeMap::new(),
            flattened: None,
        }
    }

    /// The layout being collected.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The foreign name of a layer's tensor `leaf`: the layer's mp prefix (`block_1/conv_a/`)
    /// with its `/` as `.`, then `leaf` (`block_1.conv_a.weight`).
    pub fn name(prefix: &str, leaf: &str) -> String {
        format!("{}{leaf}", prefix.replace('/', "."))
    }

    /// Adds a tensor made of one variable (`path`, of shape `shape`) rearranged by `transform`.
    pub fn push(&mut self, name: String, path: String, shape: &[usize], transform: Transform) {
        self.push_parts(
            name,
            vec![Part {
                path,
                shape: shape.to_vec(),
                transform,
            }],
        );
    }

    /// Adds each present variable of `variables` (`(variable, mp leaf name, foreign leaf
    /// name)`) as itself under its foreign name: what layers whose tensors are only renamed
    /// (normalizations, embeddings) write. Clears a pending `Flatten`.
    pub fn push_renamed(&mut self, prefix: &str, variables: &[(Option<&Variable>, &str, &str)]) {
        self.take_flattened();
        for (v, mp, foreign) in variables {
            if let Some(v) = v {
                self.push(
                    ForeignTensors::name(prefix, foreign),
                    format!("{prefix}{mp}"),
                    v.shape(),
                    Transform::Same,
                );
            }
        }
    }

    /// Adds a layer's `kernel`, rearranged by `transform`, and its `bias` as `weight` and `bias`
    /// under `foreign_prefix` (`prefix` is where the variables are in mp's layout), and a fused
    /// ReLU as the hyperparameter `activation`: what `Dense` and `Conv2D` write.
    pub fn push_weight_and_bias(
        &mut self,
        (prefix, foreign_prefix): (&str, &str),
        kernel: Option<&Variable>,
        bias: Option<&Variable>,
        transform: Transform,
        relu: bool,
    ) {
        if let Some(k) = kernel {
            self.push(
                ForeignTensors::name(foreign_prefix, "weight"),
                format!("{prefix}kernel"),
                k.shape(),
                transform,
            );
        }
        if let Some(b) = bias {
            self.push(
                ForeignTensors::name(foreign_prefix, "bias"),
                format!("{prefix}bias"),
                b.shape(),
                Transform::Same,
            );
        }
        if relu {
            self.hyperparameter(foreign_prefix, "activation", "relu");
        }
    }

    /// Adds a tensor of one variable under another shape of the same size (`[d]` as
    /// `[1, 1, d]`).
    pub fn push_reshaped(&mut self, name: String, path: String, shape: &[usize], to: Vec<usize>) {
        self.tensors.push(ForeignTensor {
            name,
            shape: to,
            parts: vec![Part {
                path,
                shape: shape.to_vec(),
                transform: Transform::Same,
            }],
        });
    }

    /// Adds a tensor made of `parts` concatenated along the first axis (they must agree on the
    /// other axes once transformed).
    pub fn push_parts(&mut self, name: String, parts: Vec<Part>) {
        let mut shape = parts
            .first()
            .map(|p| p.transform.shape(&p.shape))
            .unwrap_or_default();
        if let Some(first) = shape.first_mut() {
            *first = parts.iter().map(|p| p.transform.shape(&p.shape)[0]).sum();
        }
        self.tensors.push(ForeignTensor { name, shape, parts });
    }

    /// Adds PyTorch BatchNorm's `num_batches_tracked`: written as an int64 0, accepted and
    /// ignored when read.
    pub fn push_batches_tracked(&mut self, name: String) {
        self.tensors.push(ForeignTensor {
            name,
            shape: vec![],
            parts: vec![],
        });
    }

    /// Records a hyperparameter the tensors do not carry (`eps`, GELU's `approximate`) for the
    /// layer at `prefix`; it is stored in the file's metadata as
    /// `mp.hparams.<layer>.<key>`.
    pub fn hyperparameter(&mut self, prefix: &str, key: &str, value: impl ToString) {
        let layer = prefix.trim_end_matches('/').replace('/', ".");
        self.hyperparameters
            .insert(format!("mp.hparams.{layer}.{key}"), value.to_string());
    }

    /// Called by `Flatten` with its input shape: the next layer with variables is told (by
    /// [`ForeignTensors::take_flattened`]) when it reads channels-last images flattened.
    pub fn set_flattened(&mut self, input_shape: Option<&[usize]>) {
        self.flattened = match input_shape {
            Some(&[h, w, c]) => Some([h, w, c]),
            _ => None,
        };
    }

    /// The `[h, w, c]` images a `Flatten` just flattened, if the preceding layer with an effect
    /// on element order was that `Flatten`; clears it. Every layer with variables calls it.
    pub fn take_flattened(&mut self) -> Option<[usize; 3]> {
        self.flattened.take()
    }

    /// The tensors collected, in order.
    pub fn tensors(&self) -> &[ForeignTensor] {
        &self.tensors
    }

    /// The hyperparameters collected, as metadata entries.
    pub fn hyperparameters(&self) -> &BTreeMap<String, String> {
        &self.hyperparameters
    }

    pub(crate) fn into_parts(self) -> (Vec<ForeignTensor>, BTreeMap<String, String>) {
        (self.tensors, self.hyperparameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_invert_and_move_what_they_say() {
        // [in 2, out 3] -> [out 3, in 2]
        let t = Transform::Transpose;
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let f = t.mp_to_foreign(&[2, 3], &v);
        assert_eq!(f, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(t.foreign_to_mp(&[2, 3], &f), v);

        // [kh 2, kw 1, in 2, out 3] -> [out, in, kh, kw]: element (y, x, i, o) at
        // ((o * 2 + i) * 2 + y) * 1 + x.
        let t = Transform::ConvOihw;
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let f = t.mp_to_foreign(&[2, 1, 2, 3], &v);
        for y in 0..2 {
            for i in 0..2 {
                for o in 0..3 {
                    assert_eq!(f[(o * 2 + i) * 2 + y], v[(y * 2 + i) * 3 + o]);
                }
            }
        }
        assert_eq!(t.foreign_to_mp(&[2, 1, 2, 3], &f), v);

        // Rows of [h 2, w 3, c 2] channels-last inputs, 1 output: column (ch, y, x).
        let t = Transform::FlattenedTranspose { h: 2, w: 3, c: 2 };
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let f = t.mp_to_foreign(&[12, 1], &v);
        for y in 0..2 {
            for x in 0..3 {
                for ch in 0..2 {
                    assert_eq!(f[(ch * 2 + y) * 3 + x], v[(y * 3 + x) * 2 + ch]);
                }
            }
        }
        assert_eq!(t.foreign_to_mp(&[12, 1], &f), v);
    }

    #[test]
    fn sixteen_bit_encodings_round_to_nearest_and_float16_refuses_its_overflow() {
        let v = [1.0f32, -2.5, 65504.0, 1e-8];
        for d in [WeightDtype::F32, WeightDtype::BF16, WeightDtype::F16] {
            let back = d.decode(&d.encode(&v).unwrap());
            assert_eq!(back[..2], [1.0, -2.5], "{d}");
        }
        assert_eq!(
            WeightDtype::F16.encode(&[1.0, 65520.0]).unwrap_err(),
            (1, 65520.0)
        );
        // 65519 rounds down to 65504: not an overflow.
        assert!(WeightDtype::F16.encode(&[65519.0]).is_ok());
        assert_eq!(
            "bfloat16".parse::<WeightDtype>().unwrap(),
            WeightDtype::BF16
        );
        assert!(
            "int8"
                .parse::<WeightDtype>()
                .unwrap_err()
                .to_string()
                .contains("\"int8\"")
        );
        assert!(
            "keras"
                .parse::<Layout>()
                .unwrap_err()
                .to_string()
                .contains("\"keras\"")
        );
    }
}
