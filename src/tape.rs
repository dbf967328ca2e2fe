//! The autograd tape: each op records a backward closure next to its forward; backward
//! replays them in reverse, accumulating gradients.

use crate::tensor::TensorId;
use crate::{Error, Result, Tensor, ops};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

type BackwardFn = Box<dyn FnOnce(&mut Gradients) -> Result<()>>;

struct Node {
    op: &'static str,
    backward: BackwardFn,
}

/// A record of the ops applied to tracked tensors, for one backward pass.
///
/// Make one per step, [`Tensor::track`] the parameters that train, run the forward,
/// then call [`Tape::backward`] on the loss. Tensors that are not tracked (frozen
/// weights, data) and everything computed only from them record nothing.
#[derive(Clone, Default)]
pub struct Tape {
    nodes: Rc<RefCell<Vec<Node>>>,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tape({} nodes)", self.len())
    }
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Number of recorded ops.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of the recorded ops, in order.
    pub fn op_names(&self) -> Vec<&'static str> {
        self.nodes.borrow().iter().map(|n| n.op).collect()
    }

    /// True when both handles are the same tape.
    pub fn same(&self, other: &Tape) -> bool {
        Rc::ptr_eq(&self.nodes, &other.nodes)
    }

    /// The tape shared by the tracked inputs of an op (`None` when no input is tracked).
    pub(crate) fn of(op: &'static str, inputs: &[&Tensor]) -> Result<Option<Tape>> {
        let mut found: Option<&Tape> = None;
        for t in inputs {
            if let Some(tt) = t.tape() {
                match found {
                    None => found = Some(tt),
                    Some(f) if f.same(tt) => {}
                    Some(_) => return Err(Error::TapeMismatch { op }),
                }
            }
        }
        Ok(found.cloned())
    }

    /// Records an op's backward.
    pub(crate) fn push(
        &self,
        op: &'static str,
        backward: impl FnOnce(&mut Gradients) -> Result<()> + 'static,
    ) {
        self.nodes.borrow_mut().push(Node {
            op,
            backward: Box::new(backward),
        });
    }

    /// Backward from a scalar loss, seeded with 1. Consumes the recorded ops.
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        self.backward_scaled(loss, 1.0)
    }

    /// Backward from a scalar loss seeded with `scale` (loss scaling for f16 training).
    pub fn backward_scaled(&self, loss: &Tensor, scale: f64) -> Result<Gradients> {
        if loss.elem_count() != 1 {
            return Err(Error::shape(
                "backward",
                format!("the loss must have one element, got {}", loss.shape()),
            ));
        }
        let seed = Tensor::full(scale, loss.shape().clone(), loss.dtype(), &loss.device())?;
        self.backward_with(loss, seed)
    }

    /// Backward from any output, seeded with `seed` (same shape as `out`). Consumes the
    /// recorded ops. The result holds the gradients of every tracked leaf.
    pub fn backward_with(&self, out: &Tensor, seed: Tensor) -> Result<Gradients> {
        match out.tape() {
            Some(t) if t.same(self) => {}
            _ => {
                return Err(Error::invalid(
                    "backward: the output is not recorded on this tape",
                ));
            }
        }
        Error::check_same_shape("backward", out.shape(), seed.shape())?;
        let mut grads = Gradients::default();
        grads.map.insert(out.id(), seed.detach());
        let nodes = std::mem::take(&mut *self.nodes.borrow_mut());
        for node in nodes.into_iter().rev() {
            (node.backward)(&mut grads)?;
        }
        Ok(grads)
    }
}

/// Gradients by tensor id, produced by [`Tape::backward`].
///
/// A gradient has its tensor's shape and dtype (accumulation inside each op is f32 or
/// f64). Ops consume the gradients of their outputs as they run, so after backward it
/// holds the gradients of the tracked leaves.
#[derive(Default, Debug)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of `t`, if it got one.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    /// The gradient by id.
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.map.get(&id)
    }

    /// Removes and returns the gradient of `t`.
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Inserts or replaces a gradient (for callers that build gradients by hand, e.g. tests).
    pub fn insert(&mut self, t: &Tensor, grad: Tensor) -> Result<()> {
        Error::check_same_shape("gradients.insert", t.shape(), grad.shape())?;
        self.map.insert(t.id(), grad.detach());
        Ok(())
    }

    /// Takes the gradient of an op's output (`None` when nothing flowed back to it).
    pub(crate) fn take_output(&mut self, out: crate::tensor::TensorId) -> Option<Tensor> {
        self.map.remove(&out)
    }

    /// Adds `grad` into the gradient of `input`; does nothing for an untracked input.
    pub(crate) fn accumulate(&mut self, input: &Tensor, grad: Tensor) -> Result<()> {
        if !input.requires_grad() {
            return Ok(());
        }
        Error::check_same_shape("accumulate", input.shape(), grad.shape())?;
        let grad = if grad.dtype() != input.dtype() {
            grad.to_dtype(input.dtype())?
        } else {
            grad
        };
        self.accumulate_id(input.id(), grad)
    }

    /// [`Gradients::accumulate`] by the input's id, for an op that does not keep its input
    /// alive until the backward: `grad` must already have the input's shape and dtype, and
    /// the input must need a gradient (checked by the op when it recorded itself).
    pub(crate) fn accumulate_id(&mut self, id: TensorId, grad: Tensor) -> Result<()> {
        match self.map.get(&id) {
            None => {
                self.map.insert(id, grad.detach());
            }
            // Out of place: gradients may alias (add's backward hands the same tensor to
            // both inputs), so an existing gradient is never written through.
            Some(existing) => {
                let sum = ops::add(&existing.detach(), &grad)?;
                self.map.insert(id, sum);
            }
        }
        Ok(())
    }
}
