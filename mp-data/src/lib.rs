//! # mp-data
//!
//! IDX parsing (raw and gzip), MNIST `load_data` with a checksummed cache and fetch, and
//! `Dataset` (slices, shuffle, batch, split) handing out host arrays. Filled by the data issue.
