//! Tabular data from CSV: a header row, numeric feature columns and one label column, read into
//! float32 features and integer class ids (what `fit` with a sparse categorical loss takes).
//!
//! - The label column is named, or the last column by default. Labels that are all whole
//!   numbers from 0 up are the class ids themselves; otherwise every distinct label text is a
//!   class, numbered in sorted order (as Keras's `image_dataset_from_directory` orders its class
//!   folders), and [`Table::class_names`] lists them.
//! - Every other column is a feature, in file order, parsed as a float32 (`nan` and `inf` are
//!   read as such and propagate through training as IEEE says).
//! - A missing value (an empty cell) is an error naming its line and column, unless
//!   [`CsvOptions::fill`] gives a value for missing features; a missing label is always an
//!   error. So is a cell that is not a number, a row with more or fewer cells than the header,
//!   and a label column the header does not have.
//!
//! ```
//! use mp_data::tabular::{CsvOptions, parse_csv};
//!
//! let text = "height,weight,species\n1.5,60,cat\n1.7,,dog\n0.3,4,cat\n";
//! // The empty weight on line 3 is an error naming it...
//! let err = parse_csv("pets.csv", text.as_bytes(), &CsvOptions::default()).unwrap_err();
//! assert_eq!(err.to_string(), "pets.csv: line 3, column \"weight\": missing value (give CsvOptions::fill to fill it)");
//! // ...unless a fill is given.
//! let table = parse_csv("pets.csv", text.as_bytes(), &CsvOptions::default().fill(0.0))?;
//! assert_eq!(table.features.shape(), &[3, 2]);
//! assert_eq!(table.labels.to_vec(), vec![0, 1, 0]);
//! assert_eq!(table.class_names.as_deref(), Some(&["cat".to_string(), "dog".to_string()][..]));
//! let data = table.into_dataset()?;
//! # Ok::<(), mp_data::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2};

use crate::dataset::Dataset;
use crate::error::{Error, Result};

/// How [`read_csv`] reads a file.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvOptions {
    /// The label column's name in the header; `None`: the last column.
    pub label_column: Option<String>,
    /// The field delimiter (`b','`).
    pub delimiter: u8,
    /// The value of a missing feature (an empty cell); `None`: a missing value is an error.
    pub fill: Option<f32>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            label_column: None,
            delimiter: b',',
            fill: None,
        }
    }
}

impl CsvOptions {
    /// Reads the labels from the column named `name`.
    pub fn label_column(mut self, name: impl Into<String>) -> Self {
        self.label_column = Some(name.into());
        self
    }

    /// Splits fields at `delimiter` (`b';'`, `b'\t'`, ...).
    pub fn delimiter(mut self, delimiter: u8) -> Self {
        self.delimiter = delimiter;
        self
    }

    /// Reads a missing feature as `value`.
    pub fn fill(mut self, value: f32) -> Self {
        self.fill = Some(value);
        self
    }
}

/// A CSV file read as features and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// `(rows, features)`, in file order.
    pub features: Array2<f32>,
    /// One class id per row.
    pub labels: Array1<u32>,
    /// The feature columns' names, in order.
    pub feature_names: Vec<String>,
    /// The label column's name.
    pub label_name: String,
    /// The label text of each class id when the labels were not numbers (sorted); `None` when
    /// they were the ids themselves.
    pub class_names: Option<Vec<String>>,
}

impl Table {
    /// The classes: one more than the largest id (0 without rows).
    pub fn num_classes(&self) -> usize {
        match &self.class_names {
            Some(names) => names.len(),
            None => self.labels.iter().max().map_or(0, |&m| m as usize + 1),
        }
    }

    /// The features and labels as a [`Dataset`] (shuffling, batching, validation split).
    ///
    /// # Errors
    /// None in practice (the row counts agree); the [`Dataset::new`] check.
    pub fn into_dataset(self) -> Result<Dataset> {
        Dataset::new(self.features, self.labels)
    }
}

