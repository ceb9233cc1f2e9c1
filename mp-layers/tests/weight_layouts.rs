//! Weights in PyTorch's layout and in 16-bit dtypes: exact round trips, what each layer's tensors
//! are called and how their elements are ordered, files written by another tool, non-strict and
//! renamed loads, and every bad file refused by name with the model unchanged.

use std::collections::BTreeMap;

use mp_core::{F32, Float32, MixedBFloat16, PolicyKind, Rng, Tensor};
use mp_layers::checkpoint::{
    self, Error as CkptError, Layout, LoadOptions, WeightDtype, load_weights_from_bytes,
    load_weights_from_bytes_with, safetensors::SafeTensors, weights_to_bytes_as,
};
use mp_layers::{
    Activation, BatchNormalization, ClassToken, Conv2D, Dense, Flatten, Layer, LayerNormalization,
    Model, MultiHeadAttention, Padding, PositionEmbedding, SequencePooling, Softmax, model,
};

/// Conv -> BN -> ReLU -> Flatten -> Dense: the layouts of convolutions, batch statistics and a
/// dense layer reading channels-last images flattened.
#[model]
struct SmallCnn {
    conv: Conv2D,
    bn: BatchNormalization,
    relu: Activation,
    flatten: Flatten,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn small_cnn<P: PolicyKind>() -> SmallCnn<P> {
    let mut m = SmallCnn {
        conv: Conv2D::new(3, [3, 2]).padding(Padding::Same),
        bn: BatchNormalization::new(),
        relu: Activation::relu(),
        flatten: Flatten::new(),
        logits: Dense::new(4),
        probs: Softmax::new(),
    };
    m.build(&[5, 3, 2]).unwrap();
    m
}

/// Patches -> class token -> positions -> LayerNorm -> attention -> GELU -> pooling -> Dense.
#[model]
struct SmallVit {
    patches: Dense,
    class_token: ClassToken,
    positions: PositionEmbedding,
    norm: LayerNormalization,
    attention: MultiHeadAttention,
    gelu: Activation,
    pool: SequencePooling,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn small_vit<P: PolicyKind>() -> SmallVit<P> {
    let mut m = SmallVit {
        patches: Dense::new(8),
        class_token: ClassToken::new(),
        positions: PositionEmbedding::new(5),
        norm: LayerNormalization::new(),
        attention: MultiHeadAttention::new(2),
        gelu: Activation::gelu(),
        pool: SequencePooling::class_token(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    m.build(&[4, 6]).unwrap();
    m
}

/// Gives every variable seeded random values (variances positive), so no layout can pass by
/// zeros or ones.
fn randomize<M: Model>(m: &mut M, seed: u64) {
    let mut rng = Rng::new(seed);
    let weights: Vec<(String, Tensor<F32>)> = m
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let values: Vec<f32> = (0..t.len())
                .map(|_| {
                    let v = rng.normal();
                    if name.ends_with("moving_variance") {
                        v.abs() + 0.1
                    } else {
                        v
                    }
                })
                .collect();
            let t = Tensor::from_vec(t.shape(), values).unwrap();
            (name, t)
        })
        .collect();
    m.set_weights(&weights).unwrap();
}

fn bits<M: Model>(m: &mut M) -> Vec<(String, Vec<u32>)> {
    m.get_weights()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.as_slice().unwrap().iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

fn weight<M: Model>(m: &mut M, path: &str) -> Vec<f32> {
    let w = m.get_weights().unwrap();
    let (_, t) = w.iter().find(|(n, _)| n == path).unwrap();
    t.as_slice().unwrap().to_vec()
}

fn tensors(bytes: &[u8]) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
    let st = SafeTensors::parse("t", bytes).unwrap();
    st.tensors
        .iter()
        .map(|t| {
            let data = st.data(t);
            let values = match t.dtype.as_str() {
                "F32" => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                "BF16" => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                "F16" => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                _ => vec![],
            };
            (t.name.clone(), (t.dtype.clone(), t.shape.clone(), values))
        })
        .collect()
}

/// A file's tensors as `(name, dtype, shape, bytes)`, to edit.
type Entries = Vec<(String, String, Vec<usize>, Vec<u8>)>;

fn predict<M: Model<Input = F32>>(m: &M, x: &Tensor<F32>) -> Vec<f32> {
    m.forward_f32(x).unwrap().as_slice().unwrap().to_vec()
}

fn input(shape: &[usize], seed: u64) -> Tensor<F32> {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect()).unwrap()
}

#[test]
fn float32_round_trips_are_bit_identical_in_every_layout() {
    for layout in Layout::ALL {
        let mut cnn = small_cnn::<Float32>();
        randomize(&mut cnn, 1);
        let bytes = weights_to_bytes_as(&mut cnn, layout, WeightDtype::F32).unwrap();
        let mut back = small_cnn::<Float32>();
        load_weights_from_bytes(&mut back, "cnn", &bytes).unwrap();
        assert_eq!(bits(&mut back), bits(&mut cnn), "{layout}");

        let mut vit = small_vit::<MixedBFloat16>();
        randomize(&mut vit, 2);
        let bytes = weights_to_bytes_as(&mut vit, layout, WeightDtype::F32).unwrap();
        let mut back = small_vit::<MixedBFloat16>();
        let report =
            load_weights_from_bytes_with(&mut back, "vit", &bytes, &LoadOptions::new()).unwrap();
        assert_eq!(report.layout, layout);
        assert_eq!(bits(&mut back), bits(&mut vit), "{layout}");
    }
}

#[test]
fn pytorch_names_shapes_and_element_orders() {
    let mut cnn = small_cnn::<Float32>();
    randomize(&mut cnn, 3);
    let bytes = weights_to_bytes_as(&mut cnn, Layout::PyTorch, WeightDtype::F32).unwrap();
    let t = tensors(&bytes);
    let shapes: Vec<(&str, &str, &[usize])> = t
        .iter()
        .map(|(n, (d, s, _))| (n.as_str(), d.as_str(), s.as_slice()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("bn.bias", "F32", &[3][..]),
            ("bn.num_batches_tracked", "I64", &[][..]),
            ("bn.running_mean", "F32", &[3][..]),
            ("bn.running_var", "F32", &[3][..]),
            ("bn.weight", "F32", &[3][..]),
            ("conv.bias", "F32", &[3][..]),
            ("conv.weight", "F32", &[3, 2, 3, 2][..]),
            ("logits.bias", "F32", &[4][..]),
            ("logits.weight", "F32", &[4, 45][..]),
        ]
    );
    // conv.weight[o, i, y, x] = kernel[y, x, i, o]
    let kernel = weight(&mut cnn, "conv/kernel");
    let w = &t["conv.weight"].2;
    for (y, x, i, o) in (0..3).flat_map(|y| {
        (0..2).flat_map(move |x| (0..2).flat_map(move |i| (0..3).map(move |o| (y, x, i, o))))
    }) {
        assert_eq!(
            w[((o * 2 + i) * 3 + y) * 2 + x],
            kernel[((y * 2 + x) * 2 + i) * 3 + o]
        );
    }
    // After Flatten of [h 5, w 3, c 3]: logits.weight[o, (c, y, x)] = kernel[(y, x, c), o]
    let kernel = weight(&mut cnn, "logits/kernel");
    let w = &t["logits.weight"].2;
    for (y, x, c, o) in (0..5).flat_map(|y| {
        (0..3).flat_map(move |x| (0..3).flat_map(move |c| (0..4).map(move |o| (y, x, c, o))))
    }) {
        assert_eq!(
            w[o * 45 + (c * 5 + y) * 3 + x],
            kernel[((y * 3 + x) * 3 + c) * 4 + o]
        );
    }
    assert_eq!(
        t["bn.running_var"].2,
        weight(&mut cnn, "bn/moving_variance")
    );
    let meta = SafeTensors::parse("t", &bytes).unwrap().metadata;
    assert_eq!(meta["mp.layout"], "pytorch");
    assert_eq!(meta["mp.hparams.bn.eps"], "0.001");
    assert_eq!(meta["mp.hparams.bn.momentum"], (1.0f32 - 0.99).to_string());

    let mut vit = small_vit::<Float32>();
    randomize(&mut vit, 4);
    for (layout, expected) in [
        (
            Layout::PyTorch,
            &[
                ("attention.k_proj.bias", &[8][..]),
                ("attention.k_proj.weight", &[8, 8][..]),
                ("attention.out_proj.bias", &[8][..]),
                ("attention.out_proj.weight", &[8, 8][..]),
                ("attention.q_proj.bias", &[8][..]),
                ("attention.q_proj.weight", &[8, 8][..]),
                ("attention.v_proj.bias", &[8][..]),
                ("attention.v_proj.weight", &[8, 8][..]),
                ("class_token.cls_token", &[1, 1, 8][..]),
            ][..],
        ),
        (
            Layout::PyTorchPackedAttention,
            &[
                ("attention.in_proj_bias", &[24][..]),
                ("attention.in_proj_weight", &[24, 8][..]),
                ("attention.out_proj.bias", &[8][..]),
                ("attention.out_proj.weight", &[8, 8][..]),
                ("class_token.cls_token", &[1, 1, 8][..]),
            ][..],
        ),
    ] {
        let bytes = weights_to_bytes_as(&mut vit, layout, WeightDtype::F32).unwrap();
        let t = tensors(&bytes);
        let got: Vec<(&str, &[usize])> = t
            .iter()
            .map(|(n, (_, s, _))| (n.as_str(), s.as_slice()))
            .take(expected.len())
            .collect();
        assert_eq!(got, expected, "{layout}");
        assert_eq!(t["positions.position_embeddings"].1, [1, 5, 8]);
        assert_eq!(t["norm.weight"].1, [8]);
        assert_eq!(t["patches.weight"].1, [8, 6]);
        let meta = SafeTensors::parse("t", &bytes).unwrap().metadata;
        assert_eq!(meta["mp.hparams.gelu.approximate"], "none");
        assert_eq!(meta["mp.hparams.attention.num_heads"], "2");
        if layout == Layout::PyTorchPackedAttention {
            // Rows 8..16 of in_proj_weight are the key projection, transposed.
            let key = weight(&mut vit, "attention/key/kernel");
            let packed = &t["attention.in_proj_weight"].2;
            for o in 0..8 {
                for i in 0..8 {
                    assert_eq!(packed[(8 + o) * 8 + i], key[i * 8 + o]);
                }
            }
        }
    }
}

#[test]
fn sixteen_bit_exports_halve_the_file_round_to_nearest_and_load_into_float32() {
    let mut vit = small_vit::<Float32>();
    randomize(&mut vit, 5);
    let f32_bytes = weights_to_bytes_as(&mut vit, Layout::PyTorch, WeightDtype::F32).unwrap();
    for (dtype, round) in [
        (
            WeightDtype::BF16,
            (|v: f32| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (WeightDtype::F16, |v: f32| half::f16::from_f32(v).to_f32()),
    ] {
        let bytes = weights_to_bytes_as(&mut vit, Layout::PyTorch, dtype).unwrap();
        let data = |b: &[u8]| {
            let st = SafeTensors::parse("t", b).unwrap();
            st.data_section().len()
        };
        assert_eq!(data(&bytes) * 2, data(&f32_bytes), "{dtype}");
        let mut back = small_vit::<Float32>();
        load_weights_from_bytes(&mut back, "vit", &bytes).unwrap();
        let want: Vec<(String, Vec<u32>)> = bits(&mut vit)
            .into_iter()
            .map(|(n, b)| {
                (
                    n,
                    b.into_iter()
                        .map(|v| round(f32::from_bits(v)).to_bits())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(bits(&mut back), want, "{dtype}");
    }

    // Past float16's range: refused by the tensor's name, with the index; bfloat16 is fine.
    let mut cnn = small_cnn::<Float32>();
    let mut w = cnn.get_weights().unwrap();
    let (_, bias) = w.iter_mut().find(|(n, _)| n == "logits/bias").unwrap();
    *bias = Tensor::from_vec(&[4], vec![0.0, 1.0, 70000.0, 0.0]).unwrap();
    cnn.set_weights(&w).unwrap();
    let err = weights_to_bytes_as(&mut cnn, Layout::PyTorch, WeightDtype::F16)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"logits.bias\" holds 70000 at index 2"),
        "{err}"
    );
    assert!(err.contains("65504"), "{err}");
    weights_to_bytes_as(&mut cnn, Layout::PyTorch, WeightDtype::BF16).unwrap();
}

/// A PyTorch-layout file as another tool writes it: no mp metadata, tensors in any order,
/// `num_batches_tracked` counting batches, built here from the model's variables by the
/// layouts' definitions.
#[test]
fn a_pytorch_file_from_another_tool_loads_and_predicts_the_same() {
    let mut cnn = small_cnn::<Float32>();
    randomize(&mut cnn, 6);
    let get = |m: &mut SmallCnn<Float32>, p: &str| weight(m, p);
    let kernel = get(&mut cnn, "conv/kernel"); // [3, 2, 2, 3]
    let mut conv_w = vec![0.0f32; 36];
    for y in 0..3 {
        for x in 0..2 {
            for i in 0..2 {
                for o in 0..3 {
                    conv_w[((o * 2 + i) * 3 + y) * 2 + x] = kernel[((y * 2 + x) * 2 + i) * 3 + o];
                }
            }
        }
    }
    let dense = get(&mut cnn, "logits/kernel"); // [45, 4], rows (y, x, c)
    let mut dense_w = vec![0.0f32; 180];
    for y in 0..5 {
        for x in 0..3 {
            for c in 0..3 {
                for o in 0..4 {
                    dense_w[o * 45 + (c * 5 + y) * 3 + x] = dense[((y * 3 + x) * 3 + c) * 4 + o];
                }
            }
        }
    }
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let owned: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = vec![
        ("logits.weight", "F32", vec![4, 45], f32s(&dense_w)),
        (
            "logits.bias",
            "F32",
            vec![4],
            f32s(&get(&mut cnn, "logits/bias")),
        ),
        ("conv.weight", "F32", vec![3, 2, 3, 2], f32s(&conv_w)),
        (
            "conv.bias",
            "F32",
            vec![3],
            f32s(&get(&mut cnn, "conv/bias")),
        ),
        (
            "bn.weight",
            "F32",
            vec![3],
            f32s(&get(&mut cnn, "bn/gamma")),
        ),
        ("bn.bias", "F32", vec![3], f32s(&get(&mut cnn, "bn/beta"))),
        (
            "bn.running_mean",
            "F32",
            vec![3],
            f32s(&get(&mut cnn, "bn/moving_mean")),
        ),
        (
            "bn.running_var",
            "F32",
            vec![3],
            f32s(&get(&mut cnn, "bn/moving_variance")),
        ),
        (
            "bn.num_batches_tracked",
            "I64",
            vec![],
            937i64.to_le_bytes().to_vec(),
        ),
    ];
    let entries: Vec<(&str, &str, &[usize], &[u8])> = owned
        .iter()
        .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.as_slice()))
        .collect();
    let file = checkpoint::safetensors::serialize(&entries, &BTreeMap::new()).unwrap();

    let mut fresh = small_cnn::<Float32>();
    let report =
        load_weights_from_bytes_with(&mut fresh, "torch.safetensors", &file, &LoadOptions::new())
            .unwrap();
    assert_eq!(report.layout, Layout::PyTorch);
    assert_eq!(bits(&mut fresh), bits(&mut cnn));
    let x = input(&[7, 5, 3, 2], 7);
    assert_eq!(predict(&fresh, &x), predict(&cnn, &x));
}

#[test]
fn non_strict_loads_skip_and_list_what_does_not_match_and_rename_maps_names() {
    #[model]
    struct Head {
        body: Dense,
        head: Dense,
        #[dtype = "float32"]
        probs: Softmax,
    }
    let head = |units| {
        let mut m = Head::<Float32> {
            body: Dense::new(6).relu(),
            head: Dense::new(units),
            probs: Softmax::new(),
        };
        m.build(&[4]).unwrap();
        m
    };
    let mut ten = head(10);
    randomize(&mut ten, 8);
    let bytes = weights_to_bytes_as(&mut ten, Layout::PyTorch, WeightDtype::F32).unwrap();

    // A head of another size: strict refuses the shapes by name, and so does non-strict.
    let mut two = head(2);
    let before = bits(&mut two);
    let err = load_weights_from_bytes(&mut two, "ten", &bytes)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"head.weight\" has shape [10, 6] in the file, [2, 6] in the model"),
        "{err}"
    );
    let non_strict = LoadOptions::new().non_strict();
    let err = load_weights_from_bytes_with(&mut two, "ten", &bytes, &non_strict)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"head.bias\" has shape [10]"), "{err}");
    assert_eq!(bits(&mut two), before, "a refused load changed the model");

    // Renamed out of the way, the old head is unexpected and the new one missing.
    let options = LoadOptions::new()
        .non_strict()
        .rename(|n| n.strip_prefix("head.").map(|r| format!("old_head.{r}")));
    let report = load_weights_from_bytes_with(&mut two, "ten", &bytes, &options).unwrap();
    assert_eq!(report.missing, ["head.weight", "head.bias"]);
    assert_eq!(report.unexpected, ["old_head.bias", "old_head.weight"]);
    assert_eq!(
        weight(&mut two, "body/kernel"),
        weight(&mut ten, "body/kernel")
    );
    let after: Vec<_> = bits(&mut two)
        .into_iter()
        .filter(|(n, _)| n.starts_with("head"))
        .collect();
    let kept: Vec<_> = before
        .into_iter()
        .filter(|(n, _)| n.starts_with("head"))
        .collect();
    assert_eq!(after, kept, "missing variables keep their values");

    // Strict with the same renaming names both lists.
    let strict =
        LoadOptions::new().rename(|n| n.strip_prefix("head.").map(|r| format!("old_head.{r}")));
    let err = load_weights_from_bytes_with(&mut head(2), "ten", &bytes, &strict)
        .unwrap_err()
        .to_string();
    for want in [
        "tensor \"head.weight\" (the model's head/kernel) is missing",
        "\"old_head.weight\" in the file is not a variable of the model",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }

    // A rename table; two names renamed to one is an error.
    let table: BTreeMap<String, String> =
        [("body.weight".to_string(), "head.weight".to_string())].into();
    let options = LoadOptions::new().rename(move |n| table.get(n).cloned());
    let err = load_weights_from_bytes_with(&mut head(10), "ten", &bytes, &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("two tensors of the file are named \"head.weight\""),
        "{err}"
    );
}

