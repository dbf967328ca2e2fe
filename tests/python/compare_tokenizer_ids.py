#!/usr/bin/env python3
"""Checks that lorafuse's tokenizer gives transformers' GPT-2 ids.

Writes the tiny byte-level BPE of `lorafuse::text::fixtures` (trained on its TINY_CORPUS)
in both forms, `tokenizer.json` and `vocab.json` + `merges.txt`, with the `text_ids`
example, then encodes a set of texts (unicode, newlines, runs of spaces, contractions,
words the tokenizer never saw, a literal <|endoftext|>) with lorafuse and with
transformers' GPT2TokenizerFast (and GPT2Tokenizer, the Python BPE where this
transformers has one) from each form, and compares the ids exactly. Nothing is
downloaded.

Run from the repository root: `python3 tests/python/compare_tokenizer_ids.py`.
Prints `skipped: transformers not installed` and exits 0 when transformers is absent
(CI does not install it); exits 1 on any mismatch.
"""

import json
import os
import subprocess
import sys
import tempfile

try:
    import transformers
except ImportError:
    print("skipped: transformers not installed")
    sys.exit(0)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [
    "The cat sat on the mat.",
    " leading space, and  two  spaces",
    "line one\nline two\r\n\n\ttabbed\n",
    "Café naïve — 日本語 😀🎉 ∑√≠",
    "it's they're we'll I'd IT'S 1999 3.14159 -7 100%",
    "unseen words: zyxwvut qqq ĀāĂ",
    "   ",
    "end with space ",
    "trailing newlines\n\n\n",
    "\u0000\u007f control bytes \u001b[0m",
    "a<|endoftext|>b <|endoftext|>",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX",
    "",
]


def cargo_example(*args, stdin=None):
    cmd = ["cargo", "run", "--quiet", "--example", "text_ids", "--", *args]
    res = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr}")
    return res.stdout


def lorafuse_ids(model_dir, texts):
    lines = "".join(json.dumps(t) + "\n" for t in texts)
    out = cargo_example("encode", model_dir, stdin=lines)
    return [json.loads(line) for line in out.splitlines()]


def main():
    print(f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        cargo_example("fixture", tmp)
        json_dir = os.path.join(tmp, "json")
        vm_dir = os.path.join(tmp, "vocab_merges")
        vocab = os.path.join(vm_dir, "vocab.json")
        merges = os.path.join(vm_dir, "merges.txt")
        # Texts: the list above and the corpus, whole and by paragraph (seen text, long merges).
        with open(os.path.join(tmp, "corpus.txt"), encoding="utf-8") as f:
            corpus = f.read()
        texts = TEXTS + [corpus] + corpus.split("\n\n")
        with open(os.path.join(json_dir, "tokenizer.json"), encoding="utf-8") as f:
            n_vocab = len(json.load(f)["model"]["vocab"])
        print(f"tiny tokenizer: {n_vocab} ids")

        # from_pretrained is how a user loads a model directory, in every transformers
        # version; GPT2Tokenizer is the pure-Python BPE before transformers 5, and the same
        # tokenizers-backed class as GPT2TokenizerFast from 5 on.
        candidates = [
            ("GPT2TokenizerFast(tokenizer_file=tokenizer.json)", lambda: transformers.GPT2TokenizerFast(tokenizer_file=os.path.join(json_dir, "tokenizer.json"))),
            ("GPT2TokenizerFast.from_pretrained(dir with tokenizer.json)", lambda: transformers.GPT2TokenizerFast.from_pretrained(json_dir)),
            ("GPT2TokenizerFast.from_pretrained(dir with vocab.json + merges.txt)", lambda: transformers.GPT2TokenizerFast.from_pretrained(vm_dir)),
            ("GPT2Tokenizer.from_pretrained(dir with vocab.json + merges.txt)", lambda: transformers.GPT2Tokenizer.from_pretrained(vm_dir)),
        ]
        ours = {d: lorafuse_ids(d, texts) for d in (json_dir, vm_dir)}
        failures = 0
        checked = 0
        for name, make in candidates:
            try:
                theirs_tok = make()
            except Exception as e:  # a constructor this transformers version lacks
                print(f"  {name}: not available here ({type(e).__name__}: {e})")
                continue
            kind = type(theirs_tok).__name__
            if len(theirs_tok) != n_vocab:
                failures += 1
                print(f"MISMATCH {name} [{kind}]: {len(theirs_tok)} ids, lorafuse's tokenizer has {n_vocab}")
            for d in (json_dir, vm_dir):
                for text, mine in zip(texts, ours[d]):
                    theirs = theirs_tok.encode(text, add_special_tokens=False)
                    checked += 1
                    if theirs != mine:
                        failures += 1
                        print(f"MISMATCH {name} [{kind}] vs lorafuse({os.path.basename(d)}) on {text!r}:\n  transformers {theirs}\n  lorafuse     {mine}")
            print(f"  {name} [{kind}]: compared on {len(texts)} texts x 2 forms")
        if checked == 0:
            sys.exit("no transformers tokenizer could be built")
        passed = checked - failures
        print(f"{passed} passed, {failures} failed")
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
