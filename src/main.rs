//! The lorafuse demo (in progress).
fn main() {}