#[test]
fn every_bad_file_is_refused_by_name_and_the_model_is_unchanged() {
    let mut good = small_cnn::<Float32>();
    randomize(&mut good, 9);
    let bytes = weights_to_bytes_as(&mut good, Layout::PyTorch, WeightDtype::BF16).unwrap();
    let st = SafeTensors::parse("t", &bytes).unwrap();
    // Re-serializes the file's tensors after `edit`, without mp metadata (a foreign writer).
    let rewrite = |edit: &dyn Fn(&mut Entries)| {
        let mut ts: Entries = st
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.dtype.clone(),
                    t.shape.clone(),
                    st.data(t).to_vec(),
                )
            })
            .collect();
        edit(&mut ts);
        let entries: Vec<(&str, &str, &[usize], &[u8])> = ts
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.as_slice(), b.as_slice()))
            .collect();
        checkpoint::safetensors::serialize(&entries, &BTreeMap::new()).unwrap()
    };
    let find = |ts: &mut Entries, n: &str| ts.iter().position(|t| t.0 == n).unwrap();
    let nan_bf16 = half::bf16::NAN.to_le_bytes();
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "wrong dtype",
            rewrite(&|ts| {
                let i = find(ts, "conv.bias");
                ts[i].1 = "I16".into();
            }),
            &["\"conv.bias\" has dtype I16, expected F32, BF16 or F16"],
        ),
        (
            "wrong shape",
            rewrite(&|ts| {
                let i = find(ts, "logits.weight");
                ts[i].2 = vec![45, 4];
            }),
            &["\"logits.weight\" has shape [45, 4] in the file, [4, 45] in the model"],
        ),
        (
            "missing",
            rewrite(&|ts| {
                let i = find(ts, "bn.running_var");
                ts.remove(i);
            }),
            &["tensor \"bn.running_var\" (the model's bn/moving_variance) is missing"],
        ),
        (
            "unexpected",
            rewrite(&|ts| ts.push(("fc.weight".into(), "F32".into(), vec![1], vec![0; 4]))),
            &["\"fc.weight\" in the file is not a variable of the model"],
        ),
        (
            "not finite",
            rewrite(&|ts| {
                let i = find(ts, "conv.weight");
                ts[i].3[2..4].copy_from_slice(&nan_bf16);
            }),
            &["\"conv.weight\" holds NaN at index 1"],
        ),
        (
            "a negative variance",
            rewrite(&|ts| {
                let i = find(ts, "bn.running_var");
                ts[i].3[0..2].copy_from_slice(&half::bf16::from_f32(-1.0).to_le_bytes());
            }),
            &["\"bn.running_var\" holds -1"],
        ),
        (
            "truncated",
            bytes[..bytes.len() - 3].to_vec(),
            &["not a valid safetensors"],
        ),
        (
            "foreign",
            b"PK\x03\x04 a zip file".to_vec(),
            &["not a valid safetensors"],
        ),
    ];
    for (what, file, wants) in cases {
        let mut m = small_cnn::<Float32>();
        randomize(&mut m, 10);
        let before = bits(&mut m);
        for options in [
            LoadOptions::new(),
            LoadOptions::new().layout(Layout::PyTorch),
        ] {
            let err = load_weights_from_bytes_with(&mut m, "bad.safetensors", &file, &options)
                .unwrap_err();
            let text = err.to_string();
            assert!(text.contains("bad.safetensors"), "{what}: {text}");
            for want in wants {
                assert!(text.contains(want), "{what}: {want} not in {text}");
            }
            assert!(
                !matches!(err, CkptError::Io { .. }),
                "{what}: a bad file is not an I/O error"
            );
        }
        assert_eq!(
            bits(&mut m),
            before,
            "{what}: a refused load changed the model"
        );
    }
    // The sealed file, edited without resealing: the checksum names it.
    let mut edited = bytes.clone();
    let last = edited.len() - 1;
    edited[last] ^= 1;
    let err = load_weights_from_bytes(&mut small_cnn::<Float32>(), "edited", &edited)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupted"), "{err}");
    // An unknown layout in the metadata.
    let err = "keras2".parse::<Layout>().unwrap_err().to_string();
    assert!(err.contains("\"keras2\""), "{err}");
}
