//! The resumable training-batch cursor: a seeded shuffle per epoch, and a position that
//! survives a save and restore.

use super::Sequences;
use crate::data::Batch;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Yields training batches: the indices of every epoch's sequences in a shuffled order,
/// `batch` at a time.
///
/// Epoch `k` visits every sequence once, in the permutation seeded by `seed + k`
/// (Fisher–Yates driven by SplitMix64, implemented here so that a seed gives the same
/// order on every platform and with every version of every crate). Batches are taken
/// from the epochs laid end to end, so when `batch` does not divide the number of
/// sequences, a batch spans two epochs; and a dataset smaller than a batch still fills
/// whole batches.
///
/// The cursor is its own state: it serializes (serde, e.g. to JSON in a checkpoint) to
/// its sizes, seed and [`position`](Self::position), and a restored cursor continues with
/// exactly the batches the saved one would have produced. A cursor deserialized with a
/// batch or size of 0 is refused; [`BatchCursor::next_batch`] refuses data of another
/// size than the cursor was made for.
///
/// ```
/// use lorafuse::text::BatchCursor;
/// let mut c = BatchCursor::new(10, 4, 42)?;
/// let first: Vec<Vec<usize>> = (0..3).map(|_| c.next_indices()).collect();
/// let saved = serde_json::to_string(&c).unwrap();
/// let mut restored: BatchCursor = serde_json::from_str(&saved).unwrap();
/// assert_eq!(restored.next_indices(), c.next_indices());
/// assert_eq!(first.concat().len(), 12); // epoch 0 (10 sequences) and 2 of epoch 1
/// # Ok::<(), lorafuse::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CursorState", into = "CursorState")]
pub struct BatchCursor {
    state: CursorState,
    /// The permutation of `state.epoch`.
    order: Vec<usize>,
}

/// The serialized form of a [`BatchCursor`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorState {
    n_sequences: usize,
    batch: usize,
    seed: u64,
    epoch: u64,
    offset: usize,
    batches_taken: u64,
}

/// Where a [`BatchCursor`] stands: the next sequence is entry `offset` of epoch `epoch`'s
/// permutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorPosition {
    /// The epoch of the next sequence (0-based).
    pub epoch: u64,
    /// How many of that epoch's sequences have been taken.
    pub offset: usize,
    /// Batches yielded so far.
    pub batches_taken: u64,
}

impl TryFrom<CursorState> for BatchCursor {
    type Error = String;

    fn try_from(state: CursorState) -> std::result::Result<Self, String> {
        if state.n_sequences == 0 || state.batch == 0 {
            return Err(format!(
                "batch cursor: n_sequences {} and batch {} must be at least 1",
                state.n_sequences, state.batch
            ));
        }
        if state.offset >= state.n_sequences {
            return Err(format!(
                "batch cursor: offset {} is not below n_sequences {}",
                state.offset, state.n_sequences
            ));
        }
        let order = permutation(state.n_sequences, epoch_seed(state.seed, state.epoch));
        Ok(BatchCursor { state, order })
    }
}

impl From<BatchCursor> for CursorState {
    fn from(c: BatchCursor) -> Self {
        c.state
    }
}

impl BatchCursor {
    /// A cursor at the start of epoch 0 over `n_sequences` training sequences, `batch` per
    /// batch. Both must be at least 1 ([`Error::InvalidArgument`]).
    pub fn new(n_sequences: usize, batch: usize, seed: u64) -> Result<Self> {
        if batch == 0 {
            return Err(Error::invalid("the batch size must be at least 1"));
        }
        if n_sequences == 0 {
            return Err(Error::invalid("no training sequence to draw batches from"));
        }
        BatchCursor::try_from(CursorState {
            n_sequences,
            batch,
            seed,
            epoch: 0,
            offset: 0,
            batches_taken: 0,
        })
        .map_err(Error::InvalidArgument)
    }

    /// The sequence indices of the next batch (always `batch` of them).
    pub fn next_indices(&mut self) -> Vec<usize> {
        let s = &mut self.state;
        let mut out = Vec::with_capacity(s.batch);
        while out.len() < s.batch {
            let take = (s.batch - out.len()).min(s.n_sequences - s.offset);
            out.extend_from_slice(&self.order[s.offset..s.offset + take]);
            s.offset += take;
            if s.offset == s.n_sequences {
                s.epoch += 1;
                s.offset = 0;
                self.order = permutation(s.n_sequences, epoch_seed(s.seed, s.epoch));
            }
        }
        s.batches_taken += 1;
        out
    }

    /// The next training batch of `data` (the sequences this cursor was made for: an
    /// error if their number differs, e.g. a resumed run given other data).
    pub fn next_batch(&mut self, data: &Sequences) -> Result<Batch> {
        if data.len() != self.state.n_sequences {
            return Err(Error::invalid(format!(
                "the batch cursor was made for {} training sequences, the data has {} \
                 (different data or sequence length than the run being resumed?)",
                self.state.n_sequences,
                data.len()
            )));
        }
        Ok(data.gather(&self.next_indices()))
    }

    /// Where the cursor stands.
    pub fn position(&self) -> CursorPosition {
        CursorPosition {
            epoch: self.state.epoch,
            offset: self.state.offset,
            batches_taken: self.state.batches_taken,
        }
    }

    /// Epochs done, fractional (for progress reports).
    pub fn epochs(&self) -> f64 {
        self.state.epoch as f64 + self.state.offset as f64 / self.state.n_sequences as f64
    }

