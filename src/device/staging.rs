//! The slot logic of the CUDA backend's pinned staging ring for host→device uploads.
//!
//! A synchronous `cuMemcpyHtoD` from pageable memory first waits for the stream to drain,
//! so a training step that uploads its tokens, targets or a descriptor table would wait
//! for the previous step's kernels: host and device never overlap. Instead the backend
//! copies a small upload into one slot of a page-locked buffer and queues
//! `cuMemcpyHtoDAsync` from it on its stream, then records a fence (a CUDA event) after
//! the copy. A slot is written again only once the fence of its previous copy has
//! completed. This struct is that bookkeeping, generic over the fence so that it is
//! tested on the CPU; `cuda.rs` owns the pinned memory and the events.

/// Round-robin slots of `slot_bytes` each, with the fence recorded after each slot's last
/// queued copy.
#[derive(Debug)]
pub(crate) struct StagingRing<F> {
    /// Bytes per slot: the largest upload the ring takes.
    slot_bytes: usize,
    /// Per slot: the fence after the last copy queued from it (`None`: never used).
    fences: Vec<Option<F>>,
    /// The slot the next upload takes.
    next: usize,
}

impl<F> StagingRing<F> {
    /// `slots` slots (at least 1) of `slot_bytes` each.
    pub(crate) fn new(slots: usize, slot_bytes: usize) -> Self {
        StagingRing {
            slot_bytes,
            fences: (0..slots.max(1)).map(|_| None).collect(),
            next: 0,
        }
    }

    /// Bytes per slot.
    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Slots.
    pub(crate) fn slots(&self) -> usize {
        self.fences.len()
    }

    /// The byte offset of `slot` in the ring's buffer.
    pub(crate) fn offset(&self, slot: usize) -> usize {
        slot * self.slot_bytes
    }

    /// Takes the next slot (round robin) for an upload of `len` bytes, with the fence of
    /// the copy last queued from it, which must have completed before the slot is
    /// written. `None` when the upload is empty or larger than a slot (the caller copies
    /// it another way). Every taken slot must be given back with [`Self::queued`] (or
    /// [`Self::abandon`] if no copy was queued).
    pub(crate) fn acquire(&mut self, len: usize) -> Option<(usize, Option<F>)> {
        if len == 0 || len > self.slot_bytes {
            return None;
        }
        let slot = self.next;
        self.next = (self.next + 1) % self.fences.len();
        Some((slot, self.fences[slot].take()))
    }

    /// Records that a copy from `slot` was queued and that `fence` completes after it.
    pub(crate) fn queued(&mut self, slot: usize, fence: F) {
        self.fences[slot] = Some(fence);
    }

    /// Every recorded fence, leaving the ring as new (to wait for them all before the
    /// ring's memory is freed).
    pub(crate) fn take_fences(&mut self) -> Vec<F> {
        self.next = 0;
        self.fences.iter_mut().filter_map(Option::take).collect()
    }

    /// Gives `slot` back with the fence [`Self::acquire`] returned for it, when no new
    /// copy was queued from it (e.g. waiting for that fence failed).
    pub(crate) fn abandon(&mut self, slot: usize, fence: Option<F>) {
        self.fences[slot] = fence;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_round_and_each_waits_for_its_own_last_copy() {
        let mut ring: StagingRing<u32> = StagingRing::new(3, 64);
        assert_eq!((ring.slots(), ring.slot_bytes()), (3, 64));
        assert_eq!(
            [0, 1, 2].map(|s| ring.offset(s)),
            [0, 64, 128],
            "slots tile the buffer"
        );
        // First round: fresh slots have nothing to wait for.
        for (copy, want_slot) in [(10, 0), (11, 1), (12, 2)] {
            let (slot, wait) = ring.acquire(8).unwrap();
            assert_eq!((slot, wait), (want_slot, None));
            ring.queued(slot, copy);
        }
        // Second round: each slot hands back the fence of the copy queued from it.
        for (copy, want_slot, want_wait) in [(20, 0, 10), (21, 1, 11), (22, 2, 12), (30, 0, 20)] {
            let (slot, wait) = ring.acquire(64).unwrap();
            assert_eq!((slot, wait), (want_slot, Some(want_wait)));
            ring.queued(slot, copy);
        }
    }

    #[test]
    fn empty_and_oversized_uploads_take_no_slot() {
        let mut ring: StagingRing<u32> = StagingRing::new(2, 64);
        assert_eq!(ring.acquire(0), None);
        assert_eq!(ring.acquire(65), None);
        // Neither moved the ring.
        assert_eq!(ring.acquire(1), Some((0, None)));
    }

    #[test]
    fn an_abandoned_slot_keeps_its_fence() {
        let mut ring: StagingRing<u32> = StagingRing::new(1, 16);
        let (slot, none) = ring.acquire(4).unwrap();
        ring.queued(slot, 7);
        // Waiting for fence 7 failed: no copy was queued, the fence stays.
        let (slot, seven) = ring.acquire(4).unwrap();
        assert_eq!(seven, Some(7));
        ring.abandon(slot, seven);
        assert_eq!(ring.acquire(4), Some((0, Some(7))));
        ring.queued(0, 8);
        assert_eq!(none, None);
        // Taking every fence (before freeing the ring) leaves it as new.
        assert_eq!(ring.take_fences(), vec![8]);
        assert_eq!(ring.acquire(4), Some((0, None)));
        // A ring of zero slots is one slot.
        assert_eq!(StagingRing::<u32>::new(0, 8).slots(), 1);
    }
}
