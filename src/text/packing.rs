//! Tokenized examples with a loss mask, packed into fixed-length sequences, and the
//! held-out split.

use super::cursor::permutation;
use super::{Record, Tokenizer};
use crate::data::Batch;
use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};
use rayon::prelude::*;

/// One record's token ids and, per token, whether predicting it counts for the loss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The ids: the document (or prompt then completion), then EOS.
    pub ids: Vec<u32>,
    /// `loss[i]`: whether `ids[i]` is a target of the loss (false on prompt tokens).
    pub loss: Vec<bool>,
}

impl Example {
    /// Tokenizes one record and appends EOS. A [`Record::Text`] counts for the loss on
    /// every token; a [`Record::PromptCompletion`] only on the completion's tokens and the
    /// EOS. Prompt and completion are encoded separately and concatenated, so their
    /// boundary is always a token boundary (write the space that starts the completion in
    /// the completion: `" 4"`, as GPT-2 attaches a space to the word after it).
    pub fn from_record(tokenizer: &Tokenizer, eos: u32, record: &Record) -> Result<Self> {
        let (mut ids, mut loss) = match record {
            Record::Text(text) => {
                let ids = tokenizer.encode(text)?;
                let n = ids.len();
                (ids, vec![true; n])
            }
            Record::PromptCompletion { prompt, completion } => {
                let mut ids = tokenizer.encode(prompt)?;
                let mut loss = vec![false; ids.len()];
                let completion = tokenizer.encode(completion)?;
                loss.resize(ids.len() + completion.len(), true);
                ids.extend(completion);
                (ids, loss)
            }
        };
        ids.push(eos);
        loss.push(true);
        Ok(Example { ids, loss })
    }
}

/// Tokenizes every record ([`Example::from_record`], EOS from [`Tokenizer::eos_id`]), in
/// parallel, keeping the records' order.
pub fn tokenize(tokenizer: &Tokenizer, records: &[Record]) -> Result<Vec<Example>> {
    let eos = tokenizer.eos_id()?;
    records
        .par_iter()
        .map(|r| Example::from_record(tokenizer, eos, r))
        .collect()
}

/// Fixed-length training sequences: `inputs` and next-token `targets`, `seq_len` each,
/// stored row-major. `targets` are `i32` ids or [`IGNORE_INDEX`], the form
/// [`crate::model::Gpt2::loss`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequences {
    seq_len: usize,
    inputs: Vec<u32>,
    targets: Vec<i32>,
}

/// Packs examples into sequences of `seq_len` inputs and `seq_len` targets.
///
/// The examples are concatenated into one stream `s` (documents run into each other,
/// separated by their EOS, as in GPT-2's training). Sequence `k` is the `seq_len + 1`
/// tokens `s[k·seq_len ..= (k+1)·seq_len]`: inputs are the first `seq_len`, targets the
/// last `seq_len` (so consecutive sequences share one token, and every token but the
/// first is a target exactly once); a target whose token is masked (a prompt token) is
/// [`IGNORE_INDEX`].
///
/// **Tail**: tokens left after the last full sequence make one more sequence, padded to
/// `seq_len` with `pad_id` inputs and [`IGNORE_INDEX`] targets (so a small dataset still
/// trains on all of its tokens; with causal attention the padding does not change the
/// real positions). **Sequences with no target** (all masked, such as a window inside a
/// long prompt) are dropped.
///
/// Errors ([`Error::InvalidArgument`]): `seq_len` 0; a stream shorter than one sequence
/// (`seq_len + 1` tokens); and a dataset in which no token counts for the loss.
pub fn pack(examples: &[Example], seq_len: usize, pad_id: u32) -> Result<Sequences> {
    if seq_len == 0 {
        return Err(Error::invalid("seq_len must be at least 1"));
    }
    let n_tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
    if n_tokens < seq_len + 1 {
        return Err(Error::invalid(format!(
            "the data has {n_tokens} tokens, fewer than one sequence of seq_len {seq_len} + 1: \
             add data or lower the sequence length"
        )));
    }
    let mut stream = Vec::with_capacity(n_tokens);
    let mut target = Vec::with_capacity(n_tokens);
    for e in examples {
        debug_assert_eq!(e.ids.len(), e.loss.len());
        stream.extend_from_slice(&e.ids);
        target.extend(
            e.ids
                .iter()
                .zip(&e.loss)
                .map(|(&id, &l)| if l { id as i32 } else { IGNORE_INDEX }),
        );
    }
    let n_seq = (n_tokens - 1).div_ceil(seq_len);
    let mut out = Sequences {
        seq_len,
        inputs: Vec::with_capacity(n_seq * seq_len),
        targets: Vec::with_capacity(n_seq * seq_len),
    };
    for k in 0..n_seq {
        let start = k * seq_len;
        let end = (start + seq_len).min(n_tokens - 1);
        let tgt = &target[start + 1..=end];
        if tgt.iter().all(|&t| t == IGNORE_INDEX) {
            continue;
        }
        out.inputs.extend_from_slice(&stream[start..end]);
        out.targets.extend_from_slice(tgt);
        let pad = seq_len - (end - start);
        out.inputs.extend(std::iter::repeat_n(pad_id, pad));
        out.targets.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }
    if out.is_empty() {
        return Err(Error::invalid(format!(
            "no token of the data counts for the loss ({n_tokens} tokens, all masked): \
             every record is a prompt without completion tokens"
        )));
    }
    Ok(out)
}

