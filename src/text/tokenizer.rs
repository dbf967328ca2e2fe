//! GPT-2's byte-level BPE tokenizer, read from a transformers model directory through HF's
//! `tokenizers` crate (the engine behind transformers' `GPT2TokenizerFast`).

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;

/// The file holding a whole tokenizer (model, pre-tokenizer, decoder, added tokens).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// GPT-2's original vocabulary file (token → id), read with [`MERGES_FILE`].
pub const VOCAB_FILE: &str = "vocab.json";
/// GPT-2's original merges file (one BPE merge per line, by priority).
pub const MERGES_FILE: &str = "merges.txt";
/// GPT-2's end-of-text token: appended after every document, and the padding input.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A text ↔ token-id codec, with the id of `<|endoftext|>`.
///
/// [`Tokenizer::from_dir`] reads `tokenizer.json` when the directory has one, else GPT-2's
/// `vocab.json` + `merges.txt`, and builds what transformers builds from those two files:
/// a BPE model, a `ByteLevel` pre-tokenizer (`add_prefix_space = false`, GPT-2's split
/// regex), a `ByteLevel` decoder, and `<|endoftext|>` as a special token when the
/// vocabulary has it. Both forms give transformers' ids (`tests/python/`).
///
/// As in transformers, a literal `<|endoftext|>` inside the text is the special token (one
/// id), not its characters.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file (or directory) it came from, for error messages.
    source: PathBuf,
    /// One more than the largest id, added tokens included.
    n_ids: usize,
}

