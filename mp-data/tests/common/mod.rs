//! Helpers shared by the integration tests: tiny IDX files, gzip, and a loopback HTTP server.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use mp_data::mnist::Manifest;
use mp_data::{FileSpec, Source, sha256_hex};

/// A raw IDX image file of `n` images of `rows` x `cols` pixels, pixel `i` holding `i * 7 + seed`.
pub fn images(n: u32, rows: u32, cols: u32, seed: u8) -> Vec<u8> {
    let mut v = header(0x803, &[n, rows, cols]);
    let len = (n * rows * cols) as usize;
    v.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    v
}

/// A raw IDX label file.
pub fn labels(values: &[u8]) -> Vec<u8> {
    let mut v = header(0x801, &[values.len() as u32]);
    v.extend_from_slice(values);
    v
}

/// An IDX header: magic then dimensions, big-endian.
pub fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A tiny MNIST-shaped dataset: (name, raw bytes) for train images (3 of 2x2), train labels,
/// test images (2 of 2x2), test labels, in manifest order.
pub fn tiny_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("tiny-train-images".into(), images(3, 2, 2, 1)),
        ("tiny-train-labels".into(), labels(&[5, 0, 4])),
        ("tiny-test-images".into(), images(2, 2, 2, 9)),
        ("tiny-test-labels".into(), labels(&[7, 2])),
    ]
}

/// The manifest of `files` (pinned to their digests) with `sources`.
pub fn manifest(files: &[(String, Vec<u8>)], sources: Vec<Source>) -> Manifest {
    let spec = |i: usize| FileSpec::new(files[i].0.clone(), sha256_hex(&files[i].1));
    Manifest {
        train_images: spec(0),
        train_labels: spec(1),
        test_images: spec(2),
        test_labels: spec(3),
        sources,
    }
}

/// What the loopback server answers for a path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Ok(Vec<u8>),
    /// 404.
    NotFound,
    /// 200 announcing the whole body's length, then only its first `n` bytes and a close.
    CutAt(Vec<u8>, usize),
    /// Accepts and reads the request, then never answers.
    Hang,
}

/// A loopback HTTP/1.1 server on 127.0.0.1 (one thread per connection, `Connection: close`),
/// recording the paths requested. It lives until the test process exits.
#[derive(Debug, Clone)]
pub struct Server {
    pub base_url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Serves `routes` (path -> reply); other paths get 404.
    pub fn start(routes: HashMap<String, Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let routes = Arc::new(routes);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let routes = routes.clone();
                let log = log.clone();
                thread::spawn(move || serve(stream, &routes, &log));
            }
        });
        Server { base_url, requests }
    }

    /// Serves each `(name, body)` at `/<name>.gz` as `Reply::Ok`.
    pub fn files(files: &[(String, Vec<u8>)]) -> Server {
        Server::start(
            files
                .iter()
                .map(|(n, b)| (format!("/{n}.gz"), Reply::Ok(b.clone())))
                .collect(),
        )
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, routes: &HashMap<String, Reply>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    log.lock().unwrap().push(path.clone());
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let _ = match routes.get(&path) {
        Some(Reply::Ok(body)) => stream
            .write_all(head("200 OK", body.len()).as_bytes())
            .and_then(|()| stream.write_all(body)),
        Some(Reply::CutAt(body, n)) => stream
            .write_all(head("200 OK", body.len()).as_bytes())
            .and_then(|()| stream.write_all(&body[..*n])),
        Some(Reply::Hang) => {
            thread::sleep(Duration::from_secs(30));
            Ok(())
        }
        Some(Reply::NotFound) | None => stream
            .write_all(head("404 Not Found", 9).as_bytes())
            .and_then(|()| stream.write_all(b"not found")),
    };
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A base URL on which nothing listens (connection refused at once).
pub fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/")
}

/// A mirror source with a short timeout.
pub fn mirror(base_url: &str) -> Source {
    Source::Mirror {
        base_url: base_url.to_string(),
        timeout: Duration::from_secs(2),
    }
}

/// The names of the files in `dir` (sorted).
pub fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