impl Sequences {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.inputs.len() / self.seq_len
    }

    /// Whether there is no sequence (a held-out split with `val_fraction` 0).
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The inputs of sequence `i` (panics when `i >= len()`, like slice indexing).
    pub fn inputs(&self, i: usize) -> &[u32] {
        &self.inputs[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// The targets of sequence `i` (panics when `i >= len()`, like slice indexing).
    pub fn targets(&self, i: usize) -> &[i32] {
        &self.targets[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Number of targets that count for the loss (not [`IGNORE_INDEX`]).
    pub fn n_loss_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// The batch of the sequences `indices`, in that order (panics on an index past
    /// `len()`, like slice indexing).
    pub fn gather(&self, indices: &[usize]) -> Batch {
        let mut tokens = Vec::with_capacity(indices.len() * self.seq_len);
        let mut targets = Vec::with_capacity(indices.len() * self.seq_len);
        for &i in indices {
            tokens.extend_from_slice(self.inputs(i));
            targets.extend_from_slice(self.targets(i));
        }
        Batch {
            tokens,
            targets,
            batch: indices.len(),
            seq: self.seq_len,
        }
    }

    /// Checks that every input and target id is below `model_vocab` (the model's
    /// `vocab_size`): an id past the embedding is an error naming it and its sequence.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        let past = |id: u32| id as usize >= model_vocab;
        let input = self.inputs.iter().position(|&id| past(id));
        let target = self
            .targets
            .iter()
            .position(|&t| t != IGNORE_INDEX && past(t as u32));
        let worst = match (input, target) {
            (Some(i), Some(t)) if t < i => Some((t, self.targets[t] as u32)),
            (Some(i), _) => Some((i, self.inputs[i])),
            (None, Some(t)) => Some((t, self.targets[t] as u32)),
            (None, None) => None,
        };
        match worst {
            None => Ok(()),
            Some((i, id)) => Err(Error::invalid(format!(
                "token id {id} (sequence {}) is not below the model's vocab_size {model_vocab}: \
                 the tokenizer does not match the model",
                i / self.seq_len
            ))),
        }
    }

    /// Splits off `val_fraction` of the sequences for evaluation, deterministically by
    /// `seed`: returns `(train, val)`, each in the original order. With `val_fraction`
    /// `> 0`, `round(val_fraction · len)` sequences are held out, at least one and leaving
    /// at least one; with 0 the validation set is empty.
    ///
    /// Errors ([`Error::InvalidArgument`]): `val_fraction` outside `[0, 1)` (or NaN), and
    /// `val_fraction > 0` with a single sequence (nothing would be left to train on).
    pub fn split(self, val_fraction: f64, seed: u64) -> Result<(Sequences, Sequences)> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(Error::invalid(format!(
                "val_fraction must be in [0, 1), got {val_fraction}"
            )));
        }
        let n = self.len();
        let empty = Sequences {
            seq_len: self.seq_len,
            inputs: Vec::new(),
            targets: Vec::new(),
        };
        if val_fraction == 0.0 {
            return Ok((self, empty));
        }
        if n < 2 {
            return Err(Error::invalid(format!(
                "val_fraction {val_fraction} needs at least 2 sequences, the data makes {n}: \
                 add data, lower the sequence length, or use val_fraction 0"
            )));
        }
        let n_val = ((val_fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut is_val = vec![false; n];
        for &i in &permutation(n, seed ^ SPLIT_SALT)[..n_val] {
            is_val[i] = true;
        }
        let (mut train, mut val) = (empty.clone(), empty);
        for (i, &v) in is_val.iter().enumerate() {
            let dst = if v { &mut val } else { &mut train };
            dst.inputs.extend_from_slice(self.inputs(i));
            dst.targets.extend_from_slice(self.targets(i));
        }
        Ok((train, val))
    }

    /// The sequences in order, in batches of `batch` (the last one may be smaller): for
    /// evaluation, the same batches on every call. `batch` 0 is an error.
    pub fn eval_batches(&self, batch: usize) -> Result<EvalBatches<'_>> {
        if batch == 0 {
            return Err(Error::invalid("the evaluation batch must be at least 1"));
        }
        Ok(EvalBatches {
            data: self,
            batch,
            next: 0,
        })
    }
}

/// Keeps the split's shuffle apart from the batch cursor's for one seed.
const SPLIT_SALT: u64 = 0x7465_7874_5f73_706c;

/// [`Sequences::eval_batches`]: consecutive batches, the last one possibly partial.
#[derive(Clone, Debug)]
pub struct EvalBatches<'a> {
    data: &'a Sequences,
    batch: usize,
    next: usize,
}

