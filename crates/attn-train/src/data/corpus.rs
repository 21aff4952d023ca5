//! Readers for the three training corpora described in `shared/DATA.md`.
//!
//! `scripts/data/fetch.sh` downloads them (pinned and checksummed) into the git-ignored `data/`
//! folder; the tests run on the tiny hand-written samples in `fixtures/corpora/`.
//!
//! - [`load_text_dir`]: paragraphs of plain-text files (the Shakespeare `*_gut.txt` texts),
//!   for language modelling.
//! - [`load_ding`]: German–English pairs from the TU Chemnitz "Ding" dictionary, for translation.
//! - [`load_sentiment_tsv`]: labelled review snippets (`id \t score \t text`), for classification.
//!
//! All three read UTF-8 (a leading byte-order mark is ignored), accept LF or CRLF line ends, and
//! fail with an error naming the file when it is missing, malformed or yields nothing.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};

/// Reads a whole file as UTF-8, without a leading byte-order mark.
fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        Error::format(path, format!("not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to()))
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Lines of `text` without their `\n` or `\r\n` ends.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l))
}

/// Whether a file name matches a pattern with at most one `*` (any run of characters, possibly
/// empty). Without `*` the name must equal the pattern.
fn name_matches(name: &str, pattern: &str) -> bool {
    match pattern.split_once('*') {
        None => name == pattern,
        Some((prefix, suffix)) => {
            name.len() >= prefix.len() + suffix.len() && name.starts_with(prefix) && name.ends_with(suffix)
        }
    }
}

/// Text units (paragraphs) of every file in `dir` whose name matches `pattern` (one `*`
/// wildcard, e.g. `"*_gut.txt"`), files in sorted name order.
///
/// A paragraph is a run of non-blank lines (a blank line is empty or whitespace only); each unit
/// keeps its internal newlines and ends with `"\n"`. Line ends (`\n` or `\r\n`) become `\n`,
/// trailing whitespace is removed from every line, leading indentation is kept. Paragraphs never
/// span two files. Only regular files (or links to them) directly in `dir` are read.
///
/// Errors: the directory cannot be read, the pattern has more than one `*`, no file matches, a
/// matching file cannot be read or is not UTF-8, or the files hold no text at all.
pub fn load_text_dir(dir: &Path, pattern: &str) -> Result<Vec<String>> {
    if pattern.matches('*').count() > 1 {
        return Err(Error::input("load_text_dir", format!("pattern `{pattern}` has more than one `*`")));
    }
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if !name_matches(&name, pattern) {
            continue;
        }
        // `fs::metadata` follows symbolic links.
        if fs::metadata(&path).map_err(|e| Error::io(&path, e))?.is_file() {
            files.push((name, path));
        }
    }
    if files.is_empty() {
        return Err(Error::format(dir, format!("no file matches `{pattern}`")));
    }
    files.sort();

    let mut units = Vec::new();
    for (_, path) in &files {
        let text = read_text(path)?;
        let mut unit = String::new();
        for line in lines(&text) {
            let line = line.trim_end();
            if line.is_empty() {
                if !unit.is_empty() {
                    units.push(std::mem::take(&mut unit));
                }
            } else {
                unit.push_str(line);
                unit.push('\n');
            }
        }
        if !unit.is_empty() {
            units.push(unit);
        }
    }
    if units.is_empty() {
        return Err(Error::format(dir, format!("the {} file(s) matching `{pattern}` hold no text", files.len())));
    }
    Ok(units)
}

/// Removes `{..}` grammar tags, `[..]` domain tags and `(..)` notes (nested ones too) from one
/// Ding sub-entry.
///
/// A removed group leaves a space behind (so the words around it stay apart), except before
/// punctuation: `"Eel (on a menu) served"` becomes `"Eel  served"` (collapsed later), but
/// `"Eel (on a menu)."` becomes `"Eel."`, not `"Eel ."`. A group
/// that is never closed runs to the end of the text; a closing bracket without an opening one is
/// kept as an ordinary character (the dictionary has a few, in smileys such as `/:-)/`).
fn strip_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The closing brackets the open groups wait for, innermost last.
    let mut open: Vec<char> = Vec::new();
    // Whether `out` ends in whitespace that a removed group left behind.
    let mut gap_from_group = false;
    for c in text.chars() {
        let close = match c {
            '{' => Some('}'),
            '[' => Some(']'),
            '(' => Some(')'),
            _ => None,
        };
        if let Some(close) = close {
            open.push(close);
        } else if open.last() == Some(&c) {
            open.pop();
            if open.is_empty() {
                let kept = out.trim_end().len();
                out.truncate(kept);
                out.push(' ');
                gap_from_group = true;
            }
        } else if open.is_empty() {
            if gap_from_group && matches!(c, '.' | ',' | '!' | '?' | ';' | ':') {
                let kept = out.trim_end().len();
                out.truncate(kept);
            }
            if !c.is_whitespace() {
                gap_from_group = false;
            }
            out.push(c);
        }
    }
    out
}

