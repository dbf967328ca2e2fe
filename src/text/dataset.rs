//! Training records read from text files: `.txt` documents and `.jsonl` lines.

use crate::{Error, Result};
use std::path::Path;

/// The file extensions [`load_records`] reads.
pub const ACCEPTED_EXTENSIONS: [&str; 2] = ["txt", "jsonl"];

/// One training example, before tokenization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A document: every token counts for the loss.
    Text(String),
    /// A prompt and its completion: only the completion's tokens count for the loss.
    PromptCompletion {
        /// The conditioning text (masked out of the loss).
        prompt: String,
        /// The text to learn (its tokens and the EOS after it count for the loss).
        completion: String,
    },
}

/// Reads the records of one data file, by extension (case-insensitive):
///
/// - `.txt`: documents separated by one or more blank lines (empty or whitespace-only).
///   A document is its lines joined with `\n` (line ends `\n` or `\r\n`), every other
///   character kept as it is;
/// - `.jsonl`: one JSON object per line, either `{"text": ...}` (a document) or
///   `{"prompt": ..., "completion": ...}` (loss on the completion only); every line of a
///   file has the same form, string values, no other keys. Blank lines are skipped.
///
/// A leading UTF-8 byte-order mark is skipped. Errors ([`Error::Format`], naming the file
/// and the line): bytes that are not UTF-8, a line that is not a JSON object, a missing,
/// unknown or non-string key, a file mixing the two forms, an empty `text` or
/// `completion`, and a file with no record at all. An unknown extension is an error
/// listing the accepted ones; an unreadable file an [`Error::Io`].
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let kind = match ext.as_deref() {
        Some("txt") => Kind::Txt,
        Some("jsonl") => Kind::Jsonl,
        _ => {
            return Err(Error::format(
                path.display().to_string(),
                format!(
                    "unknown data file extension: expected one of {}",
                    ACCEPTED_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
                ),
            ));
        }
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let text = decode_utf8(&bytes).map_err(|msg| Error::format(path.display().to_string(), msg))?;
    let records = match kind {
        Kind::Txt => parse_txt(text),
        Kind::Jsonl => {
            parse_jsonl(text).map_err(|msg| Error::format(path.display().to_string(), msg))?
        }
    };
    if records.is_empty() {
        return Err(Error::format(
            path.display().to_string(),
            "empty dataset: the file holds no record",
        ));
    }
    Ok(records)
}

enum Kind {
    Txt,
    Jsonl,
}

/// The text of `bytes` (without a UTF-8 byte-order mark), or an error naming the line and
/// byte offset of the first invalid sequence.
fn decode_utf8(bytes: &[u8]) -> std::result::Result<&str, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        format!("line {line}: not valid UTF-8 (byte offset {at}); the data must be UTF-8 text")
    })
}

fn parse_txt(text: &str) -> Vec<Record> {
    let mut records = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !doc.is_empty() {
                records.push(Record::Text(doc.join("\n")));
                doc.clear();
            }
        } else {
            doc.push(line);
        }
    }
    if !doc.is_empty() {
        records.push(Record::Text(doc.join("\n")));
    }
    records
}

/// The form of a `.jsonl` file, fixed by its first record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum JsonlForm {
    Text,
    PromptCompletion,
}

impl JsonlForm {
    fn describe(self) -> &'static str {
        match self {
            JsonlForm::Text => "{\"text\": ...}",
            JsonlForm::PromptCompletion => "{\"prompt\": ..., \"completion\": ...}",
        }
    }
}

