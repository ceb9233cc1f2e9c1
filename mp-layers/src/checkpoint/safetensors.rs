//! The safetensors format, written and read here (about 200 lines, no dependency beyond
//! `serde_json`), so that every refusal can name the file and the problem.
//!
//! A safetensors file is:
//!
//! 1. `N`, the header length, as an 8-byte little-endian unsigned integer;
//! 2. `N` bytes of UTF-8 JSON, an object mapping each tensor's name to
//!    `{"dtype": "F32", "shape": [2, 64], "data_offsets": [begin, end]}` (offsets relative to the
//!    start of the data), plus an optional `"__metadata__"` object mapping strings to strings.
//!    The writer pads the header with spaces so the data starts 8-byte aligned;
//! 3. the data: every tensor's elements, row-major, little-endian. The tensors cover the data
//!    exactly, without holes or overlaps (so no other content can hide in a file).
//!
//! The reader checks all of that, with checked arithmetic, before handing out any tensor: a
//! header length beyond the file or the 100 MB limit, a header that is not a JSON object, an
//! unknown dtype, offsets that do not match the dtype and shape, gaps, overlaps and trailing
//! bytes are each refused with an error naming the problem. Nothing is allocated from a size the
//! file merely claims. This is the layout the reference implementation (Hugging Face's
//! `safetensors`) reads and writes; the fuzz target `checkpoint` checks that every file this
//! reader accepts, the reference accepts with the same tensors.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::Error;

/// The largest header the format allows (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The key of the optional string-to-string metadata in the header.
pub const METADATA_KEY: &str = "__metadata__";

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (for mp's model weights, the variable path: `dense_1/kernel`).
    pub name: String,
    /// The dtype as the format spells it (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// `[begin, end)` of the tensor's bytes, relative to the start of the data.
    pub data_offsets: (usize, usize),
}

/// A parsed safetensors file, borrowing its data from the bytes it was parsed from.
#[derive(Debug)]
pub struct SafeTensors<'a> {
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Every tensor, in the order of its data.
    pub tensors: Vec<TensorInfo>,
    data: &'a [u8],
}

/// The size in bytes of one element of a safetensors dtype, `None` for a dtype this reader does
/// not know.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

