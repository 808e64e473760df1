//! Placeholder replaced by the service benchmark.
fn main() {}
