//! Runnable examples of mp: see `src/bin/`.