impl Tokenizer {
    /// Reads the tokenizer of a transformers model directory: `dir/tokenizer.json`, or else
    /// `dir/vocab.json` + `dir/merges.txt` (GPT-2's layout). Errors name the file that is
    /// missing or malformed.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join(TOKENIZER_FILE);
        if json.is_file() {
            return Self::from_file(&json);
        }
        let vocab = dir.join(VOCAB_FILE);
        let merges = dir.join(MERGES_FILE);
        match (vocab.is_file(), merges.is_file()) {
            (true, true) => Self::from_vocab_merges(&vocab, &merges),
            (true, false) => Err(Error::format(
                merges.display().to_string(),
                format!(
                    "missing: {VOCAB_FILE} needs {MERGES_FILE} beside it (or use {TOKENIZER_FILE})"
                ),
            )),
            (false, true) => Err(Error::format(
                vocab.display().to_string(),
                format!(
                    "missing: {MERGES_FILE} needs {VOCAB_FILE} beside it (or use {TOKENIZER_FILE})"
                ),
            )),
            (false, false) => Err(Error::format(
                dir.display().to_string(),
                format!("no tokenizer: expected {TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE}"),
            )),
        }
    }

    /// Reads a `tokenizer.json` (any tokenizer transformers' fast tokenizers read).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::format(path.display().to_string(), format!("not a tokenizer: {e}"))
        })?;
        Self::new(inner, path.to_path_buf())
    }

    /// Builds GPT-2's tokenizer from `vocab.json` + `merges.txt`, as transformers'
    /// `GPT2TokenizerFast(vocab_file, merges_file)` does.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        for p in [vocab, merges] {
            std::fs::metadata(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })?;
        }
        let (v, m) = (utf8_path(vocab)?, utf8_path(merges)?);
        // Parse the vocabulary on its own first, so that an error names the file at fault:
        // once it parses, whatever `tokenizers` refuses is in the merges.
        let text = std::fs::read_to_string(vocab).map_err(|source| Error::Io {
            path: vocab.display().to_string(),
            source,
        })?;
        let vocab_map: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                vocab.display().to_string(),
                format!("not a GPT-2 vocabulary (a JSON object of token -> id): {e}"),
            )
        })?;
        let bpe = BPE::from_file(v, m).build().map_err(|e| {
            Error::format(
                merges.display().to_string(),
                format!("not a GPT-2 merges file for {VOCAB_FILE}: {e}"),
            )
        })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevelProcessor::new(false, false, true)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        if vocab_map.contains_key(EOS_TOKEN) {
            inner.add_special_tokens(&[AddedToken::from(EOS_TOKEN, true)]);
        }
        Self::new(inner, vocab.to_path_buf())
    }

    fn new(inner: tokenizers::Tokenizer, source: PathBuf) -> Result<Self> {
        let n_ids = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .ok_or_else(|| Error::format(source.display().to_string(), "empty vocabulary"))?;
        Ok(Tokenizer {
            inner,
            source,
            n_ids,
        })
    }

    /// The ids of `text`, with no special tokens added (no BOS/EOS; [`Tokenizer::eos_id`]
    /// is appended by the dataset code).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| {
            Error::invalid(format!(
                "tokenizer {}: encode failed: {e}",
                self.source.display()
            ))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept, as transformers' `decode` does by default).
    /// For byte-level BPE, `decode(encode(s)) == s` for every string `s` without
    /// `<|endoftext|>`; a slice that cuts a multi-byte character shows `U+FFFD` there.
    /// An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::invalid(format!(
                "token id {bad} is not in the vocabulary of {} ({} ids)",
                self.source.display(),
                self.n_ids
            )));
        }
        self.inner.decode(ids, false).map_err(|e| {
            Error::invalid(format!(
                "tokenizer {}: decode failed: {e}",
                self.source.display()
            ))
        })
    }

    /// The id of `<|endoftext|>` (50256 for GPT-2); an error naming the file if the
    /// tokenizer has no such token.
    pub fn eos_id(&self) -> Result<u32> {
        self.inner.token_to_id(EOS_TOKEN).ok_or_else(|| {
            Error::format(
                self.source.display().to_string(),
                format!("the tokenizer has no {EOS_TOKEN} token (needed between documents)"),
            )
        })
    }

    /// The number of ids: one more than the largest id, added tokens included (50257 for
    /// GPT-2). Every id [`Tokenizer::encode`] returns is below it.
    pub fn vocab_size(&self) -> usize {
        self.n_ids
    }

    /// Checks that every id of this tokenizer is a row of a model's embedding with
    /// `model_vocab` rows (`config.json`'s `vocab_size`); an error naming the tokenizer file
    /// otherwise. A model vocabulary larger than the tokenizer's is fine (GPT-2 checkpoints
    /// are sometimes padded).
    pub fn check_model_vocab(&self, model_vocab: usize) -> Result<()> {
        if self.n_ids > model_vocab {
            return Err(Error::format(
                self.source.display().to_string(),
                format!(
                    "the tokenizer has {} ids but the model's vocab_size is {model_vocab}: \
                     ids {model_vocab}.. have no embedding (tokenizer and model do not match)",
                    self.n_ids
                ),
            ));
        }
        Ok(())
    }

    /// The file (or directory) this tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` tokenizer, e.g. for its `decode_stream` (streamed
    /// generation that never splits a multi-byte character).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn utf8_path(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::format(p.display().to_string(), "the path is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::fixtures::{TINY_CORPUS, write_tiny_tokenizer, write_tiny_vocab_merges};

    fn both_forms(vocab_size: usize) -> (tempfile::TempDir, Tokenizer, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let (j, vm) = (dir.path().join("json"), dir.path().join("vm"));
        write_tiny_tokenizer(&j, TINY_CORPUS, vocab_size).unwrap();
        write_tiny_vocab_merges(&vm, TINY_CORPUS, vocab_size).unwrap();
        let (a, b) = (
            Tokenizer::from_dir(&j).unwrap(),
            Tokenizer::from_dir(&vm).unwrap(),
        );
        assert_eq!(a.source(), j.join(TOKENIZER_FILE));
        assert_eq!(b.source(), vm.join(VOCAB_FILE));
        (dir, a, b)
    }

    const SAMPLES: [&str; 9] = [
        "The cat sat on the mat.",
        " leading space, and  two  spaces",
        "line one\nline two\r\n\n\ttabbed\n",
        "Café naïve — 日本語 😀🎉 ∑√≠",
        "it's they're we'll I'd 1999 3.14159 -7",
        "unseen words: zyxwvut qqq ĀāĂ",
        "   ",
        "end with space ",
        "\u{0}\u{7f} control bytes \u{1b}[0m",
    ];

    #[test]
    fn json_and_vocab_merges_give_identical_ids() {
        let (_d, a, b) = both_forms(400);
        assert_eq!(a.vocab_size(), 400);
        assert_eq!(a.vocab_size(), b.vocab_size());
        assert_eq!(a.eos_id().unwrap(), b.eos_id().unwrap());
        assert_eq!(a.inner().get_vocab(true), b.inner().get_vocab(true));
        let mut merged = 0;
        for s in SAMPLES.iter().copied().chain([TINY_CORPUS]) {
            let ids = a.encode(s).unwrap();
            assert_eq!(ids, b.encode(s).unwrap(), "{s:?}");
            merged += s.len() - ids.len();
        }
        assert!(merged > 100, "the merges are used: {merged} bytes saved");
    }

    #[test]
    fn byte_level_round_trip() {
        let (_d, a, b) = both_forms(300);
        for s in SAMPLES.iter().copied().chain([TINY_CORPUS]) {
            for t in [&a, &b] {
                let ids = t.encode(s).unwrap();
                assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
                assert_eq!(t.decode(&ids).unwrap(), s, "{s:?}");
            }
        }
    }

    #[test]
    fn no_special_tokens_are_added_but_a_literal_eos_is_one() {
        let (_d, a, b) = both_forms(300);
        for t in [&a, &b] {
            assert!(t.encode("").unwrap().is_empty());
            let eos = t.eos_id().unwrap();
            assert!(!t.encode("the cat").unwrap().contains(&eos));
            let ids = t.encode("a<|endoftext|>b").unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == eos).count(), 1, "{ids:?}");
            assert_eq!(t.decode(&ids).unwrap(), "a<|endoftext|>b");
        }
    }

    #[test]
    fn tokenizer_json_is_preferred_over_vocab_merges() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_tokenizer(dir.path(), TINY_CORPUS, 300).unwrap();
        write_tiny_vocab_merges(dir.path(), TINY_CORPUS, 350).unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            (t.vocab_size(), t.source()),
            (300, dir.path().join(TOKENIZER_FILE).as_path())
        );
    }

    fn format_err(r: Result<Tokenizer>) -> (String, String) {
        match r {
            Err(Error::Format { path, msg }) => (path, msg),
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (path, msg) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.display().to_string());
        assert!(
            msg.contains("expected tokenizer.json, or vocab.json + merges.txt"),
            "{msg}"
        );

        std::fs::write(d.join(VOCAB_FILE), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        let (path, msg) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.join(MERGES_FILE).display().to_string());
        assert!(msg.contains("missing"), "{msg}");

        std::fs::write(d.join(MERGES_FILE), "#version: 0.2\na b\n").unwrap();
        let t = Tokenizer::from_dir(d).unwrap();
        assert_eq!(t.encode("ab").unwrap(), [2]);
        // No <|endoftext|>: an error naming the vocabulary.
        let (path, msg) = format_err(t.eos_id().map(|_| t.clone()));
        assert_eq!(path, d.join(VOCAB_FILE).display().to_string());
        assert!(msg.contains("no <|endoftext|> token"), "{msg}");

        std::fs::write(d.join(MERGES_FILE), "#version: 0.2\na c\n").unwrap();
        let (path, msg) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.join(MERGES_FILE).display().to_string());
        assert!(msg.contains("not a GPT-2 merges file"), "{msg}");

        std::fs::write(d.join(VOCAB_FILE), "[1, 2").unwrap();
        let (path, msg) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.join(VOCAB_FILE).display().to_string());
        assert!(msg.contains("not a GPT-2 vocabulary"), "{msg}");

        std::fs::remove_file(d.join(VOCAB_FILE)).unwrap();
        let (path, _) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.join(VOCAB_FILE).display().to_string());

        std::fs::write(d.join(TOKENIZER_FILE), "{\"model\": 3}").unwrap();
        let (path, msg) = format_err(Tokenizer::from_dir(d));
        assert_eq!(path, d.join(TOKENIZER_FILE).display().to_string());
        assert!(msg.contains("not a tokenizer"), "{msg}");
    }

    #[test]
    fn ids_past_the_vocabulary_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_tokenizer(dir.path(), TINY_CORPUS, 300).unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        let e = t.decode(&[1, 300]).unwrap_err().to_string();
        assert!(e.contains("token id 300 is not in the vocabulary"), "{e}");
        t.check_model_vocab(300).unwrap();
        t.check_model_vocab(50257).unwrap();
        let (path, msg) = format_err(t.check_model_vocab(299).map(|_| t.clone()));
        assert_eq!(path, dir.path().join(TOKENIZER_FILE).display().to_string());
        assert!(
            msg.contains("300 ids but the model's vocab_size is 299"),
            "{msg}"
        );
    }
}
