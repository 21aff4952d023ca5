//! The corpus readers on the hand-written samples in `fixtures/corpora/` (counts worked out by
//! hand for the crafted lines), on small temporary files for the error cases, and, when asked
//! (`cargo test -p attn-train --test corpus -- --ignored`), on the real corpora that
//! `scripts/data/fetch.sh all` puts in `data/`.

use std::path::{Path, PathBuf};

use attn_nn::Error;
use attn_train::data::corpus::{load_ding, load_sentiment_tsv, load_text_dir};

fn fixtures() -> PathBuf {
    attn_test_support::fixture_path("corpora")
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn pair(de: &str, en: &str) -> (String, String) {
    (de.to_owned(), en.to_owned())
}

// ---- load_text_dir --------------------------------------------------------------------------

#[test]
fn shakespeare_sample_paragraphs() {
    let units = load_text_dir(&fixtures().join("shakespeare"), "*_gut.txt").unwrap();
    // a_gut.txt: title, byline, heading, cast list, setting, act, scene, 21 speeches and stage
    // directions of scene I, 4 units of scene II, "THE END" = 29; b_gut.txt: 8 units of verse,
    // act, scene and 12 units of dialogue = 22.
    assert_eq!(units.len(), 29 + 22);
    assert!(units.iter().all(|u| u.ends_with('\n') && !u.ends_with("\n\n")));
    assert!(units.iter().all(|u| !u.lines().any(|l| l.trim().is_empty())));

    // Files in name order: a_gut.txt first, then b_gut.txt.
    assert_eq!(units[0], "THE LANTERN-MAKER OF ASHFORD\n");
    assert_eq!(
        units[3],
        "Aldous, a lantern-maker.\nBrisk, his apprentice.\nMarian, a widow of the town.\nA Watchman.\n"
    );
    assert_eq!(
        units[8],
        "Ald.\nCome, boy, the evening creeps upon the hill,\nAnd every lamp in Ashford wants its flame.\n\
         Hast thou the wicks I bade thee trim at noon?\n"
    );
    // The last line of a_gut.txt has no newline; the unit still ends with one.
    assert_eq!(units[28], "THE END\n");
    assert_eq!(units[29], "A SONG FOR THE FERRYMAN\n");
    // Leading indentation kept, trailing blanks removed (line 2 of the stanza ends in spaces).
    assert_eq!(
        units[32],
        "  The river keeps no ledger of the men\n  It carried over in the grey of morning;\n  \
         It does not count them, nor would count again,\n  And takes the coin without a word of warning.\n"
    );
    // A whitespace-only line separates paragraphs like an empty one.
    assert!(units[34].ends_with("  The lovers sitting silent close together.\n"));
    assert_eq!(units[35], "  III.\n");
    assert_eq!(units[50], "[Exeunt.]\n");
}

#[test]
fn first_folio_file_is_not_matched() {
    let units = load_text_dir(&fixtures().join("shakespeare"), "*_gut.txt").unwrap();
    assert!(units.iter().all(|u| !u.contains("Looke") && !u.contains("folio")));

    // The folio sample is there, and other patterns pick it up.
    let folio = load_text_dir(&fixtures().join("shakespeare"), "*_gut_f.txt").unwrap();
    assert_eq!(folio.len(), 3);
    assert_eq!(folio[1], "Cor.\nLooke how the fogge lyes thicke vpon the water.\n");
    assert_eq!(load_text_dir(&fixtures().join("shakespeare"), "*.txt").unwrap().len(), 29 + 22 + 3);
    // A pattern without `*` is an exact name.
    assert_eq!(load_text_dir(&fixtures().join("shakespeare"), "a_gut.txt").unwrap().len(), 29);
    assert_eq!(load_text_dir(&fixtures().join("shakespeare"), "b_gut*").unwrap().len(), 22);
}

#[test]
fn text_dir_crlf_and_sorting() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "z.txt", "zeta one\r\nzeta two\r\n\r\n\r\nzeta three\r\n");
    write(dir.path(), "m.txt", "\n\nmu\n");
    write(dir.path(), "notes.md", "not matched\n");
    std::fs::create_dir(dir.path().join("sub.txt")).unwrap(); // a directory is not a text file
    let units = load_text_dir(dir.path(), "*.txt").unwrap();
    assert_eq!(units, vec!["mu\n", "zeta one\nzeta two\n", "zeta three\n"]);
}

