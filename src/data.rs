//! Synthetic tasks for the demo: a pretraining task A and a fine-tuning task B that is a
//! shift of A, so a LoRA adapter on an A-pretrained model learns B cheaply.
//!
//! # Vocabulary
//!
//! Content symbols are the token ids `0..n` (`n` = [`TaskGen::n_symbols`], 2 to
//! [`MAX_SYMBOLS`] = 64, default [`DEFAULT_SYMBOLS`] = 32). Two special tokens follow:
//! [`SEP`] = 64 and [`PAD`] = 65, so any model with `vocab_size >= `[`MIN_VOCAB`] (66)
//! can read every sequence. The generator never emits `PAD`; it is reserved for callers
//! that pad sequences to a longer context.
//!
//! # Sequence format
//!
//! Every sequence has `T = 2k + 1` tokens ([`TaskGen::seq_len`]): `k` input symbols drawn
//! independently and uniformly from `0..n`, `SEP`, then the `k`-symbol answer:
//!
//! ```text
//! position  0 .. k-1          k     k+1 .. 2k
//! token     x_0 .. x_{k-1}    SEP   y_0 .. y_{k-1}
//! ```
//!
//! - **Task A**: `y_j = π(x_j)` where `π` is a fixed pseudo-random permutation of `0..n`
//!   ([`Task::permutation`]; it depends on `n` only, never on a seed).
//! - **Task B**: `y_j = (π(x_j) + 1) mod n`: task A's answer with every symbol shifted by
//!   one. B differs from A at every answer position of every sample, yet the mechanism is
//!   the same (attend from position `k + j` back to position `j`, map the symbol): only
//!   the output relabelling changes, which is what a low-rank adapter can learn quickly.
//!
//! Both tasks are a per-token mapping with copying, learnable in seconds by a tiny GPT
//! (`d_model` 64–128, 2–4 layers) on a CPU for `k` around 8.
//!
//! # Targets
//!
//! [`Batch::targets`] holds next-token targets: `targets[t] = tokens[t + 1]` for `t` in
//! [`TaskGen::target_span`] `= k .. 2k` (the positions that predict the answer, `SEP`
//! included), and [`IGNORE_INDEX`] everywhere else (the inputs are random, so the loss
//! is on the answer only; the last position has no next token).
//!
//! # Evaluation
//!
//! Greedy decoding feeds the prompt `tokens[..k + 1]` ([`TaskGen::prompt_len`], inputs
//! and `SEP`), generates `k` tokens and compares them with `tokens[`[`TaskGen::answer_span`]`]`
//! using [`is_exact`]; [`TaskGen::exact_match_rate`] does the bookkeeping around a
//! caller-supplied decoder.
//!
//! # Held-out split
//!
//! The input sequences are split by a fixed hash of the symbols: about one in
//! [`HELDOUT_ONE_IN`] is held out ([`is_heldout`]). Training batches
//! ([`TaskGen::sample_batch`]) never contain a held-out input, for any seed, and
//! [`TaskGen::heldout`] draws only held-out inputs — so the two are disjoint by
//! construction, not by chance. A and B share the split.
//!
//! # Randomness
//!
//! Sampling uses SplitMix64 implemented here, so a seed gives the same data on every
//! platform and with every version of `rand`.
//!
//! ```
//! use lorafuse::data::{Task, TaskGen, SEP};
//! let mut tasks = TaskGen::new(Task::A, 8, 42)?;
//! let b = tasks.sample_batch(4);
//! assert_eq!((b.batch, b.seq), (4, 17));
//! let row = b.row(0);
//! assert_eq!(row[8], SEP);
//! assert_eq!(&row[tasks.answer_span()], tasks.answer(&row[..8]).as_slice());
//! # Ok::<(), lorafuse::Error>(())
//! ```

use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};
use std::ops::Range;

/// The largest number of content symbols (ids `0..64`).
pub const MAX_SYMBOLS: usize = 64;
/// The default number of content symbols.
pub const DEFAULT_SYMBOLS: usize = 32;
/// The separator between the input symbols and the answer.
pub const SEP: u32 = 64;
/// Padding (never emitted by the generator; reserved for callers).
pub const PAD: u32 = 65;
/// The smallest vocabulary that covers every token of these tasks.
pub const MIN_VOCAB: usize = 66;
/// About one input sequence in this many is held out.
pub const HELDOUT_ONE_IN: u64 = 16;
/// The fewest distinct input sequences (`n^k`) a generator accepts, so that both splits
/// are populated.
pub const MIN_INPUT_SPACE: u64 = 256;