impl<'a> SafeTensors<'a> {
    /// Parses and checks a whole safetensors file held in memory. `file` names it in errors.
    pub fn parse(file: &str, bytes: &'a [u8]) -> Result<Self, Error> {
        let bad = |what: String| Error::Format {
            file: file.to_string(),
            what,
        };
        let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(bad(format!(
                "truncated: the file is {} bytes long, but a safetensors file starts with an \
                 8-byte header length",
                bytes.len()
            )));
        };
        let n = u64::from_le_bytes(*len_bytes);
        if n > MAX_HEADER_LEN {
            return Err(bad(format!(
                "the header length {n} exceeds the format's limit of {MAX_HEADER_LEN} bytes \
                 (is this a safetensors file at all?)"
            )));
        }
        let n = n as usize; // at most MAX_HEADER_LEN: fits
        if n > rest.len() {
            return Err(bad(format!(
                "truncated: the header length is {n} bytes, but only {} bytes follow it",
                rest.len()
            )));
        }
        let (header, data) = rest.split_at(n);
        let header = std::str::from_utf8(header)
            .map_err(|e| bad(format!("the header is not UTF-8 ({e})")))?;
        if !header.starts_with('{') {
            return Err(bad(
                "the header does not start with '{': not a safetensors file".into(),
            ));
        }
        let value: Value = serde_json::from_str(header).map_err(|source| Error::Header {
            file: file.to_string(),
            source,
        })?;
        // Readers disagree on which of two equal keys wins: a file with one means different
        // things to different tools, so it is refused.
        if let Some(key) = duplicate_key(header) {
            return Err(bad(format!(
                "the header has the key {key:?} twice in one object"
            )));
        }
        let Value::Object(entries) = value else {
            return Err(bad("the header is not a JSON object".into()));
        };
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, entry) in entries {
            if name == METADATA_KEY {
                let Value::Object(map) = entry else {
                    return Err(bad(format!("{METADATA_KEY} is not a JSON object")));
                };
                for (k, v) in map {
                    let Value::String(v) = v else {
                        return Err(bad(format!(
                            "{METADATA_KEY} value of {k:?} is not a string: {v}"
                        )));
                    };
                    metadata.insert(k, v);
                }
                continue;
            }
            let info = tensor_info(&name, &entry)
                .map_err(|what| bad(format!("tensor {name:?}: {what}")))?;
            tensors.push(info);
        }
        tensors.sort_by_key(|t| t.data_offsets);
        let mut covered = 0usize;
        for t in &tensors {
            let (begin, end) = t.data_offsets;
            if begin != covered {
                return Err(bad(format!(
                    "tensor {:?} starts at data byte {begin}, but the tensors before it end at \
                     {covered} (a gap or an overlap)",
                    t.name
                )));
            }
            covered = end;
        }
        if covered != data.len() {
            let what = if covered > data.len() {
                "truncated: the data section"
            } else {
                "trailing bytes: the data section"
            };
            return Err(bad(format!(
                "{what} is {} bytes, the tensors cover {covered}",
                data.len()
            )));
        }
        Ok(SafeTensors {
            metadata,
            tensors,
            data,
        })
    }

    /// The entry of the tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn data(&self, info: &TensorInfo) -> &'a [u8] {
        // The offsets were checked against the data at parse time.
        &self.data[info.data_offsets.0..info.data_offsets.1]
    }

    /// The whole data section (every tensor's bytes, in order).
    pub fn data_section(&self) -> &'a [u8] {
        self.data
    }

    /// A float32 tensor's values; `None` when its dtype is not `F32`.
    pub fn f32_values(&self, info: &TensorInfo) -> Option<Vec<f32>> {
        (info.dtype == "F32").then(|| {
            self.data(info)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// The first key that appears twice in one object of `json`, which must be valid JSON.
fn duplicate_key(json: &str) -> Option<String> {
    use std::collections::HashSet;
    let b = json.as_bytes();
    // One entry per open object (its keys so far) or array (`None`).
    let mut open: Vec<Option<HashSet<String>>> = vec![];
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'{' => open.push(Some(HashSet::new())),
            b'[' => open.push(None),
            b'}' | b']' => {
                open.pop();
            }
            b'"' => {
                let start = i;
                i += 1;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                let after = b.get(i + 1..).unwrap_or_default();
                let is_key = after.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b':');
                if let (true, Some(Some(keys))) = (is_key, open.last_mut()) {
                    let key: String = serde_json::from_str(json.get(start..=i)?).ok()?;
                    if let Some(dup) = keys.replace(key) {
                        return Some(dup);
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Checks one header entry: a dtype this reader knows, a shape, and offsets holding exactly the
/// bytes the dtype and shape need.
fn tensor_info(name: &str, entry: &Value) -> Result<TensorInfo, String> {
    let Value::Object(fields) = entry else {
        return Err("the entry is not a JSON object".into());
    };
    let field = |key: &str| {
        fields
            .get(key)
            .ok_or_else(|| format!("the entry has no {key:?}"))
    };
    let dtype = match field("dtype")? {
        Value::String(s) => s.clone(),
        other => return Err(format!("dtype is not a string: {other}")),
    };
    let Some(size) = dtype_size(&dtype) else {
        return Err(format!("unknown dtype {dtype:?}"));
    };
    let shape = usizes(field("shape")?).ok_or("shape is not a list of non-negative integers")?;
    let offsets = usizes(field("data_offsets")?)
        .filter(|o| o.len() == 2)
        .ok_or("data_offsets is not a pair of non-negative integers")?;
    let (begin, end) = (offsets[0], offsets[1]);
    let needed = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} of {dtype} overflows"))?;
    if end < begin || end - begin != needed {
        return Err(format!(
            "data_offsets [{begin}, {end}] do not hold the {needed} bytes that {dtype} {shape:?} \
             needs"
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

fn usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect(),
        _ => None,
    }
}

/// Writes tensors — `(name, dtype, shape, little-endian bytes)`, their data in the order given —
/// and `metadata` as a safetensors file. Names must be unique and each tensor's bytes must be
/// what its dtype and shape need; otherwise nothing is written and the error says which.
pub fn serialize(
    tensors: &[(&str, &str, &[usize], &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, Error> {
    let bad = |what: String| Error::Invalid {
        file: "(writing)".into(),
        what,
    };
    let mut header = Map::new();
    if !metadata.is_empty() {
        let meta = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert(METADATA_KEY.into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for &(name, dtype, shape, data) in tensors {
        let needed = dtype_size(dtype)
            .and_then(|size| shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d)));
        if needed != Some(data.len()) {
            return Err(bad(format!(
                "tensor {name:?}: {} bytes do not fit dtype {dtype:?} and shape {shape:?}",
                data.len()
            )));
        }
        if name == METADATA_KEY || header.contains_key(name) {
            return Err(bad(format!(
                "tensor name {name:?} is used twice or reserved"
            )));
        }
        let end = offset + data.len();
        let entry = serde_json::json!({
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, end],
        });
        header.insert(name.to_string(), entry);
        offset = end;
    }
    let mut json = Value::Object(header).to_string().into_bytes();
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn duplicate_keys_are_found_at_any_depth_and_through_escapes() {
        assert_eq!(duplicate_key(r#"{"a": 1, "b": {"a": 2}}"#), None);
        assert_eq!(duplicate_key(r#"{"a": 1, "\u0061": 2}"#), Some("a".into()));
        assert_eq!(
            duplicate_key(r#"{"x": {"q\"": [1, {"k": 1, "k" : 2}]}}"#),
            Some("k".into())
        );
        assert_eq!(duplicate_key(r#"{"s": ["a", "a"], "t": "a"}"#), None);
        let t = r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        let twice = file(&format!(r#"{{"w":{t},"w":{t}}}"#), &[0; 4]);
        let e = SafeTensors::parse("f", &twice).unwrap_err().to_string();
        assert!(e.contains("the key \"w\" twice"), "{e}");
    }

    #[test]
    fn what_is_written_reads_back() {
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(
            &[
                ("a", "F32", &[2][..], &[0, 0, 128, 63, 0, 0, 0, 64][..]),
                ("empty", "BF16", &[0, 3][..], &[][..]),
                ("b", "U8", &[3][..], &[1, 2, 3][..]),
            ],
            &meta,
        )
        .unwrap();
        let st = SafeTensors::parse("f", &bytes).unwrap();
        assert_eq!(st.metadata, meta);
        let a = st.get("a").unwrap();
        assert_eq!(st.f32_values(a), Some(vec![1.0, 2.0]));
        assert_eq!(st.data(st.get("b").unwrap()), &[1, 2, 3]);
        assert_eq!(st.get("empty").unwrap().shape, vec![0, 3]);
        assert!(serialize(&[("a", "F32", &[2][..], &[0; 7][..])], &meta).is_err());
        assert!(serialize(&[("a", "X", &[1][..], &[0][..])], &meta).is_err());
    }

    #[test]
    fn gaps_overlaps_and_bad_entries_are_named() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                "a gap or an overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "do not hold the 8",
            ),
            (
                r#"{"a":{"dtype":"Q8","shape":[1],"data_offsets":[0,4]}}"#,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "shape is not",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1]}}"#,
                "no \"data_offsets\"",
            ),
            (r#"{"__metadata__":{"k":1}}"#, "is not a string"),
            (r#"[1]"#, "does not start with '{'"),
            (r#"{"a":1,}"#, "not valid JSON"),
        ];
        for (header, expect) in cases {
            let e = SafeTensors::parse("f", &file(header, &[0; 8]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{header}: {e}");
        }
        let big = [0xff; 8];
        let e = SafeTensors::parse("f", &big).unwrap_err().to_string();
        assert!(e.contains("exceeds the format's limit"), "{e}");
    }
}
