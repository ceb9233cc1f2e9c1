//! CSV tables: labels by name or last, numeric ids or sorted class names, quoting, fills, and
//! every malformed file refused with its line and column named.

use mp_data::Error;
use mp_data::tabular::{CsvOptions, parse_csv, read_csv};

fn parse(text: &str, options: &CsvOptions) -> mp_data::Result<mp_data::tabular::Table> {
    parse_csv("t.csv", text.as_bytes(), options)
}

fn message(text: &str, options: &CsvOptions) -> String {
    parse(text, options).unwrap_err().to_string()
}

#[test]
fn numeric_labels_by_name_keep_the_features_in_file_order() {
    let text = "a,label,b,c\n1,2,3,4\n5,0,6.5,-7e-3\n-8,1,9,10\n";
    let t = parse(text, &CsvOptions::default().label_column("label")).unwrap();
    assert_eq!(t.feature_names, ["a", "b", "c"]);
    assert_eq!(t.label_name, "label");
    assert_eq!(t.features.shape(), &[3, 3]);
    assert_eq!(t.features.row(1).to_vec(), vec![5.0, 6.5, -7e-3]);
    assert_eq!(t.labels.to_vec(), vec![2, 0, 1]);
    assert_eq!(t.class_names, None);
    assert_eq!(t.num_classes(), 3);
}

#[test]
fn text_labels_become_ids_in_sorted_order() {
    // The last column by default; quoted cells may hold the delimiter.
    let text = "x,y,kind\n1,2,\"b, the second\"\n3,4,a\n5,6,\"b, the second\"\n7,8,c\n";
    let t = parse(text, &CsvOptions::default()).unwrap();
    assert_eq!(t.labels.to_vec(), vec![1, 0, 1, 2]);
    let names = t.class_names.clone().unwrap();
    assert_eq!(names, ["a", "b, the second", "c"]);
    assert_eq!(t.num_classes(), 3);
    // A label that is not a whole number makes every label a class name.
    let t = parse("x,y\n1,0\n2,1.5\n3,1\n", &CsvOptions::default()).unwrap();
    assert_eq!(t.class_names.unwrap(), ["0", "1", "1.5"]);
    assert_eq!(t.labels.to_vec(), vec![0, 2, 1]);
}

#[test]
fn other_delimiters_spaces_and_non_finite_values() {
    let text = "f1;f2;y\n 1.5 ; nan ;0\ninf;-2;1\n";
    let t = parse(text, &CsvOptions::default().delimiter(b';')).unwrap();
    assert_eq!(t.features[[0, 0]], 1.5);
    assert!(t.features[[0, 1]].is_nan());
    assert_eq!(t.features[[1, 0]], f32::INFINITY);
    let ds = t.into_dataset().unwrap();
    assert_eq!(ds.len(), 2);
}

#[test]
fn missing_values_are_named_unless_filled() {
    let text = "a,b,y\n1,2,0\n3,,1\n";
    assert_eq!(
        message(text, &CsvOptions::default()),
        "t.csv: line 3, column \"b\": missing value (give CsvOptions::fill to fill it)"
    );
    let t = parse(text, &CsvOptions::default().fill(-1.0)).unwrap();
    assert_eq!(t.features.row(1).to_vec(), vec![3.0, -1.0]);
    // A missing label is never filled.
    assert_eq!(
        message("a,y\n1,0\n2,\n", &CsvOptions::default().fill(0.0)),
        "t.csv: line 3, column \"y\": missing label"
    );
}

#[test]
fn malformed_files_are_errors_naming_line_and_column() {
    let o = CsvOptions::default();
    assert_eq!(
        message("a,b,y\n1,2,0\n3,x7,1\n", &o),
        "t.csv: line 3, column \"b\": \"x7\" is not a number"
    );
    let ragged = message("a,b,y\n1,2,0\n3,4\n", &o);
    assert!(
        ragged.starts_with("t.csv: line 3: 2 cells where the header has 3"),
        "{ragged}"
    );
    let extra = message("a,b,y\n1,2,0,9\n", &o);
    assert!(extra.starts_with("t.csv: line 2: 4 cells"), "{extra}");
    assert_eq!(
        message(
            "a,b,y\n1,2,0\n",
            &CsvOptions::default().label_column("label")
        ),
        "t.csv: line 1: no label column \"label\"; the header's columns are [\"a\", \"b\", \"y\"]"
    );
    assert_eq!(
        message("", &o),
        "t.csv: line 1: no header row (the file is empty)"
    );
    assert!(
        message("y\n1\n", &o).contains("a table needs a label column and at least one feature")
    );
    let bad_utf8 = parse_csv("t.csv", b"a,y\n1,\xff\n", &o)
        .unwrap_err()
        .to_string();
    assert!(
        bad_utf8.starts_with("t.csv: line 2: not UTF-8"),
        "{bad_utf8}"
    );
    // A header alone is an empty table, not an error.
    let t = parse("a,b,y\n", &o).unwrap();
    assert_eq!((t.features.shape(), t.labels.len()), (&[0, 2][..], 0));
}

#[test]
fn files_are_read_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iris.csv");
    std::fs::write(&path, "l,w,species\n5.1,3.5,setosa\n7.0,3.2,versicolor\n").unwrap();
    let t = read_csv(&path, &CsvOptions::default()).unwrap();
    assert_eq!(t.labels.to_vec(), vec![0, 1]);
    let missing = dir.path().join("nope.csv");
    let err = read_csv(&missing, &CsvOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("nope.csv"), "{err}");
    // An error in a file names the file's path.
    std::fs::write(&path, "l,w,species\n5.1,,setosa\n").unwrap();
    let err = read_csv(&path, &CsvOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: line 2", path.display())),
        "{err}"
    );
}
