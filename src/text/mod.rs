//! Text data for fine-tuning: GPT-2's tokenizer, records read from `.txt` / `.jsonl`
//! files, packing into fixed-length sequences with a loss mask, a held-out split, and a
//! resumable batch cursor.
//!
//! The pipeline, file to batch:
//!
//! 1. [`Tokenizer::from_dir`] reads a transformers model directory's `tokenizer.json`, or
//!    GPT-2's `vocab.json` + `merges.txt` (HF's `tokenizers` crate; the ids are
//!    transformers'). [`Tokenizer::check_model_vocab`] refuses a tokenizer with ids past
//!    the model's embedding.
//! 2. [`load_records`] reads one file into [`Record`]s: `.txt` documents separated by
//!    blank lines, `.jsonl` lines `{"text": ...}` or `{"prompt": ..., "completion": ...}`.
//! 3. [`tokenize`] turns each record into an [`Example`]: ids, EOS appended, and a loss
//!    mask that is off on prompt tokens.
//! 4. [`pack`] concatenates the examples and cuts [`Sequences`] of `seq_len` inputs and
//!    `seq_len` next-token targets (`i32`, [`crate::ops::IGNORE_INDEX`] where masked), the
//!    tail padded; [`Sequences::split`] holds out a seeded fraction for evaluation.
//!    [`TextData::build`] does 3 and 4.
//! 5. A [`BatchCursor`] draws training batches ([`crate::data::Batch`], the form
//!    [`crate::model::Gpt2::loss`] takes) in a seeded order per epoch and serializes its
//!    position for bitwise resume; [`Sequences::eval_batches`] walks the held-out set.
//!
//! ```
//! use lorafuse::text::{self, fixtures, BatchCursor, TextData, TextDataOptions, Tokenizer};
//! let dir = tempfile::tempdir()?;
//! fixtures::write_tiny_tokenizer(dir.path(), fixtures::TINY_CORPUS, 300)?;
//! let data_file = dir.path().join("train.jsonl");
//! std::fs::write(&data_file, "{\"prompt\": \"Q: 1+1?\\nA:\", \"completion\": \" 2\"}\n".repeat(20))?;
//!
//! let tok = Tokenizer::from_dir(dir.path())?;
//! let records = text::load_records(&data_file)?;
//! let opts = TextDataOptions { seq_len: 16, val_fraction: 0.25, seed: 0 };
//! let data = TextData::build(&tok, &records, &opts)?;
//! data.train.check_vocab(tok.vocab_size())?;
//! let mut cursor = BatchCursor::new(data.train.len(), 4, 0)?;
//! let batch = cursor.next_batch(&data.train)?;
//! assert_eq!((batch.batch, batch.seq, batch.tokens.len()), (4, 16, 64));
//! let val_batches = data.val.eval_batches(4)?.count();
//! assert_eq!(val_batches, data.val.len().div_ceil(4));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cursor;
mod dataset;
pub mod fixtures;
mod packing;
mod tokenizer;

pub use cursor::{BatchCursor, CursorPosition};
pub use dataset::{ACCEPTED_EXTENSIONS, Record, load_records};
pub use packing::{EvalBatches, Example, Sequences, TextData, TextDataOptions, pack, tokenize};
pub use tokenizer::{EOS_TOKEN, MERGES_FILE, TOKENIZER_FILE, Tokenizer, VOCAB_FILE};