impl Iterator for EvalBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let n = self.data.len();
        if self.next >= n {
            return None;
        }
        let end = (self.next + self.batch).min(n);
        let indices: Vec<usize> = (self.next..end).collect();
        self.next = end;
        Some(self.data.gather(&indices))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.data.len() - self.next.min(self.data.len())).div_ceil(self.batch);
        (left, Some(left))
    }
}

impl ExactSizeIterator for EvalBatches<'_> {}

/// How [`TextData::build`] tokenizes, packs and splits.
#[derive(Clone, Debug, PartialEq)]
pub struct TextDataOptions {
    /// Tokens per sequence (at most the model's `n_positions`; the CLI checks that).
    pub seq_len: usize,
    /// Fraction of the sequences held out for evaluation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Seed of the held-out split.
    pub seed: u64,
}

/// A dataset ready for training: packed training and validation sequences.
#[derive(Clone, Debug)]
pub struct TextData {
    /// The training sequences (feed them through a [`super::BatchCursor`]).
    pub train: Sequences,
    /// The held-out sequences (empty with `val_fraction` 0; see [`Sequences::eval_batches`]).
    pub val: Sequences,
    /// Number of records read.
    pub n_records: usize,
    /// Number of tokens of all records, EOS included.
    pub n_tokens: usize,
}