#[test]
fn text_dir_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let err = load_text_dir(&missing, "*_gut.txt").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");

    let err = load_text_dir(dir.path(), "*_gut.txt").unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("no file matches `*_gut.txt`"), "{err}");

    write(dir.path(), "empty_gut.txt", "");
    write(dir.path(), "blank_gut.txt", "\n   \n\t\r\n");
    let err = load_text_dir(dir.path(), "*_gut.txt").unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("no text"), "{err}");

    let err = load_text_dir(dir.path(), "*_*.txt").unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");

    std::fs::write(dir.path().join("bad_gut.txt"), b"caf\xe9\n").unwrap();
    let err = load_text_dir(dir.path(), "*_gut.txt").unwrap_err();
    assert!(err.to_string().contains("bad_gut.txt") && err.to_string().contains("UTF-8"), "{err}");
}

// ---- load_ding ------------------------------------------------------------------------------

#[test]
fn ding_sample_pairs() {
    let pairs = load_ding(&fixtures().join("de-en/de-en")).unwrap();
    assert_eq!(pairs.len(), 209);
    let sentences = pairs.iter().filter(|(de, en)| de.ends_with(['.', '!', '?']) && en.ends_with(['.', '!', '?']));
    assert_eq!(sentences.count(), 175);
    // The first line that gives a pair ("ein spannendes Buch" before it has only 3 words).
    assert_eq!(pairs[0], pair("Der Hund bellt.", "The dog barks."));
    assert_eq!(pairs[1], pair("Die Katze schläft auf dem Sofa.", "The cat is sleeping on the sofa."));
    // Every pair is clean: no tags or notes, no doubled or outer spaces, no empty side.
    for (de, en) in &pairs {
        for side in [de, en] {
            assert!(!side.contains(['{', '}', '[', ']', '(', ')', '|', ';']), "{side:?}");
            assert!(!side.contains("  ") && side.trim() == side && !side.is_empty(), "{side:?}");
        }
    }
    // Unique.
    let unique: std::collections::HashSet<_> = pairs.iter().collect();
    assert_eq!(unique.len(), pairs.len());
}