/// One cleaned Ding sub-entry: tags and notes stripped, first `;` synonym, whitespace collapsed.
fn clean_ding(sub_entry: &str) -> String {
    let stripped = strip_tags(sub_entry);
    let first = stripped.split(';').next().unwrap_or("");
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a cleaned entry reads as a full sentence (ends with `.`, `!` or `?`).
fn is_sentence(text: &str) -> bool {
    text.ends_with(['.', '!', '?'])
}

/// The minimum number of words on both sides for a pair that is not a sentence pair.
const MIN_PHRASE_WORDS: usize = 4;

/// German-English pairs from the Ding dictionary file, following `shared/DATA.md`'s recipe.
///
/// For every line (LF or CRLF; blank lines and `#` comment lines are skipped):
/// 1. split at `" :: "` into the German and the English side (a line without exactly one
///    separator is an error naming the line);
/// 2. split both sides at `"|"`; if the counts differ the line is misaligned and dropped whole,
///    otherwise the sub-entries are paired in order;
/// 3. strip `{..}` grammar tags, `[..]` domain tags and `(..)` notes, keep the first
///    `;`-separated synonym, collapse whitespace;
/// 4. keep the pair if both sides are full sentences (end with `.`, `!` or `?`) or both sides
///    have at least 4 words.
///
/// Pairs are unique (first occurrence wins) and in file order.
///
/// Errors: the file cannot be read or is not UTF-8, it is empty, a line lacks the separator, or
/// no pair survives the filter.
pub fn load_ding(path: &Path) -> Result<Vec<(String, String)>> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(Error::format(path, "empty file"));
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut pairs = Vec::new();
    for (index, line) in lines(&text).enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let mut sides = line.split(" :: ");
        let (Some(german), Some(english), None) = (sides.next(), sides.next(), sides.next()) else {
            return Err(Error::format(
                path,
                format!("line {}: expected one ` :: ` between the German and the English side", index + 1),
            ));
        };
        let german: Vec<&str> = german.split('|').collect();
        let english: Vec<&str> = english.split('|').collect();
        if german.len() != english.len() {
            continue;
        }
        for (de, en) in german.iter().zip(&english) {
            let (de, en) = (clean_ding(de), clean_ding(en));
            if de.is_empty() || en.is_empty() {
                continue;
            }
            let sentences = is_sentence(&de) && is_sentence(&en);
            let phrases = de.split(' ').count() >= MIN_PHRASE_WORDS && en.split(' ').count() >= MIN_PHRASE_WORDS;
            if !(sentences || phrases) {
                continue;
            }
            let pair = (de, en);
            if !seen.contains(&pair) {
                seen.insert(pair.clone());
                pairs.push(pair);
            }
        }
    }
    if pairs.is_empty() {
        return Err(Error::format(path, "no sentence or phrase pair survives the filter"));
    }
    Ok(pairs)
}

/// Labelled snippets from the tab-separated `id \t score \t text` file (CRLF or LF).
///
/// Label 1 if score > 0, 0 if score < 0; rows with score 0 are dropped. The text is everything
/// after the second tab, trimmed. Blank lines are skipped. The first line may be a header, which
/// is skipped: three fields, the second one a word rather than a number (the real file starts
/// with `id \t sentiment \t text`).
///
/// Errors: the file cannot be read or is not UTF-8; it is empty; a row has fewer than three
/// fields, an empty id or text, or a score that is not a finite number (the error names the
/// line, counting from 1); or no row has a non-zero score.
pub fn load_sentiment_tsv(path: &Path) -> Result<Vec<(String, u32)>> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(Error::format(path, "empty file"));
    }
    let mut rows = Vec::new();
    for (index, line) in lines(&text).enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |reason: String| Error::format(path, format!("line {}: {reason}", index + 1));
        let mut fields = line.splitn(3, '\t');
        let (Some(id), Some(score), Some(snippet)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(malformed(format!("expected `id<TAB>score<TAB>text`, got {:?}", truncate(line, 60))));
        };
        let score_field = score.trim();
        if index == 0 && !score_field.is_empty() && score_field.chars().all(|c| c.is_alphabetic() || c == '_') {
            continue; // header
        }
        if id.trim().is_empty() {
            return Err(malformed("empty id".into()));
        }
        let score: f64 = match score_field.parse() {
            Ok(s) if f64::is_finite(s) => s,
            _ => return Err(malformed(format!("score {score_field:?} is not a finite number"))),
        };
        let snippet = snippet.trim();
        if snippet.is_empty() {
            return Err(malformed("empty text".into()));
        }
        if score > 0.0 {
            rows.push((snippet.to_owned(), 1));
        } else if score < 0.0 {
            rows.push((snippet.to_owned(), 0));
        }
    }
    if rows.is_empty() {
        return Err(Error::format(path, "no row with a non-zero score"));
    }
    Ok(rows)
}

/// The first `max` characters of `text`, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}
