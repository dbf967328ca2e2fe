//! Train-step bench (in progress).
fn main() {}