#[test]
fn ding_sample_crafted_lines() {
    let pairs = load_ding(&fixtures().join("de-en/de-en")).unwrap();
    let has = |de: &str, en: &str| pairs.contains(&pair(de, en));
    let count_de = |de: &str| pairs.iter().filter(|p| p.0 == de).count();

    // Single words and short phrases are dropped (the whole "Haus ... Zwiebel" blocks).
    assert!(pairs.iter().all(|(de, _)| !["Haus", "Häuser", "Katze", "Zwiebel"].contains(&de.as_str())));

    // Domain and grammar tags stripped: `[Sprw.]` / `[prov.]`, `{f}`.
    assert!(has("Hunger ist der beste Koch.", "Hunger is the best sauce."));
    assert!(has("Ende gut, alles gut.", "All's well that ends well."));
    // Notes stripped in the middle of a sentence and right before its full stop.
    assert!(has("Die Laterne ist kaputt.", "The lantern is broken."));
    assert!(has("Die Fähre legt um acht Uhr ab.", "The ferry leaves at eight o'clock."));
    assert!(has("Können Sie mir das erklären?", "Could you explain that to me?"));
    // "eine Uhr (am Handgelenk) tragen" has 3 words once the note is gone: dropped, while its
    // English side has 4; the sentence next to it is kept.
    assert!(has("Wie viel Uhr ist es?", "What time is it?"));
    assert!(!pairs.iter().any(|(_, en)| en == "to wear a watch"));
    // First `;` synonym only, on both sides.
    assert!(has("Wie spät ist es?", "What time is it?"));
    assert!(has("Das ist nicht mein Problem.", "That's not my problem."));
    assert!(has("Komm schon!", "Come on!"));
    assert!(has("Mach's gut!", "Take care!"));
    assert!(!pairs.iter().any(|(de, en)| de.contains("Tschüss") || en.contains("Let's go")));
    // Phrases of at least 4 words on both sides are kept, with tags stripped.
    assert!(has("auf der anderen Seite des Flusses", "on the other side of the river"));
    assert!(has("zwei Fliegen mit einer Klappe schlagen", "to kill two birds with one stone"));
    assert!(has("am Ende des Tages", "at the end of the day"));
    // 4 words against 3: dropped.
    assert!(!pairs.iter().any(|(de, _)| de == "im Großen und Ganzen" || de == "alles in allem"));
    // A sentence against a non-sentence: dropped.
    assert!(!pairs.iter().any(|(de, _)| de == "Keine Ahnung." || de == "Er ist gegangen."));
    assert!(!pairs.iter().any(|(de, _)| de.starts_with("die Katze im Sack") || de.starts_with("es regnet")));

    // Misaligned lines (different `|` counts) give nothing, not even their aligned-looking parts.
    for de in [
        "Ich fahre mit dem Fahrrad zur Arbeit.",
        "Nimm einen Regenschirm mit!",
        "Zieh deinen Mantel an, es ist kalt draußen.",
        "Das Schiff sinkt.",
        "Alle Mann an Bord!",
        "Das Essen steht in der Küche.",
    ] {
        assert_eq!(count_de(de), 0, "{de}");
    }
    // Duplicates kept once, at their first place.
    assert_eq!(count_de("Guten Morgen!"), 1);
    assert_eq!(count_de("Vielen Dank!"), 1);
    assert_eq!(count_de("von Zeit zu Zeit"), 1);
    assert_eq!(count_de("Guten Tag!"), 1);
    let at = |de: &str| pairs.iter().position(|p| p.0 == de).unwrap();
    assert!(at("Guten Tag!") < at("Guten Morgen!"));
    assert!(at("Guten Morgen!") < at("Die Laterne ist kaputt."));
    // Comment lines are skipped, even with ` :: ` and `|` in them.
    assert!(pairs.iter().all(|(de, en)| !de.contains("comment") && !en.contains("bars")));
}

#[test]
fn ding_small_file_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "de-en",
        "# comment :: with | separators\r\n\
         Boot {n} | Das Boot (aus Holz) ist leer. | Ruder {n}; Riemen {m} :: boat | The (wooden) boat is empty. | oar\r\n\
         \r\n\
         eins | zwei | drei vier fünf sechs. :: one | two three four five.\r\n\
         Kommst du mit?; Gehst du mit? [ugs.] :: Are you coming?; Coming along? [coll.]\r\n\
         ganz {adv} und gar {adv} nicht [ugs.] :: not at all (by any means)\r\n\
         Schritt {m; Pl.: Schritte} für Schritt vorgehen :: to proceed step (pace; stride) by step\r\n\
         Smiley {n} /:-)/ und noch mehr :: smiley /:-)/ and more of it\r\n\
         Boot {n} | Das Boot  ist leer. :: boat | The boat is empty.\r\n",
    );
    // Line 2: three aligned sub-entries, only the sentence survives ("Boot", "Ruder" are single
    // words). Line 4: 3 sub-entries against 2, dropped. Line 5: first synonyms. Line 6: 4 words
    // against 3, dropped. Line 7: the `;` inside the tag and the note does not split synonyms.
    // Line 8: a `)` without `(` is kept as text. Line 9: a duplicate once whitespace is collapsed.
    let pairs = load_ding(&path).unwrap();
    assert_eq!(
        pairs,
        vec![
            pair("Das Boot ist leer.", "The boat is empty."),
            pair("Kommst du mit?", "Are you coming?"),
            pair("Schritt für Schritt vorgehen", "to proceed step by step"),
            pair("Smiley /:-)/ und noch mehr", "smiley /:-)/ and more of it"),
        ]
    );
}

