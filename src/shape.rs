//! Tensor shapes (row-major, contiguous).

use crate::{Error, Result};
use std::fmt;

/// The dimensions of a contiguous row-major tensor.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar of rank 0).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// The size of the last dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// The dimensions of a rank-1 shape, or a shape error naming `op`.
    pub fn dims1(&self, op: &'static str) -> Result<usize> {
        match self.0.as_slice() {
            &[a] => Ok(a),
            _ => Err(Error::shape(op, format!("expected rank 1, got {self}"))),
        }
    }

    /// The dimensions of a rank-2 shape, or a shape error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.0.as_slice() {
            &[a, b] => Ok((a, b)),
            _ => Err(Error::shape(op, format!("expected rank 2, got {self}"))),
        }
    }

    /// The dimensions of a rank-3 shape, or a shape error naming `op`.
    pub fn dims3(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        match self.0.as_slice() {
            &[a, b, c] => Ok((a, b, c)),
            _ => Err(Error::shape(op, format!("expected rank 3, got {self}"))),
        }
    }

    /// Views any shape of rank ≥ 1 as `[rows, last]`.
    pub fn as_rows(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.0.split_last() {
            Some((&c, rest)) => Ok((rest.iter().product(), c)),
            None => Err(Error::shape(op, "expected rank >= 1, got a scalar")),
        }
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<usize> for Shape {
    fn from(v: usize) -> Self {
        Shape(vec![v])
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