/// Salts that keep the training and held-out streams of one seed apart.
const TRAIN_SALT: u64 = 0x7472_6169_6e5f_5f5f;
const HELDOUT_SALT: u64 = 0x6865_6c64_6f75_745f;
const PERM_SALT: u64 = 0x7065_726d_5f41_5f5f;
const SPLIT_SALT: u64 = 0x7370_6c69_745f_5f5f;

/// SplitMix64: a tiny, portable PRNG (Steele, Lea & Flood 2014).
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-58 for n <= 64).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The SplitMix64 output function (a bijective 64-bit mixer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Which task: A (pretraining) or B (fine-tuning, a shift of A).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    /// `y_j = π(x_j)`.
    A,
    /// `y_j = (π(x_j) + 1) mod n`.
    B,
}

impl Task {
    /// The task's symbol mapping over `0..n_symbols`: entry `x` is the answer symbol for
    /// input symbol `x`. Task A's is the fixed permutation `π` (Fisher–Yates driven by a
    /// constant seed mixed with `n_symbols`); task B's is `π` followed by `+1 mod n`.
    pub fn permutation(self, n_symbols: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n_symbols as u32).collect();
        let mut rng = SplitMix64(PERM_SALT ^ n_symbols as u64);
        for i in (1..n_symbols).rev() {
            let j = rng.below(i + 1);
            p.swap(i, j);
        }
        if self == Task::B {
            for y in &mut p {
                *y = (*y + 1) % n_symbols as u32;
            }
        }
        p
    }
}

/// True when `symbols` (an input sequence) belongs to the held-out split: a fixed hash of
/// the sequence is `0 mod `[`HELDOUT_ONE_IN`]. Depends on the symbols only, not on the
/// task or a seed.
pub fn is_heldout(symbols: &[u32]) -> bool {
    let mut h = mix(SPLIT_SALT ^ symbols.len() as u64);
    for &s in symbols {
        h = mix(h ^ s as u64);
    }
    h.is_multiple_of(HELDOUT_ONE_IN)
}

/// True when a predicted answer equals the target answer exactly (same length, every
/// token).
pub fn is_exact(pred_answer: &[u32], target_answer: &[u32]) -> bool {
    pred_answer == target_answer
}

/// A batch of sequences, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `batch * seq` token ids.
    pub tokens: Vec<u32>,
    /// `batch * seq` next-token targets: the next token inside the target span,
    /// [`IGNORE_INDEX`] elsewhere.
    pub targets: Vec<i32>,
    /// Number of sequences.
    pub batch: usize,
    /// Tokens per sequence (`2k + 1`).
    pub seq: usize,
}

impl Batch {
    /// The tokens of sequence `i` (panics when `i >= batch`, like slice indexing).
    pub fn row(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.seq..(i + 1) * self.seq]
    }

    /// The targets of sequence `i` (panics when `i >= batch`, like slice indexing).
    pub fn targets_row(&self, i: usize) -> &[i32] {
        &self.targets[i * self.seq..(i + 1) * self.seq]
    }
}

/// Generates sequences of one task (see the [module docs](self) for the format).
#[derive(Clone, Debug)]
pub struct TaskGen {
    task: Task,
    k: usize,
    n_symbols: usize,
    map: Vec<u32>,
    rng: SplitMix64,
}

impl TaskGen {
    /// A generator of `task` with `k` input symbols per sequence over
    /// [`DEFAULT_SYMBOLS`] symbols, training stream seeded by `seed`.
    pub fn new(task: Task, k: usize, seed: u64) -> Result<Self> {
        Self::with_symbols(task, k, DEFAULT_SYMBOLS, seed)
    }