impl TextData {
    /// [`tokenize`], [`pack`] (padding with EOS) and [`Sequences::split`], after checking
    /// the tokenizer has an EOS.
    pub fn build(
        tokenizer: &Tokenizer,
        records: &[Record],
        opts: &TextDataOptions,
    ) -> Result<Self> {
        let eos = tokenizer.eos_id()?;
        let examples = tokenize(tokenizer, records)?;
        let n_tokens = examples.iter().map(|e| e.ids.len()).sum();
        let (train, val) =
            pack(&examples, opts.seq_len, eos)?.split(opts.val_fraction, opts.seed)?;
        Ok(TextData {
            train,
            val,
            n_records: records.len(),
            n_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::fixtures;

    fn ex(ids: &[u32], loss: &[bool]) -> Example {
        Example {
            ids: ids.to_vec(),
            loss: loss.to_vec(),
        }
    }

    const I: i32 = IGNORE_INDEX;

    fn tiny_tokenizer() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        fixtures::write_tiny_tokenizer(dir.path(), fixtures::TINY_CORPUS, 300).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    #[test]
    fn eos_after_every_document_and_prompt_masked() {
        let (_d, tok) = tiny_tokenizer();
        let eos = tok.eos_id().unwrap();
        let records = vec![
            Record::Text("the cat sat".into()),
            Record::PromptCompletion {
                prompt: "Q: the dog?".into(),
                completion: " A: it ran.".into(),
            },
            Record::Text("é".into()),
        ];
        let ex = tokenize(&tok, &records).unwrap();
        assert_eq!(ex.len(), 3);
        let doc = tok.encode("the cat sat").unwrap();
        assert_eq!(ex[0].ids, [doc.as_slice(), &[eos]].concat());
        assert!(ex[0].loss.iter().all(|&l| l));
        let (p, c) = (
            tok.encode("Q: the dog?").unwrap(),
            tok.encode(" A: it ran.").unwrap(),
        );
        assert_eq!(ex[1].ids, [p.as_slice(), c.as_slice(), &[eos]].concat());
        let want_loss: Vec<bool> = (0..p.len())
            .map(|_| false)
            .chain((0..=c.len()).map(|_| true))
            .collect();
        assert_eq!(ex[1].loss, want_loss);
        assert_eq!(*ex[2].ids.last().unwrap(), eos);
        assert_eq!(
            ex.iter()
                .map(|e| e.ids.iter().filter(|&&i| i == eos).count())
                .sum::<usize>(),
            3
        );
    }

    #[test]
    fn packs_with_stride_seq_len_and_pads_the_tail() {
        // Stream 10..=19 (10 tokens), seq_len 4: sequences start at 0, 4, 8.
        let e = [
            ex(&[10, 11, 12], &[true; 3]),
            ex(
                &[13, 14, 15, 16, 17, 18, 19],
                &[false, false, true, true, true, true, true],
            ),
        ];
        let s = pack(&e, 4, 99).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.inputs(0), [10, 11, 12, 13]);
        assert_eq!(s.targets(0), [11, 12, I, I]);
        assert_eq!(s.inputs(1), [14, 15, 16, 17]);
        assert_eq!(s.targets(1), [15, 16, 17, 18]);
        // Tail: one real input (18) predicting 19, then padding.
        assert_eq!(s.inputs(2), [18, 99, 99, 99]);
        assert_eq!(s.targets(2), [19, I, I, I]);
        assert_eq!(s.n_loss_tokens(), 2 + 4 + 1);
        // Exactly a whole number of sequences: no tail.
        let s = pack(&[ex(&[1, 2, 3, 4, 5, 6, 7], &[true; 7])], 3, 0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.targets(1), [5, 6, 7]);
        // Exactly one sequence.
        let s = pack(&[ex(&[1, 2, 3], &[true; 3])], 2, 0).unwrap();
        assert_eq!(
            (s.len(), s.inputs(0), s.targets(0)),
            (1, &[1, 2][..], &[2, 3][..])
        );
    }

    #[test]
    fn all_masked_sequences_are_dropped() {
        let e = [ex(
            &[1, 2, 3, 4, 5, 6, 7, 8, 9],
            &[false, false, false, false, false, false, true, true, true],
        )];
        let s = pack(&e, 2, 0).unwrap();
        // Windows: [1,2]->[2,3] masked, [3,4]->[4,5] masked, [5,6]->[I,7], [7,8]->[8,9].
        assert_eq!(s.len(), 2);
        assert_eq!(s.targets(0), [I, 7]);
        assert_eq!(s.targets(1), [8, 9]);
    }

    #[test]
    fn empty_short_and_all_masked_data_are_errors() {
        let msg = |r: Result<Sequences>| match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            msg(pack(&[], 4, 0)).contains("0 tokens, fewer than one sequence of seq_len 4 + 1")
        );
        assert!(msg(pack(&[ex(&[1, 2, 3, 4], &[true; 4])], 4, 0)).contains("4 tokens"));
        let masked = [ex(&[1, 2, 3, 4, 5, 6], &[false; 6])];
        assert!(msg(pack(&masked, 2, 0)).contains("all masked"));
        // Only the first token counts: it is never a target.
        let first = [ex(&[1, 2, 3], &[true, false, false])];
        assert!(msg(pack(&first, 2, 0)).contains("all masked"));
        assert!(msg(pack(&masked, 0, 0)).contains("seq_len must be at least 1"));
    }

    fn numbered(n: usize, seq_len: usize) -> Sequences {
        let ids: Vec<u32> = (0..(n * seq_len + 1) as u32).collect();
        let loss = vec![true; ids.len()];
        pack(&[Example { ids, loss }], seq_len, 0).unwrap()
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let all = numbered(20, 3);
        let (tr, va) = all.clone().split(0.25, 7).unwrap();
        assert_eq!((tr.len(), va.len()), (15, 5));
        let (tr2, va2) = all.clone().split(0.25, 7).unwrap();
        assert_eq!((&tr, &va), (&tr2, &va2));
        let (_, va3) = all.clone().split(0.25, 8).unwrap();
        assert_ne!(va, va3, "another seed holds out other sequences");
        // Disjoint, complete, each in the original order.
        let firsts = |s: &Sequences| (0..s.len()).map(|i| s.inputs(i)[0]).collect::<Vec<_>>();
        let (a, b) = (firsts(&tr), firsts(&va));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
        let mut both = [a, b].concat();
        both.sort();
        assert_eq!(both, firsts(&all));
    }

    #[test]
    fn split_keeps_one_sequence_on_each_side() {
        let (tr, va) = numbered(2, 2).split(0.01, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (1, 1));
        let (tr, va) = numbered(3, 2).split(0.99, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (1, 2));
        let (tr, va) = numbered(1, 2).split(0.0, 1).unwrap();
        assert_eq!((tr.len(), va.len(), va.is_empty()), (1, 0, true));
        for bad in [-0.1, 1.0, 1.5, f64::NAN] {
            assert!(
                matches!(numbered(4, 2).split(bad, 1), Err(Error::InvalidArgument(m)) if m.contains("[0, 1)"))
            );
        }
        assert!(
            matches!(numbered(1, 2).split(0.5, 1), Err(Error::InvalidArgument(m)) if m.contains("at least 2 sequences"))
        );
    }

    #[test]
    fn eval_batches_cover_every_sequence_in_order() {
        let s = numbered(7, 2);
        let batches: Vec<Batch> = s.eval_batches(3).unwrap().collect();
        assert_eq!(
            batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
            [3, 3, 1]
        );
        assert_eq!(s.eval_batches(3).unwrap().len(), 3);
        let tokens: Vec<u32> = batches.iter().flat_map(|b| b.tokens.clone()).collect();
        assert_eq!(tokens, (0..14).collect::<Vec<u32>>());
        assert_eq!(batches[2].targets, [13, 14]);
        assert_eq!(batches, s.eval_batches(3).unwrap().collect::<Vec<_>>());
        assert!(s.eval_batches(0).is_err());
        let (_, empty) = s.split(0.0, 0).unwrap();
        assert_eq!(empty.eval_batches(4).unwrap().count(), 0);
    }

    #[test]
    fn check_vocab_finds_ids_past_the_model() {
        let s = numbered(3, 4); // ids 0..=12
        s.check_vocab(13).unwrap();
        let err = s.check_vocab(12).unwrap_err().to_string();
        assert!(
            err.contains("token id 12 (sequence 2) is not below the model's vocab_size 12"),
            "{err}"
        );
        let err = s.check_vocab(5).unwrap_err().to_string();
        assert!(err.contains("token id 5 (sequence 1)"), "{err}");
        // An offending id that only appears as a target (after masked targets) is found
        // in its own sequence.
        let e = [ex(
            &[1, 2, 3, 4, 5, 6, 7, 70],
            &[true, false, true, true, true, true, true, true],
        )];
        let s = pack(&e, 3, 0).unwrap();
        assert_eq!(
            (s.targets(0), s.targets(2)),
            (&[I, 3, 4][..], &[70, I, I][..])
        );
        let err = s.check_vocab(50).unwrap_err().to_string();
        assert!(err.contains("token id 70 (sequence 2)"), "{err}");
    }

    #[test]
    fn build_tokenizes_packs_and_splits() {
        let (_d, tok) = tiny_tokenizer();
        let records: Vec<Record> = fixtures::TINY_CORPUS
            .split("\n\n")
            .map(|d| Record::Text(d.to_string()))
            .collect();
        let opts = TextDataOptions {
            seq_len: 16,
            val_fraction: 0.2,
            seed: 3,
        };
        let d = TextData::build(&tok, &records, &opts).unwrap();
        assert_eq!(d.n_records, records.len());
        let n_seq = (d.n_tokens - 1).div_ceil(16);
        assert_eq!(d.train.len() + d.val.len(), n_seq);
        assert!(!d.val.is_empty() && !d.train.is_empty());
        d.train.check_vocab(tok.vocab_size()).unwrap();
        assert_eq!(
            d.train.n_loss_tokens() + d.val.n_loss_tokens(),
            d.n_tokens - 1
        );
        // Too short for one sequence.
        let r = TextData::build(
            &tok,
            &records[..1],
            &TextDataOptions {
                seq_len: 4096,
                ..opts
            },
        );
        assert!(
            matches!(r, Err(Error::InvalidArgument(m)) if m.contains("fewer than one sequence"))
        );
    }
}