#[test]
fn ding_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_ding(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");

    let empty = write(dir.path(), "empty", "");
    let err = load_ding(&empty).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("empty"), "{err}");

    let comments = write(dir.path(), "comments", "# only :: comments\n# here\n");
    let err = load_ding(&comments).unwrap_err();
    assert!(err.to_string().contains("no sentence or phrase pair"), "{err}");

    let words = write(dir.path(), "words", "Haus {n} :: house\nBaum {m} :: tree\n");
    assert!(load_ding(&words).is_err());

    let no_separator = write(dir.path(), "nosep", "# c\nDas ist gut. :: That is good.\nkaputte Zeile ohne Trenner\n");
    let err = load_ding(&no_separator).unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
}

// ---- load_sentiment_tsv ---------------------------------------------------------------------

#[test]
fn sentiment_sample() {
    let path = fixtures().join("sentiment/snippets.tsv");
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.contains("\r\n"), "the sample is CRLF like the real file");
    let rows = load_sentiment_tsv(&path).unwrap();
    // 304 rows after the header: 149 positive, 149 negative, 6 with score 0 (dropped).
    assert_eq!(rows.len(), 298);
    assert_eq!(rows.iter().filter(|r| r.1 == 1).count(), 149);
    assert_eq!(rows.iter().filter(|r| r.1 == 0).count(), 149);
    assert!(rows.iter().all(|(text, _)| !text.contains(['\r', '\n', '\t']) && !text.is_empty()));
    // Rows 1..3: 2.26666666667, -0.6, 0.0.
    assert_eq!(rows[0], ("A wonderful film, full of warmth and wit.".to_owned(), 1));
    assert_eq!(rows[1], ("Dull and far too long.".to_owned(), 0));
    assert!(rows.iter().all(|(text, _)| text != "The film is ninety minutes long."));
    // The last row has no line end.
    assert_eq!(rows.last().unwrap(), &("The story is dull, so stay at home.".to_owned(), 0));
    // The same file with LF line ends reads the same.
    let dir = tempfile::tempdir().unwrap();
    let lf = write(dir.path(), "lf.tsv", &raw.replace("\r\n", "\n"));
    assert_eq!(load_sentiment_tsv(&lf).unwrap(), rows);
}

#[test]
fn sentiment_small_file_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    // No header; a blank line; scores as integers, with exponent, negative zero.
    let path = write(
        dir.path(),
        "s.tsv",
        "7\t3\tGreat fun.\r\n8\t-1e-3\t Barely bad. \r\n\r\n9\t-0.0\tJust a film.\r\n10\t0.5\tTab\tinside.",
    );
    let rows = load_sentiment_tsv(&path).unwrap();
    assert_eq!(rows, vec![("Great fun.".to_owned(), 1), ("Barely bad.".to_owned(), 0), ("Tab\tinside.".to_owned(), 1)]);
}