    /// Sequences per batch.
    pub fn batch(&self) -> usize {
        self.state.batch
    }

    /// Number of training sequences the cursor draws from.
    pub fn n_sequences(&self) -> usize {
        self.state.n_sequences
    }

    /// The seed of epoch 0's permutation.
    pub fn seed(&self) -> u64 {
        self.state.seed
    }
}

fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_add(epoch)
}

/// A permutation of `0..n`, a pure function of `(n, seed)`: Fisher–Yates with SplitMix64.
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // Uniform in 0..=i by multiply-shift (bias below i / 2^64).
        let j = ((next() as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{Example, pack};

    #[test]
    fn permutation_is_a_fixed_function_of_the_seed() {
        let p = permutation(50, 9);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(p, permutation(50, 9));
        assert_ne!(p, permutation(50, 10));
        assert_ne!(p, sorted);
        assert!(permutation(0, 1).is_empty());
        assert_eq!(permutation(1, 1), [0]);
    }

    #[test]
    fn each_epoch_is_the_permutation_of_seed_plus_k() {
        let mut c = BatchCursor::new(6, 4, 100).unwrap();
        let got: Vec<usize> = (0..6).flat_map(|_| c.next_indices()).collect(); // 24 = 4 epochs
        let want: Vec<usize> = (0..4).flat_map(|k| permutation(6, 100 + k)).collect();
        assert_eq!(got, want);
        assert_eq!(
            c.position(),
            CursorPosition {
                epoch: 4,
                offset: 0,
                batches_taken: 6
            }
        );
        // Successive epochs differ (for this seed).
        assert_ne!(permutation(6, 100), permutation(6, 101));
    }

    #[test]
    fn a_batch_larger_than_the_data_spans_epochs() {
        let mut c = BatchCursor::new(3, 7, 5).unwrap();
        let b = c.next_indices();
        assert_eq!(b.len(), 7);
        let want: Vec<usize> = (0..3).flat_map(|k| permutation(3, 5 + k)).take(7).collect();
        assert_eq!(b, want);
        assert_eq!((c.position().epoch, c.position().offset), (2, 1));
        assert!((c.epochs() - (2.0 + 1.0 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn resume_from_json_continues_with_the_same_batches() {
        let ids: Vec<u32> = (0..(13 * 4 + 1)).collect();
        let data = pack(
            &[Example {
                loss: vec![true; ids.len()],
                ids,
            }],
            4,
            0,
        )
        .unwrap();
        assert_eq!(data.len(), 13);
        for (n, m) in [(0, 5), (3, 9), (7, 1), (13, 13)] {
            let mut fresh = BatchCursor::new(13, 5, 77).unwrap();
            let all: Vec<Batch> = (0..n + m)
                .map(|_| fresh.next_batch(&data).unwrap())
                .collect();

            let mut c = BatchCursor::new(13, 5, 77).unwrap();
            for _ in 0..n {
                c.next_batch(&data).unwrap();
            }
            let json = serde_json::to_string(&c).unwrap();
            drop(c);
            let mut restored: BatchCursor = serde_json::from_str(&json).unwrap();
            assert_eq!(restored.position().batches_taken, n as u64);
            let rest: Vec<Batch> = (0..m)
                .map(|_| restored.next_batch(&data).unwrap())
                .collect();
            assert_eq!(rest, all[n..], "n {n} m {m}");
            assert_eq!(restored, fresh);
        }
    }

    #[test]
    fn bad_sizes_and_bad_state_are_refused() {
        assert!(
            matches!(BatchCursor::new(4, 0, 1), Err(Error::InvalidArgument(m)) if m.contains("batch size"))
        );
        assert!(
            matches!(BatchCursor::new(0, 2, 1), Err(Error::InvalidArgument(m)) if m.contains("no training sequence"))
        );
        let ok = r#"{"n_sequences":4,"batch":2,"seed":1,"epoch":3,"offset":1,"batches_taken":7}"#;
        let c: BatchCursor = serde_json::from_str(ok).unwrap();
        assert_eq!(
            c.position(),
            CursorPosition {
                epoch: 3,
                offset: 1,
                batches_taken: 7
            }
        );
        for (bad, why) in [
            (
                r#"{"n_sequences":4,"batch":0,"seed":1,"epoch":0,"offset":0,"batches_taken":0}"#,
                "must be at least 1",
            ),
            (
                r#"{"n_sequences":4,"batch":2,"seed":1,"epoch":0,"offset":4,"batches_taken":0}"#,
                "offset 4",
            ),
            (
                r#"{"n_sequences":4,"batch":2,"seed":1,"epoch":0,"offset":0}"#,
                "batches_taken",
            ),
            (
                r#"{"n_sequences":4,"batch":2,"seed":1,"epoch":0,"offset":0,"batches_taken":0,"x":1}"#,
                "unknown field",
            ),
        ] {
            let e = serde_json::from_str::<BatchCursor>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Other data than the cursor's.
        let ids: Vec<u32> = (0..9).collect();
        let data = pack(
            &[Example {
                loss: vec![true; 9],
                ids,
            }],
            4,
            0,
        )
        .unwrap();
        let mut c = BatchCursor::new(3, 2, 0).unwrap();
        let e = c.next_batch(&data).unwrap_err().to_string();
        assert!(
            e.contains("made for 3 training sequences, the data has 2"),
            "{e}"
        );
    }
}
