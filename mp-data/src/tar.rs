//! A small streaming reader for tar archives (ustar, with pax and GNU long names), enough to take
//! regular files out of an npm tarball. Every size is checked against a limit and against the
//! bytes actually present; nothing is allocated from a header's word alone.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::idx::read_growing;

const BLOCK: u64 = 512;
/// The most a pax header or GNU long name may hold.
const META_LIMIT: u64 = 1 << 20;

/// Reads the tar stream `reader` (named `name` in errors) and returns `(path, contents)` of each
/// regular file for which `wanted(path)` is true, in archive order. A file larger than `limit`
/// is an error.
pub(crate) fn extract(
    name: &str,
    mut reader: impl Read,
    mut wanted: impl FnMut(&str) -> bool,
    limit: u64,
) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |what: String| Error::Tar {
        file: name.to_string(),
        what,
    };
    let io_err = |e: io::Error| bad(format!("read error: {e}"));
    let mut found = Vec::new();
    let mut long_name: Option<String> = None;
    loop {
        let mut header = [0u8; BLOCK as usize];
        let got = read_full(&mut reader, &mut header).map_err(io_err)?;
        if got == 0 || header.iter().all(|&b| b == 0) {
            // End of archive (two zero blocks, or a stream that simply stops between entries).
            return Ok(found);
        }
        if got < header.len() {
            return Err(bad(format!("truncated header ({got} of 512 bytes)")));
        }
        check_checksum(&header).map_err(&bad)?;
        let size = parse_size(&header[124..136]).map_err(&bad)?;
        let path = match long_name.take() {
            Some(p) => p,
            None => header_path(&header),
        };
        let padded = size.div_ceil(BLOCK) * BLOCK;
        match header[156] {
            b'0' | 0 | b'7' if wanted(&path) => {
                if size > limit {
                    return Err(bad(format!(
                        "entry {path} holds {size} bytes, over the {limit}-byte limit"
                    )));
                }
                let data = read_exact_len(&mut reader, size)
                    .map_err(io_err)?
                    .ok_or_else(|| bad(format!("entry {path} is truncated")))?;
                skip(&mut reader, padded - size).map_err(io_err)?;
                found.push((path, data));
            }
            kind @ (b'x' | b'L') => {
                if size > META_LIMIT {
                    return Err(bad(format!("a {size}-byte long-name header")));
                }
                let data = read_exact_len(&mut reader, size)
                    .map_err(io_err)?
                    .ok_or_else(|| bad("truncated long-name header".to_string()))?;
                skip(&mut reader, padded - size).map_err(io_err)?;
                long_name = if kind == b'x' {
                    pax_path(&data)
                } else {
                    Some(c_string(&data))
                };
            }
            _ => {
                if !skip(&mut reader, padded).map_err(io_err)? {
                    return Err(bad(format!("entry {path} is truncated")));
                }
            }
        }
    }
}

/// The entry's path: ustar's prefix joined to its name.
fn header_path(header: &[u8; 512]) -> String {
    let name = c_string(&header[0..100]);
    if &header[257..262] == b"ustar" {
        let prefix = c_string(&header[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// The `path` record of a pax extended header (`"<len> path=<value>\n"` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|record| {
        let (_, kv) = record.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A size field: octal digits (space/NUL padded), or base-256 when the high bit is set.
fn parse_size(field: &[u8]) -> std::result::Result<u64, String> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or("entry size overflows")?;
        }
        return Ok(v);
    }
    parse_octal(field).ok_or_else(|| format!("bad size field {:?}", c_string(field)))
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = c_string(field);
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The header checksum: the sum of its bytes with the checksum field read as spaces.
fn check_checksum(header: &[u8; 512]) -> std::result::Result<(), String> {
    let stored = parse_octal(&header[148..156]).ok_or("bad checksum field")?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum == stored {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {sum}): not a tar archive?"
        ))
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads exactly `len` bytes (growing the buffer as they arrive); `None` if the stream ends first.
fn read_exact_len(reader: &mut impl Read, len: u64) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    read_growing(&mut reader.take(len), &mut out)?;
    Ok((out.len() as u64 == len).then_some(out))
}

/// Skips `len` bytes; false if the stream ends first.
fn skip(reader: &mut impl Read, len: u64) -> io::Result<bool> {
    Ok(io::copy(&mut reader.take(len), &mut io::sink())? == len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a ustar archive of regular files (test helper, also used by the npm tests).
    pub(crate) fn build(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, data) in entries {
            out.extend_from_slice(&header(path, data.len() as u64, b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn header(path: &str, size: u64, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    #[test]
    fn extracts_wanted_files() {
        let tar = build(&[
            ("package/a.txt", b"hello"),
            ("package/data/b", &[1u8; 700]),
            ("package/c", b""),
        ]);
        let got = extract(
            "t.tar",
            &tar[..],
            |p| p.ends_with("/b") || p.ends_with("/c"),
            1000,
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "package/data/b");
        assert_eq!(got[0].1, vec![1u8; 700]);
        assert_eq!(got[1], ("package/c".to_string(), vec![]));
    }

    #[test]
    fn pax_path_overrides_the_next_entry() {
        let record = b"26 path=package/long/name\n";
        let mut tar = header("PaxHeader", record.len() as u64, b'x').to_vec();
        tar.extend_from_slice(record);
        tar.resize(1024, 0);
        tar.extend_from_slice(&build(&[("short", b"xyz")]));
        let got = extract("t.tar", &tar[..], |_| true, 100).unwrap();
        assert_eq!(
            got,
            vec![("package/long/name".to_string(), b"xyz".to_vec())]
        );
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let tar = build(&[("package/data/b", &[1u8; 700])]);
        let e = extract("t.tar", &tar[..800], |_| true, 1000).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = extract("t.tar", &[7u8; 600][..], |_| true, 1000).unwrap_err();
        assert!(e.to_string().contains("t.tar"), "{e}");
        let e = extract("t.tar", &tar[..], |_| true, 10).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