#[test]
fn sentiment_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_sentiment_tsv(&dir.path().join("missing.tsv")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");

    let empty = write(dir.path(), "empty.tsv", "");
    let err = load_sentiment_tsv(&empty).unwrap_err();
    assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("empty"), "{err}");
    let blank = write(dir.path(), "blank.tsv", "\r\n\r\n");
    assert!(load_sentiment_tsv(&blank).unwrap_err().to_string().contains("empty"));

    let bad_score = write(dir.path(), "bad_score.tsv", "id\tsentiment\ttext\r\n1\t1.5\tGood.\r\n2\tabc\tBad.\r\n");
    let err = load_sentiment_tsv(&bad_score).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("line 3") && err.to_string().contains("abc"), "{err}");

    let two_fields = write(dir.path(), "two.tsv", "1\t1.5\tGood.\n2\t-1.5\tBad.\n\n4\t2.0\n");
    assert!(load_sentiment_tsv(&two_fields).unwrap_err().to_string().contains("line 4"));

    let no_text = write(dir.path(), "notext.tsv", "1\t1.5\t  \n");
    assert!(load_sentiment_tsv(&no_text).unwrap_err().to_string().contains("line 1"));

    let nan = write(dir.path(), "nan.tsv", "1\t1.5\tGood.\n2\tNaN\tOdd.\n");
    assert!(load_sentiment_tsv(&nan).unwrap_err().to_string().contains("line 2"));

    // A word in the score column is a header only on the first line.
    let late_header = write(dir.path(), "late.tsv", "1\t1.5\tGood.\nid\tsentiment\ttext\n");
    assert!(load_sentiment_tsv(&late_header).unwrap_err().to_string().contains("line 2"));

    let neutral = write(dir.path(), "neutral.tsv", "id\tsentiment\ttext\r\n1\t0\tA film.\r\n2\t0.0\tAnother.\r\n");
    let err = load_sentiment_tsv(&neutral).unwrap_err();
    assert!(err.to_string().contains("non-zero"), "{err}");
}

// ---- the real corpora (run with `-- --ignored` after `scripts/data/fetch.sh all`) ----------

/// `ATTN_DATA_DIR`, or `data/` at the repository root.
fn data_dir() -> PathBuf {
    std::env::var_os("ATTN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| attn_test_support::workspace_root().join("data"))
}

fn require(path: &Path) -> &Path {
    assert!(path.exists(), "{} is missing: run `scripts/data/fetch.sh all` first", path.display());
    path
}

#[test]
#[ignore = "needs the real corpora: scripts/data/fetch.sh all"]
fn real_shakespeare() {
    let units = load_text_dir(require(&data_dir().join("shakespeare")), "*_gut.txt").unwrap();
    let lines: usize = units.iter().map(|u| u.lines().count()).sum();
    eprintln!("shakespeare: {} paragraphs, {lines} non-blank lines", units.len());
    assert_eq!(units.len(), 38_942);
}

#[test]
#[ignore = "needs the real corpora: scripts/data/fetch.sh all"]
fn real_ding() {
    let pairs = load_ding(require(&data_dir().join("de-en/de-en"))).unwrap();
    let is_sentence = |s: &str| s.ends_with(['.', '!', '?']);
    let sentences: Vec<_> = pairs.iter().filter(|(de, en)| is_sentence(de) && is_sentence(en)).collect();
    let words = |s: &str| s.split(' ').count() as f64;
    let mean = |v: &[&(String, String)], side: fn(&(String, String)) -> &str| {
        v.iter().map(|p| words(side(p))).sum::<f64>() / v.len() as f64
    };
    let all: Vec<_> = pairs.iter().collect();
    eprintln!(
        "ding: {} pairs ({} sentences); mean words de/en: all {:.2}/{:.2}, sentences {:.2}/{:.2}",
        pairs.len(),
        sentences.len(),
        mean(&all, |p| &p.0),
        mean(&all, |p| &p.1),
        mean(&sentences, |p| &p.0),
        mean(&sentences, |p| &p.1),
    );
    assert_eq!(pairs.len(), 41_059);
    assert_eq!(sentences.len(), 20_975);
}

#[test]
#[ignore = "needs the real corpora: scripts/data/fetch.sh all"]
fn real_sentiment() {
    let rows = load_sentiment_tsv(require(&data_dir().join("sentiment/movieReviewSnippets_GroundTruth.txt"))).unwrap();
    let positive = rows.iter().filter(|r| r.1 == 1).count();
    eprintln!("sentiment: {} rows, {positive} positive, {} negative", rows.len(), rows.len() - positive);
    assert_eq!(positive, 5_242);
    assert_eq!(rows.len() - positive, 5_326);
}
