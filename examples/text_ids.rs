//! Prints lorafuse's token ids for `tests/python/compare_tokenizer_ids.py`, which checks them
//! against transformers' GPT-2 tokenizers.
//!
//! - `text_ids fixture DIR [VOCAB]`: writes the tiny tokenizer of `lorafuse::text::fixtures`
//!   (trained on `TINY_CORPUS`, VOCAB ids, default 400) as `DIR/json/tokenizer.json` and as
//!   `DIR/vocab_merges/{vocab.json, merges.txt}`, and the corpus itself as `DIR/corpus.txt`.
//! - `text_ids encode DIR`: reads one JSON string per line on stdin and prints, per line,
//!   the JSON array of its ids under the tokenizer of model directory `DIR`.

use lorafuse::text::{Tokenizer, fixtures};
use std::io::{BufRead, Write};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["fixture", dir, rest @ ..] => {
            let vocab = match rest {
                [] => 400,
                [v] => v.parse()?,
                _ => return Err(usage()),
            };
            let dir = Path::new(dir);
            fixtures::write_tiny_tokenizer(&dir.join("json"), fixtures::TINY_CORPUS, vocab)?;
            fixtures::write_tiny_vocab_merges(
                &dir.join("vocab_merges"),
                fixtures::TINY_CORPUS,
                vocab,
            )?;
            std::fs::write(dir.join("corpus.txt"), fixtures::TINY_CORPUS)?;
        }
        ["encode", dir] => {
            let tok = Tokenizer::from_dir(Path::new(dir))?;
            let mut out = std::io::stdout().lock();
            for line in std::io::stdin().lock().lines() {
                let text: String = serde_json::from_str(&line?)?;
                writeln!(out, "{}", serde_json::to_string(&tok.encode(&text)?)?)?;
            }
        }
        _ => return Err(usage()),
    }
    Ok(())
}

fn usage() -> Box<dyn std::error::Error> {
    "usage: text_ids fixture DIR [VOCAB] | text_ids encode DIR < lines-of-json-strings".into()
}