    /// A generator over `n_symbols` content symbols (2 to [`MAX_SYMBOLS`]). Needs `k >= 1`
    /// and at least [`MIN_INPUT_SPACE`] distinct inputs (`n_symbols^k`), with both the
    /// training and the held-out split non-empty ([`Error::InvalidArgument`] otherwise).
    pub fn with_symbols(task: Task, k: usize, n_symbols: usize, seed: u64) -> Result<Self> {
        if k == 0 {
            return Err(Error::invalid("TaskGen: k must be at least 1"));
        }
        if !(2..=MAX_SYMBOLS).contains(&n_symbols) {
            return Err(Error::invalid(format!(
                "TaskGen: n_symbols {n_symbols} outside 2..={MAX_SYMBOLS}"
            )));
        }
        let space = (n_symbols as u64)
            .checked_pow(k.min(64) as u32)
            .unwrap_or(u64::MAX);
        if space < MIN_INPUT_SPACE {
            return Err(Error::invalid(format!(
                "TaskGen: {n_symbols}^{k} = {space} distinct inputs, need at least {MIN_INPUT_SPACE} \
                 to hold out a split"
            )));
        }
        // Small input spaces: check that both splits are populated (larger ones hold
        // thousands of held-out inputs).
        if space <= 1 << 16 {
            let mut x = vec![0u32; k];
            let mut held = 0u64;
            for _ in 0..space {
                held += is_heldout(&x) as u64;
                for s in x.iter_mut() {
                    *s += 1;
                    if (*s as usize) < n_symbols {
                        break;
                    }
                    *s = 0;
                }
            }
            if held == 0 || held == space {
                return Err(Error::invalid(format!(
                    "TaskGen: {n_symbols}^{k} inputs leave an empty split; use a larger k or n_symbols"
                )));
            }
        }
        Ok(TaskGen {
            task,
            k,
            n_symbols,
            map: task.permutation(n_symbols),
            rng: SplitMix64(seed ^ TRAIN_SALT),
        })
    }

    /// The task.
    pub fn task(&self) -> Task {
        self.task
    }

    /// Input symbols per sequence.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of content symbols (ids `0..n_symbols`).
    pub fn n_symbols(&self) -> usize {
        self.n_symbols
    }

    /// Tokens per sequence: `2k + 1`.
    pub fn seq_len(&self) -> usize {
        2 * self.k + 1
    }

    /// Tokens of the prompt a decoder is given: the inputs and `SEP` (`k + 1`).
    pub fn prompt_len(&self) -> usize {
        self.k + 1
    }

    /// Positions of the answer tokens in a sequence: `k + 1 .. 2k + 1`.
    pub fn answer_span(&self) -> Range<usize> {
        self.k + 1..2 * self.k + 1
    }

    /// Positions whose targets are the answer (each predicts the next token): `k .. 2k`.
    pub fn target_span(&self) -> Range<usize> {
        self.k..2 * self.k
    }

    /// The correct answer for input symbols `x` (each `< n_symbols`; panics otherwise).
    pub fn answer(&self, x: &[u32]) -> Vec<u32> {
        x.iter().map(|&s| self.map[s as usize]).collect()
    }

    /// The full sequence `x, SEP, answer(x)`.
    pub fn sequence(&self, x: &[u32]) -> Vec<u32> {
        let mut v = Vec::with_capacity(2 * x.len() + 1);
        v.extend_from_slice(x);
        v.push(SEP);
        v.extend(self.answer(x));
        v
    }

    /// Draws input symbols until `accept` holds.
    fn draw(&self, rng: &mut SplitMix64, accept: impl Fn(&[u32]) -> bool) -> Vec<u32> {
        loop {
            let x: Vec<u32> = (0..self.k)
                .map(|_| rng.below(self.n_symbols) as u32)
                .collect();
            if accept(&x) {
                return x;
            }
        }
    }

    fn build(&self, inputs: Vec<Vec<u32>>) -> Batch {
        let seq = self.seq_len();
        let mut tokens = Vec::with_capacity(inputs.len() * seq);
        let mut targets = Vec::with_capacity(inputs.len() * seq);
        for x in &inputs {
            let s = self.sequence(x);
            for t in 0..seq {
                targets.push(if self.target_span().contains(&t) {
                    s[t + 1] as i32
                } else {
                    IGNORE_INDEX
                });
            }
            tokens.extend(s);
        }
        Batch {
            tokens,
            targets,
            batch: inputs.len(),
            seq,
        }
    }

    /// The next `batch` training sequences (never held-out inputs). Deterministic per
    /// seed; generators of A and B with one seed draw the same inputs.
    pub fn sample_batch(&mut self, batch: usize) -> Batch {
        let mut rng = self.rng.clone();
        let inputs = (0..batch)
            .map(|_| self.draw(&mut rng, |x| !is_heldout(x)))
            .collect();
        self.rng = rng;
        self.build(inputs)
    }

