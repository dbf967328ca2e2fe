//! Test fixtures: a tiny byte-level BPE tokenizer trained on a given text, and a tiny
//! random GPT-2 directory in transformers' layout. Nothing is downloaded; each takes
//! milliseconds, and the same arguments write the same files.
//!
//! ```
//! use lorafuse::text::{fixtures, Tokenizer};
//! let dir = tempfile::tempdir()?;
//! let cfg = fixtures::write_tiny_gpt2_dir(dir.path(), 0, 320, fixtures::TokenizerFiles::Json)?;
//! let tok = Tokenizer::from_dir(dir.path())?;
//! tok.check_model_vocab(cfg.vocab_size)?;
//! assert_eq!(tok.decode(&tok.encode("the cat")?)?, "the cat");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::tokenizer::{EOS_TOKEN, MERGES_FILE, TOKENIZER_FILE, VOCAB_FILE};
use crate::checkpoint::Gpt2Config;
use crate::model::Gpt2;
use crate::{DType, Device, Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::{AddedToken, Model, TokenizerBuilder, TokenizerImpl};

/// A few paragraphs of English (blank-line separated, so also a `.txt` dataset) with
/// digits, punctuation, contractions, runs of spaces and non-ASCII characters: enough
/// for a few hundred BPE merges.
pub const TINY_CORPUS: &str = "\
The cat sat on the mat. The dog sat on the log. It's a sunny day, isn't it?
They're going to the market; we'll see what they buy.

Numbers: 0 1 2 3 42 1999 2026 3.14159 -7 +8 100%.
Punctuation (brackets) [square] {curly} <angle> \"quotes\" 'single' — dashes… ellipsis!

Café, naïve, résumé, façade: accents are bytes too. Ελληνικά, русский, 日本語, 中文, 한국어.
Emoji 😀🎉 and symbols ∑ ∫ √ ≠ ≤ ≥ € £ ¥.

    Indented   text   with   runs   of   spaces,
\ttabs\tand
newlines keeps the byte-level tokenizer honest.

the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.
A small model learns the cat and the dog; the cat and the dog learn the small model.";

/// Which tokenizer files [`write_tiny_gpt2_dir`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// `tokenizer.json` ([`write_tiny_tokenizer`]).
    Json,
    /// `vocab.json` + `merges.txt` ([`write_tiny_vocab_merges`]).
    VocabMerges,
}

type TinyBpe =
    TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevelProcessor, ByteLevelDecoder>;