fn parse_jsonl(text: &str) -> std::result::Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut form: Option<(JsonlForm, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("line {n}: bad JSON: {e}"))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(format!(
                "line {n}: expected a JSON object ({} or {}), got {}",
                JsonlForm::Text.describe(),
                JsonlForm::PromptCompletion.describe(),
                json_kind(&value)
            ));
        };
        let unknown: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !matches!(*k, "text" | "prompt" | "completion"))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "line {n}: unknown key(s) {}: accepted are \"text\", or \"prompt\" and \"completion\"",
                unknown
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let this = match (
            obj.contains_key("text"),
            obj.contains_key("prompt"),
            obj.contains_key("completion"),
        ) {
            (true, false, false) => JsonlForm::Text,
            (false, true, true) => JsonlForm::PromptCompletion,
            (false, true, false) => {
                return Err(format!("line {n}: \"prompt\" without \"completion\""));
            }
            (false, false, true) => {
                return Err(format!("line {n}: \"completion\" without \"prompt\""));
            }
            _ => {
                return Err(format!(
                    "line {n}: \"text\" together with \"prompt\"/\"completion\": a line is {} or {}",
                    JsonlForm::Text.describe(),
                    JsonlForm::PromptCompletion.describe()
                ));
            }
        };
        match form {
            None => form = Some((this, n)),
            Some((first, first_line)) if first != this => {
                return Err(format!(
                    "line {n}: {} but line {first_line} is {}: one file holds one form",
                    this.describe(),
                    first.describe()
                ));
            }
            Some(_) => {}
        }
        let string = |key: &str| -> std::result::Result<String, String> {
            match &obj[key] {
                serde_json::Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "line {n}: \"{key}\" must be a string, got {}",
                    json_kind(other)
                )),
            }
        };
        let record = match this {
            JsonlForm::Text => {
                let text = string("text")?;
                if text.is_empty() {
                    return Err(format!("line {n}: empty \"text\""));
                }
                Record::Text(text)
            }
            JsonlForm::PromptCompletion => {
                let (prompt, completion) = (string("prompt")?, string("completion")?);
                if completion.is_empty() {
                    return Err(format!("line {n}: empty \"completion\": nothing to learn"));
                }
                Record::PromptCompletion { prompt, completion }
            }
        };
        records.push(record);
    }
    Ok(records)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(bytes.as_ref())
            .unwrap();
        p
    }

    fn format_err(r: Result<Vec<Record>>) -> (String, String) {
        match r {
            Err(Error::Format { path, msg }) => (path, msg),
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn txt_documents_split_on_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.txt",
            "\u{feff}first doc\n  indented line\n\n\n \t \nsecond é 😀\r\nline two\n\nthird\n\n",
        );
        let r = load_records(&p).unwrap();
        assert_eq!(
            r,
            vec![
                Record::Text("first doc\n  indented line".into()),
                Record::Text("second é 😀\nline two".into()),
                Record::Text("third".into()),
            ]
        );
        // No trailing newline, one document.
        let p = write(dir.path(), "b.TXT", b"only one");
        assert_eq!(
            load_records(&p).unwrap(),
            vec![Record::Text("only one".into())]
        );
    }

    #[test]
    fn jsonl_text_and_prompt_completion() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "t.jsonl",
            b"{\"text\": \"hello\\nworld\"}\n\n{\"text\": \" lead\"}\n",
        );
        assert_eq!(
            load_records(&p).unwrap(),
            vec![
                Record::Text("hello\nworld".into()),
                Record::Text(" lead".into())
            ]
        );
        let p = write(
            dir.path(),
            "pc.jsonl",
            b"{\"prompt\": \"Q: 2+2?\\nA:\", \"completion\": \" 4\"}\r\n{\"completion\": \" x\", \"prompt\": \"\"}",
        );
        assert_eq!(
            load_records(&p).unwrap(),
            vec![
                Record::PromptCompletion {
                    prompt: "Q: 2+2?\nA:".into(),
                    completion: " 4".into()
                },
                Record::PromptCompletion {
                    prompt: "".into(),
                    completion: " x".into()
                },
            ]
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 11] = [
            (
                "bad.jsonl",
                b"{\"text\": \"a\"}\n{\"text\": \"b\"\n",
                "line 2: bad JSON",
            ),
            ("arr.jsonl", b"[1, 2]\n", "line 1: expected a JSON object"),
            (
                "unknown.jsonl",
                b"{\"text\": \"a\", \"id\": 3}\n",
                "line 1: unknown key(s) \"id\"",
            ),
            (
                "mixed.jsonl",
                b"{\"text\": \"a\"}\n\n{\"prompt\": \"p\", \"completion\": \"c\"}\n",
                "line 3: {\"prompt\": ..., \"completion\": ...} but line 1 is {\"text\": ...}",
            ),
            (
                "both.jsonl",
                b"{\"text\": \"a\", \"prompt\": \"p\", \"completion\": \"c\"}\n",
                "line 1: \"text\" together with",
            ),
            (
                "noprompt.jsonl",
                b"{\"completion\": \"c\"}\n",
                "line 1: \"completion\" without \"prompt\"",
            ),
            (
                "nocompl.jsonl",
                b"{\"text\": \"a\"}\n{\"prompt\": \"p\"}\n",
                "line 2: \"prompt\" without \"completion\"",
            ),
            (
                "num.jsonl",
                b"{\"text\": 5}\n",
                "line 1: \"text\" must be a string, got a number",
            ),
            (
                "empty_text.jsonl",
                b"{\"text\": \"\"}\n",
                "line 1: empty \"text\"",
            ),
            (
                "empty_compl.jsonl",
                b"{\"prompt\": \"p\", \"completion\": \"\"}\n",
                "line 1: empty \"completion\"",
            ),
            ("empty_obj.jsonl", b"{}\n", "line 1:"),
        ];
        for (name, bytes, want) in cases {
            let p = write(dir.path(), name, bytes);
            let (path, msg) = format_err(load_records(&p));
            assert_eq!(path, p.display().to_string(), "{name}");
            assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn non_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.txt", "x.jsonl"] {
            let p = write(
                dir.path(),
                name,
                b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n",
            );
            let (path, msg) = format_err(load_records(&p));
            assert_eq!(path, p.display().to_string());
            assert!(
                msg.contains("line 2: not valid UTF-8 (byte offset 28)"),
                "{msg}"
            );
        }
    }

    #[test]
    fn empty_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("e.txt", &b""[..]),
            ("w.txt", b"\n  \n\t\n"),
            ("e.jsonl", b""),
            ("w.jsonl", b"\n \n"),
        ] {
            let p = write(dir.path(), name, bytes);
            let (path, msg) = format_err(load_records(&p));
            assert_eq!(path, p.display().to_string());
            assert!(msg.contains("empty dataset"), "{name}: {msg}");
        }
    }

    #[test]
    fn unknown_extension_lists_the_accepted_ones() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["data.csv", "data", "data.json"] {
            let p = write(dir.path(), name, b"hello");
            let (path, msg) = format_err(load_records(&p));
            assert_eq!(path, p.display().to_string());
            assert!(msg.contains("expected one of .txt, .jsonl"), "{msg}");
        }
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent.txt");
        match load_records(&p) {
            Err(Error::Io { path, .. }) => assert_eq!(path, p.display().to_string()),
            other => panic!("{other:?}"),
        }
    }
}
