//! Persistence benchmarks (placeholder while the harness is written).
fn main() {}