/// Trains GPT-2's kind of tokenizer on `corpus`: byte-level BPE (all 256 byte symbols, so
/// any text encodes), GPT-2's pre-tokenizer (`add_prefix_space = false`), decoder and
/// post-processor, `<|endoftext|>` as a special token (id 0), then merges until
/// `vocab_size` ids or no pair is left.
fn train_tiny_bpe(corpus: &str, vocab_size: usize) -> Result<TinyBpe> {
    if vocab_size < 257 {
        return Err(Error::invalid(format!(
            "tiny tokenizer: vocab_size {vocab_size} is below 257 (256 byte symbols + {EOS_TOKEN})"
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok: TinyBpe = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevelProcessor::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| Error::invalid(format!("tiny tokenizer: {e}")))?;
    tok.train(&mut trainer, corpus.split("\n\n"))
        .map_err(|e| Error::invalid(format!("tiny tokenizer: training failed: {e}")))?;
    Ok(tok)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })
}

/// Trains a tiny byte-level BPE on `corpus` (at most `vocab_size` ids, at least 257,
/// `<|endoftext|>` included as a special token) and writes it to `dir/tokenizer.json`
/// (`dir` is created if needed).
pub fn write_tiny_tokenizer(dir: &Path, corpus: &str, vocab_size: usize) -> Result<()> {
    let tok = train_tiny_bpe(corpus, vocab_size)?;
    create_dir(dir)?;
    let path = dir.join(TOKENIZER_FILE);
    let json = tok
        .to_string(false)
        .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
    std::fs::write(&path, json).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// [`write_tiny_tokenizer`]'s tokenizer in GPT-2's original two files: `dir/vocab.json`
/// (with `<|endoftext|>`) and `dir/merges.txt`.
pub fn write_tiny_vocab_merges(dir: &Path, corpus: &str, vocab_size: usize) -> Result<()> {
    let tok = train_tiny_bpe(corpus, vocab_size)?;
    create_dir(dir)?;
    tok.get_model().save(dir, None).map_err(|e| {
        Error::format(
            dir.join(VOCAB_FILE).display().to_string(),
            format!("writing {VOCAB_FILE} + {MERGES_FILE}: {e}"),
        )
    })?;
    Ok(())
}

/// The tiny GPT-2 of [`write_tiny_gpt2_dir`]: 2 layers, width 32, 2 heads, 64 positions.
pub fn tiny_gpt2_config(vocab_size: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size,
        n_positions: 64,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

/// Writes a tiny GPT-2 model directory as transformers lays it out: `config.json` and
/// `model.safetensors` ([`tiny_gpt2_config`], GPT-2's random init from `seed`, f32) and a
/// tokenizer trained on [`TINY_CORPUS`] with at most `vocab_size` ids, in the form
/// `files` says. The model's `vocab_size` is `vocab_size`, so it covers every token id.
/// Returns the model's config.
pub fn write_tiny_gpt2_dir(
    dir: &Path,
    seed: u64,
    vocab_size: usize,
    files: TokenizerFiles,
) -> Result<Gpt2Config> {
    let cfg = tiny_gpt2_config(vocab_size);
    match files {
        TokenizerFiles::Json => write_tiny_tokenizer(dir, TINY_CORPUS, vocab_size)?,
        TokenizerFiles::VocabMerges => write_tiny_vocab_merges(dir, TINY_CORPUS, vocab_size)?,
    }
    Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, seed)?.save(dir)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;
    use crate::text::Tokenizer;

    #[test]
    fn training_is_deterministic_and_reaches_the_size() {
        let a = train_tiny_bpe(TINY_CORPUS, 400).unwrap();
        let b = train_tiny_bpe(TINY_CORPUS, 400).unwrap();
        assert_eq!(a.get_vocab(true), b.get_vocab(true));
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert_eq!(a.get_vocab_size(true), 400);
        assert_eq!(a.token_to_id(EOS_TOKEN), Some(0));
        assert!(
            matches!(train_tiny_bpe(TINY_CORPUS, 256), Err(Error::InvalidArgument(m)) if m.contains("below 257"))
        );
    }

    #[test]
    fn tiny_gpt2_dir_loads_as_a_model_and_tokenizer() {
        for files in [TokenizerFiles::Json, TokenizerFiles::VocabMerges] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = write_tiny_gpt2_dir(dir.path(), 3, 300, files).unwrap();
            let names: Vec<&str> = match files {
                TokenizerFiles::Json => vec!["config.json", "model.safetensors", "tokenizer.json"],
                TokenizerFiles::VocabMerges => vec![
                    "config.json",
                    "merges.txt",
                    "model.safetensors",
                    "vocab.json",
                ],
            };
            let mut found: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            found.sort();
            assert_eq!(found, names);
            let (loaded, params) = checkpoint::load_gpt2(dir.path(), DType::F32).unwrap();
            assert_eq!(loaded, cfg);
            assert_eq!(
                (
                    cfg.n_layer,
                    cfg.n_embd,
                    cfg.n_head,
                    cfg.n_positions,
                    cfg.vocab_size
                ),
                (2, 32, 2, 64, 300)
            );
            let model = Gpt2::from_params(&loaded, params).unwrap();
            let tok = Tokenizer::from_dir(dir.path()).unwrap();
            assert_eq!(tok.vocab_size(), 300);
            tok.check_model_vocab(model.config.vocab_size).unwrap();
            // The same seed writes the same weights.
            let again = tempfile::tempdir().unwrap();
            write_tiny_gpt2_dir(again.path(), 3, 300, files).unwrap();
            let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
            assert_eq!(read(dir.path()), read(again.path()));
        }
    }
}