/// Reads the CSV file at `path` (see the [module docs](self)).
///
/// # Errors
/// [`Error::Io`] for a file that cannot be read; [`Error::Csv`] naming the line and column of
/// the first problem in it.
pub fn read_csv(path: impl AsRef<Path>, options: &CsvOptions) -> Result<Table> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    parse_csv(&path.display().to_string(), &bytes, options)
}

/// Parses CSV `bytes`, named `file` in errors (see the [module docs](self)).
///
/// # Errors
/// [`Error::Csv`] naming the line and column of the first problem.
pub fn parse_csv(file: &str, bytes: &[u8], options: &CsvOptions) -> Result<Table> {
    let err = |line: u64, column: Option<&str>, what: String| Error::Csv {
        file: file.to_string(),
        line,
        column: column.map(str::to_string),
        what,
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(options.delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| err(1, None, csv_what(&e)))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(err(1, None, "no header row (the file is empty)".into()));
    }
    if header.len() < 2 {
        return Err(err(
            1,
            None,
            format!(
                "the header has {} column ({:?}): a table needs a label column and at least \
                 one feature",
                header.len(),
                header
            ),
        ));
    }
    let label_at = match &options.label_column {
        None => header.len() - 1,
        Some(name) => header.iter().position(|h| h == name).ok_or_else(|| {
            err(
                1,
                None,
                format!("no label column {name:?}; the header's columns are {header:?}"),
            )
        })?,
    };
    let feature_names: Vec<String> = header
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != label_at)
        .map(|(_, h)| h.clone())
        .collect();
    let mut values: Vec<f32> = Vec::new();
    let mut label_texts: Vec<String> = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, csv::Position::line);
                return Err(err(line, None, csv_what(&e)));
            }
        }
        let line = record.position().map_or(0, csv::Position::line);
        for (i, cell) in record.iter().enumerate() {
            let cell = cell.trim();
            let column = Some(header[i].as_str());
            if i == label_at {
                if cell.is_empty() {
                    return Err(err(line, column, "missing label".into()));
                }
                label_texts.push(cell.to_string());
                continue;
            }
            let value = if cell.is_empty() {
                options.fill.ok_or_else(|| {
                    err(
                        line,
                        column,
                        "missing value (give CsvOptions::fill to fill it)".into(),
                    )
                })?
            } else {
                cell.parse::<f32>()
                    .map_err(|_| err(line, column, format!("{cell:?} is not a number")))?
            };
            values.push(value);
        }
    }
    let rows = label_texts.len();
    let features = Array2::from_shape_vec((rows, feature_names.len()), values)
        .map_err(|e| err(0, None, format!("internal shape error: {e}")))?;
    let ids: Option<Vec<u32>> = label_texts.iter().map(|t| t.parse::<u32>().ok()).collect();
    let (labels, class_names) = match ids {
        Some(ids) => (Array1::from(ids), None),
        None => {
            let classes: BTreeMap<&str, u32> = {
                let mut names: Vec<&str> = label_texts.iter().map(String::as_str).collect();
                names.sort_unstable();
                names.dedup();
                names.into_iter().zip(0u32..).collect()
            };
            let labels = label_texts.iter().map(|t| classes[t.as_str()]).collect();
            let names = classes.keys().map(|k| k.to_string()).collect();
            (labels, Some(names))
        }
    };
    Ok(Table {
        features,
        labels,
        feature_names,
        label_name: header[label_at].clone(),
        class_names,
    })
}

/// A csv error's text without its own position (the caller names the line).
fn csv_what(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "{len} cells where the header has {expected_len} (a missing or extra delimiter, or \
             an unclosed quote)"
        ),
        csv::ErrorKind::Utf8 { err, .. } => format!("not UTF-8 text: {err}"),
        csv::ErrorKind::Io(e) => format!("read error: {e}"),
        _ => e.to_string(),
    }
}