    /// `n` held-out sequences drawn from their own stream seeded by `seed` (not the
    /// training stream; the generator's state is untouched). Every input is held out, so
    /// none can appear in any training batch.
    pub fn heldout(&self, n: usize, seed: u64) -> Batch {
        let mut rng = SplitMix64(seed ^ HELDOUT_SALT);
        let inputs = (0..n).map(|_| self.draw(&mut rng, is_heldout)).collect();
        self.build(inputs)
    }

    /// The fraction of sequences of `batch` whose answer `decode` gets exactly right.
    /// `decode` receives a prompt (`tokens[..prompt_len]`) and returns its generated
    /// answer (greedy decoding of `k` tokens). An empty batch scores 0.
    pub fn exact_match_rate(
        &self,
        batch: &Batch,
        mut decode: impl FnMut(&[u32]) -> Vec<u32>,
    ) -> f64 {
        if batch.batch == 0 {
            return 0.0;
        }
        let hits = (0..batch.batch)
            .filter(|&i| {
                let row = batch.row(i);
                let pred = decode(&row[..self.prompt_len()]);
                is_exact(&pred, &row[self.answer_span()])
            })
            .count();
        hits as f64 / batch.batch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn permutations_are_bijections_and_b_shifts_a() {
        for n in [2, 16, 32, 64] {
            let a = Task::A.permutation(n);
            let b = Task::B.permutation(n);
            for p in [&a, &b] {
                let mut s = p.clone();
                s.sort();
                assert_eq!(s, (0..n as u32).collect::<Vec<_>>());
            }
            for x in 0..n {
                assert_eq!(b[x], (a[x] + 1) % n as u32);
                assert_ne!(a[x], b[x]);
            }
        }
        // Fixed across runs: the permutation is part of the task definition.
        assert_eq!(Task::A.permutation(32), Task::A.permutation(32));
        assert_ne!(Task::A.permutation(32), (0..32).collect::<Vec<u32>>());
        println!("pi_A(32) = {:?}", Task::A.permutation(32));
    }

    #[test]
    fn layout_and_target_alignment() {
        for task in [Task::A, Task::B] {
            let mut g = TaskGen::new(task, 8, 3).unwrap();
            let b = g.sample_batch(64);
            assert_eq!((b.batch, b.seq), (64, 17));
            assert_eq!((b.tokens.len(), b.targets.len()), (64 * 17, 64 * 17));
            let map = task.permutation(32);
            for i in 0..b.batch {
                let (row, tg) = (b.row(i), b.targets_row(i));
                assert!(row[..8].iter().all(|&s| s < 32));
                assert_eq!(row[8], SEP);
                for j in 0..8 {
                    assert_eq!(row[9 + j], map[row[j] as usize]);
                }
                for t in 0..b.seq {
                    if g.target_span().contains(&t) {
                        assert_eq!(tg[t], row[t + 1] as i32, "row {i} pos {t}");
                        assert!(g.answer_span().contains(&(t + 1)));
                    } else {
                        assert_eq!(tg[t], IGNORE_INDEX, "row {i} pos {t}");
                    }
                }
                assert_eq!(tg.iter().filter(|&&t| t != IGNORE_INDEX).count(), 8);
            }
            assert_eq!(g.answer_span(), 9..17);
            assert_eq!(g.target_span(), 8..16);
            assert_eq!(g.prompt_len(), 9);
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let mut g1 = TaskGen::new(Task::A, 6, 7).unwrap();
        let mut g2 = TaskGen::new(Task::A, 6, 7).unwrap();
        let mut g3 = TaskGen::new(Task::A, 6, 8).unwrap();
        let (b1, b2, b3) = (
            g1.sample_batch(32),
            g2.sample_batch(32),
            g3.sample_batch(32),
        );
        assert_eq!(b1, b2);
        assert_ne!(b1, b3);
        // The stream advances, and batch boundaries do not matter.
        let next = g1.sample_batch(32);
        assert_ne!(next, b1);
        let mut g4 = TaskGen::new(Task::A, 6, 7).unwrap();
        let both = g4.sample_batch(64);
        assert_eq!(&both.tokens[..b1.tokens.len()], b1.tokens.as_slice());
        assert_eq!(&both.tokens[b1.tokens.len()..], next.tokens.as_slice());
        // Held-out sets are fixed per seed and leave the training stream alone.
        assert_eq!(g1.heldout(20, 1), g2.heldout(20, 1));
        assert_ne!(g1.heldout(20, 1), g1.heldout(20, 2));
        let h = g2.heldout(5, 9);
        assert_eq!(g2.sample_batch(32), next);
        assert_eq!(h.batch, 5);
    }

    #[test]
    fn heldout_disjoint_from_training() {
        // A small input space (16^3 = 4096) so that, without the split, 10k training
        // samples would certainly collide with the held-out set.
        for (k, n) in [(3, 16), (8, 32)] {
            let mut g = TaskGen::with_symbols(Task::A, k, n, 1234).unwrap();
            let held = g.heldout(300, 99);
            let held_set: HashSet<Vec<u32>> =
                (0..held.batch).map(|i| held.row(i).to_vec()).collect();
            assert!((0..held.batch).all(|i| is_heldout(&held.row(i)[..k])));
            let mut seen = 0;
            for _ in 0..10 {
                let b = g.sample_batch(1000);
                for i in 0..b.batch {
                    assert!(
                        !held_set.contains(b.row(i)),
                        "training sample {:?} is held out",
                        b.row(i)
                    );
                    assert!(!is_heldout(&b.row(i)[..k]));
                    seen += 1;
                }
            }
            assert_eq!(seen, 10_000);
            if k == 3 {
                let distinct = held_set.len();
                println!("k=3 n=16: {distinct} distinct held-out sequences among 300 draws");
            }
        }
    }

    #[test]
    fn a_and_b_differ_on_every_sample() {
        let mut ga = TaskGen::new(Task::A, 8, 5).unwrap();
        let mut gb = TaskGen::new(Task::B, 8, 5).unwrap();
        for (a, b) in [
            (ga.sample_batch(500), gb.sample_batch(500)),
            (ga.heldout(200, 1), gb.heldout(200, 1)),
        ] {
            for i in 0..a.batch {
                let (ra, rb) = (a.row(i), b.row(i));
                assert_eq!(ra[..ga.prompt_len()], rb[..gb.prompt_len()], "same prompts");
                for t in ga.answer_span() {
                    assert_ne!(ra[t], rb[t], "row {i} pos {t}");
                }
                assert!(!is_exact(&ra[ga.answer_span()], &rb[gb.answer_span()]));
            }
        }
    }

    #[test]
    fn exact_match_rate_scores_decoders() {
        let ga = TaskGen::new(Task::A, 8, 0).unwrap();
        let gb = TaskGen::new(Task::B, 8, 0).unwrap();
        let held = gb.heldout(50, 3);
        let oracle_b = |p: &[u32]| gb.answer(&p[..8]);
        let oracle_a = |p: &[u32]| ga.answer(&p[..8]);
        assert_eq!(gb.exact_match_rate(&held, oracle_b), 1.0);
        assert_eq!(gb.exact_match_rate(&held, oracle_a), 0.0);
        assert_eq!(gb.exact_match_rate(&held, |_| vec![]), 0.0);
        let mut calls = 0;
        let half = gb.exact_match_rate(&held, |p| {
            calls += 1;
            assert_eq!(p.len(), 9);
            assert_eq!(p[8], SEP);
            if calls % 2 == 0 {
                gb.answer(&p[..8])
            } else {
                vec![0; 8]
            }
        });
        assert!((0.4..=0.5).contains(&half), "{half}");
        assert_eq!(gb.exact_match_rate(&gb.heldout(0, 1), oracle_b), 0.0);
        assert!(
            is_exact(&[1, 2], &[1, 2])
                && !is_exact(&[1, 2], &[1, 2, 3])
                && !is_exact(&[1, 3], &[1, 2])
        );
    }

    #[test]
    fn invalid_arguments_err() {
        for (k, n) in [(0, 32), (8, 1), (8, 65), (1, 64), (2, 8)] {
            match TaskGen::with_symbols(Task::A, k, n, 0) {
                Err(Error::InvalidArgument(m)) => println!("k={k} n={n}: {m}"),
                other => panic!("k={k} n={n}: expected InvalidArgument, got {other:?}"),
            }
        }
        assert!(TaskGen::with_symbols(Task::B, 2, 16, 0).is_ok());
        assert!(TaskGen::with_symbols(Task::B, 1000, 64, 0).is_ok());
        assert!(MIN_VOCAB > SEP as usize && MIN_VOCAB > PAD as usize);
    }
}
