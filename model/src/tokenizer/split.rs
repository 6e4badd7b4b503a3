//! A hand-written pre-tokenization splitter for exactly [`SPLIT_PATTERN`](super::SPLIT_PATTERN):
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! fancy-regex runs this pattern in its backtracking VM (the look-ahead and the possessive
//! quantifiers make it a "hard" regex), and both BPE training and encoding spend most of their
//! time there. This splitter yields the same chunks as `Regex::find_iter` (proven by proptest
//! and on every bundled document, see the tests here and `tests/tokenizer_split.rs`) by deciding
//! each alternative directly from the character classes of the next few characters.
//!
//! Semantics it reproduces, alternative by alternative, at a match start `i` (leftmost-first: the
//! first alternative that matches wins, even if a later one would be longer):
//! 1. `'` then one char of the case-folded `[sdmt]`, or a case-folded `ll`, `ve` or `re`.
//! 2. An optional char that is not CR, LF, letter or number, taken possessively, then a run of
//!    letters (greedy; nothing follows, so the run is maximal).
//! 3. One or two numbers.
//! 4. An optional space (greedy but not possessive: if the space is not followed by a
//!    "symbol", it is given back, and then the space itself cannot start the symbol run), a
//!    maximal run of symbols (not whitespace, letter or number; possessive), then all CR/LF.
//! 5. `\s*[\r\n]`: the greedy `\s*` backs off to the last CR/LF of the whitespace run, so the
//!    match ends just after the run's last CR or LF (fails if the run has none).
//! 6. `\s+(?!\S)`: the whole whitespace run if it reaches the end of the text; otherwise the run
//!    minus its last char, provided that leaves at least one char.
//! 7. `\s+`: the whole whitespace run (a single whitespace char before a non-space).
//!
//! Every char starts some alternative (letters: 2, numbers: 3, whitespace: 5-7, anything else: 4)
//! and none can match empty, so the chunks tile the text. One difference remains, in the regex's
//! disfavour: on a whitespace run of about a million chars fancy-regex gives up with an error
//! (its backtracking VM guards its stack; see `long_whitespace_run`), where this splitter goes
//! on with the chunks the pattern defines.
//!
//! The character classes are read from regex-syntax, the parser fancy-regex itself hands these
//! classes to, so `\p{L}`, `\p{N}`, `\s` and the simple case folding of `(?i)` are by
//! construction the regex engine's Unicode tables, not `char::is_alphabetic` and friends (which
//! follow different Unicode properties).
use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// Class bits of one char.
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s
const NEWLINE: u8 = 8; // [\r\n]

/// Chars below this have their class bits in a flat table; the rest use binary search.
const FLAT: u32 = 0x1_0000;

struct Tables {
    /// Class bits of every char below `FLAT` (covers ASCII, Latin, CJK and most living scripts).
    flat: Box<[u8]>,
    /// Disjoint sorted inclusive ranges above `FLAT`, each with its (non-zero) class bits.
    upper: Vec<(u32, u32, u8)>,
    /// The chars the case-insensitive contraction alternatives accept at each letter.
    fold_sdmt: Vec<char>,
    fold_l: Vec<char>,
    fold_v: Vec<char>,
    fold_e: Vec<char>,
    fold_r: Vec<char>,
}

/// The inclusive char ranges a one-class pattern matches, as regex-syntax parses it.
fn class_ranges(pattern: &str) -> Result<Vec<(u32, u32)>, String> {
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .map_err(|e| format!("splitter class {pattern}: {e}"))?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            Ok(c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect())
        }
        // regex-syntax turns a class of one char into a literal.
        HirKind::Literal(lit) => Ok(std::str::from_utf8(&lit.0)
            .map_err(|e| format!("splitter class {pattern}: {e}"))?
            .chars()
            .map(|c| (c as u32, c as u32))
            .collect()),
        other => Err(format!("splitter class {pattern}: not a class but {other:?}")),
    }
}

fn class_chars(pattern: &str) -> Result<Vec<char>, String> {
    Ok(class_ranges(pattern)?
        .into_iter()
        .flat_map(|(a, b)| (a..=b).filter_map(char::from_u32))
        .collect())
}

impl Tables {
    fn build() -> Result<Tables, String> {
        let classes = [
            (LETTER, class_ranges(r"\p{L}")?),
            (NUMBER, class_ranges(r"\p{N}")?),
            (SPACE, class_ranges(r"\s")?),
            (NEWLINE, class_ranges(r"[\r\n]")?),
        ];
        let mut flat = vec![0u8; FLAT as usize].into_boxed_slice();
        // Boundaries of every range above FLAT, to cut the upper planes into pieces of constant
        // class bits.
        let mut cuts = vec![FLAT];
        for (bit, ranges) in &classes {
            for &(a, b) in ranges {
                for c in a..=b.min(FLAT - 1) {
                    flat[c as usize] |= bit;
                }
                if b >= FLAT {
                    cuts.push(a.max(FLAT));
                    cuts.push(b + 1);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let bits_of = |c: u32| {
            classes
                .iter()
                .filter(|(_, r)| r.iter().any(|&(a, b)| a <= c && c <= b))
                .fold(0u8, |acc, (bit, _)| acc | bit)
        };
        let mut upper: Vec<(u32, u32, u8)> = Vec::new();
        for w in cuts.windows(2) {
            let bits = bits_of(w[0]);
            if bits == 0 {
                continue;
            }
            match upper.last_mut() {
                Some(last) if last.1 + 1 == w[0] && last.2 == bits => last.1 = w[1] - 1,
                _ => upper.push((w[0], w[1] - 1, bits)),
            }
        }
        Ok(Tables {
            flat,
            upper,
            fold_sdmt: class_chars("(?i:[sdmt])")?,
            fold_l: class_chars("(?i:[l])")?,
            fold_v: class_chars("(?i:[v])")?,
            fold_e: class_chars("(?i:[e])")?,
            fold_r: class_chars("(?i:[r])")?,
        })
    }

    #[inline(always)]
    fn bits(&self, c: char) -> u8 {
        let c = c as u32;
        if c < FLAT {
            self.flat[c as usize]
        } else {
            match self.upper.binary_search_by(|&(a, b, _)| {
                if b < c {
                    std::cmp::Ordering::Less
                } else if a > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(k) => self.upper[k].2,
                Err(_) => 0,
            }
        }
    }

    /// The char at byte `i` of `text` and its class bits and length; `None` at the end.
    #[inline(always)]
    fn at(&self, text: &str, i: usize) -> Option<(char, u8, usize)> {
        let b = *text.as_bytes().get(i)?;
        if b < 0x80 {
            return Some((b as char, self.flat[b as usize], 1));
        }
        // `get` rather than indexing: never panics, even if `i` were not a char boundary.
        let c = text.get(i..)?.chars().next()?;
        Some((c, self.bits(c), c.len_utf8()))
    }

    /// End of the maximal run, from byte `i`, of chars whose class bits satisfy `keep`.
    #[inline(always)]
    fn run(&self, text: &str, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
        let bytes = text.as_bytes();
        loop {
            // ASCII fast path: one table load per byte, no decoding.
            while let Some(&b) = bytes.get(i) {
                if b >= 0x80 || !keep(self.flat[b as usize]) {
                    break;
                }
                i += 1;
            }
            match self.at(text, i) {
                Some((_, bits, n)) if n > 1 && keep(bits) => i += n,
                _ => return i,
            }
        }
    }

    /// Alternative 1 after the apostrophe, at byte `i`: end of the contraction, if any.
    fn contraction(&self, text: &str, i: usize) -> Option<usize> {
        let (c1, _, n1) = self.at(text, i)?;
        if self.fold_sdmt.contains(&c1) {
            return Some(i + n1);
        }
        let second = |set: &[char]| match self.at(text, i + n1) {
            Some((c2, _, n2)) if set.contains(&c2) => Some(i + n1 + n2),
            _ => None,
        };
        if self.fold_l.contains(&c1)
            && let Some(e) = second(&self.fold_l)
        {
            return Some(e);
        }
        if self.fold_v.contains(&c1)
            && let Some(e) = second(&self.fold_e)
        {
            return Some(e);
        }
        if self.fold_r.contains(&c1)
            && let Some(e) = second(&self.fold_e)
        {
            return Some(e);
        }
        None
    }

    /// End of the chunk that starts at byte `i` (a char boundary before the end of `text`).
    #[inline]
    fn chunk_end(&self, text: &str, i: usize) -> usize {
        let Some((c0, k0, n0)) = self.at(text, i) else { return text.len() };
        let is_letter = |k: u8| k & LETTER != 0;
        let is_symbol = |k: u8| k & (SPACE | LETTER | NUMBER) == 0;

        // 1. '(?i:[sdmt]|ll|ve|re)
        if c0 == '\''
            && let Some(e) = self.contraction(text, i + n0)
        {
            return e;
        }
        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        let j = if k0 & (NEWLINE | LETTER | NUMBER) == 0 { i + n0 } else { i };
        if let Some((_, k, n)) = self.at(text, j)
            && is_letter(k)
        {
            return self.run(text, j + n, is_letter);
        }
        // 3. \p{N}{1,2}
        if k0 & NUMBER != 0 {
            return match self.at(text, i + n0) {
                Some((_, k, n)) if k & NUMBER != 0 => i + n0 + n,
                _ => i + n0,
            };
        }
        // 4.  ?[^\s\p{L}\p{N}]++[\r\n]*  (the optional space first, then without it)
        let with_space = if c0 == ' ' { Some(i + 1) } else { None };
        for s in with_space.into_iter().chain(Some(i)) {
            if let Some((_, k, n)) = self.at(text, s)
                && is_symbol(k)
            {
                let e = self.run(text, s + n, is_symbol);
                return self.run(text, e, |k| k & NEWLINE != 0);
            }
        }
        if k0 & SPACE != 0 {
            // The whitespace run i..end, the start of its last char, and the end of its last
            // CR/LF.
            let (mut end, mut last_start, mut after_newline) = (i, i, None);
            while let Some((_, k, n)) = self.at(text, end) {
                if k & SPACE == 0 {
                    break;
                }
                if k & NEWLINE != 0 {
                    after_newline = Some(end + n);
                }
                last_start = end;
                end += n;
            }
            // 5. \s*[\r\n]
            if let Some(e) = after_newline {
                return e;
            }
            // 6. \s+(?!\S): the look-ahead holds at the end of the text, or before the run's
            //    last char if the run is longer than one char.
            if end == text.len() {
                return end;
            }
            if last_start > i {
                return last_start;
            }
            // 7. \s+
            return end;
        }
        // Unreachable with consistent tables (every class is covered above); one char keeps
        // the iterator moving rather than looping or panicking.
        i + n0
    }
}

fn tables() -> Result<&'static Tables, String> {
    static TABLES: OnceLock<Result<Tables, String>> = OnceLock::new();
    TABLES.get_or_init(Tables::build).as_ref().map_err(Clone::clone)
}

/// The splitter for [`SPLIT_PATTERN`](super::SPLIT_PATTERN). Cheap to copy: the class tables are
/// built once per process, on first use.
#[derive(Clone, Copy)]
pub struct Splitter {
    tables: &'static Tables,
}

impl std::fmt::Debug for Splitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Splitter")
    }
}

impl Splitter {
    /// Fails only if regex-syntax cannot parse the class patterns (which would mean it was built
    /// without its Unicode tables).
    pub fn new() -> Result<Splitter, String> {
        Ok(Splitter { tables: tables()? })
    }

    /// The chunks of `text`, in order; they concatenate back to `text`. No allocation.
    pub fn split<'a>(&self, text: &'a str) -> Split<'a> {
        Split { tables: self.tables, text, pos: 0 }
    }
}

/// Iterator over the chunks of one text, from [`Splitter::split`].
#[derive(Clone)]
pub struct Split<'a> {
    tables: &'static Tables,
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Split<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let end = self.tables.chunk_end(self.text, self.pos).clamp(self.pos + 1, self.text.len());
        let chunk = self.text.get(self.pos..end);
        // `end` is always a char boundary; should it not be, end the iteration rather than panic.
        self.pos = if chunk.is_some() { end } else { self.text.len() };
        chunk
    }
}

impl std::iter::FusedIterator for Split<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::SPLIT_PATTERN;
    use fancy_regex::Regex;
    use proptest::prelude::*;

    fn regex() -> &'static Regex {
        static RE: OnceLock<Regex> = OnceLock::new();
        RE.get_or_init(|| Regex::new(SPLIT_PATTERN).unwrap())
    }

    fn by_regex(text: &str) -> Vec<&str> {
        regex().find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

    fn by_splitter(text: &str) -> Vec<&str> {
        Splitter::new().unwrap().split(text).collect()
    }

    #[test]
    fn splitter_matches_regex_on_targeted_cases() {
        let cases = [
            "",
            "Hello world",
            "hello  world   \n\n  x",
            "I'm sure they'll've done it; we'RE LL ve 'S 'D 'M 'T 'Ll 'lL 'Ve 'rE",
            "'s 'x 'l 'lx 'v 're' ''s '''",
            "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000",
            "naïve café — “quotes” ‘single’",
            "tabs\tand\t\ttabs \t x\r\n\r\nline\n",
            "   ",
            " ",
            "\n",
            "a ",
            "a  ",
            "a \n",
            " \u{a0}x\u{3000}\u{3000}y\u{2028}z",
            "...hello ...\n\n\r world!!!\r\n",
            " !x  !\n \n!",
            "\u{17f}'\u{17f} it'\u{17f} \u{212a}'\u{212a}",
            "٣٤٥ ١٢ Ⅻ Ⅷⅷ ½¾ 𝟘𝟙𝟚",
            "漢字かなカナ 한국어 😀😀 e\u{301}e\u{301}",
            "\u{85}\u{85}x\u{1680}\u{180e}y\u{200b}\u{feff}z",
        ];
        for text in cases {
            assert_eq!(by_splitter(text), by_regex(text), "text {text:?}");
        }
    }

    #[test]
    fn classes_are_the_regex_engines() {
        let t = tables().unwrap();
        // Facts about Unicode that a hand-made table could get wrong.
        assert_eq!(t.bits('\u{2160}'), NUMBER, "Roman numeral is a letter-number, not a letter");
        assert_eq!(t.bits('\u{301}'), 0, "combining mark is neither letter nor number");
        assert_eq!(t.bits('\u{a0}'), SPACE);
        assert_eq!(t.bits('\u{85}'), SPACE);
        assert_eq!(t.bits('\u{200b}'), 0, "zero-width space is not White_Space");
        assert_eq!(t.bits('\r'), SPACE | NEWLINE);
        assert_eq!(t.bits('\u{1d7d8}'), NUMBER, "mathematical double-struck digit");
        assert_eq!(t.bits('\u{20000}'), LETTER, "CJK extension B");
        assert_eq!(t.bits('\u{1f600}'), 0, "emoji");
        assert!(t.fold_sdmt.contains(&'\u{17f}'), "(?i)s matches long s");
        // Every char of every class, as the regex engine decides it.
        let re = |p: &str| fancy_regex::Regex::new(&format!("^{p}$")).unwrap();
        let (l, n, s) = (re(r"\p{L}"), re(r"\p{N}"), re(r"\s"));
        for c in (0..0x11_0000).filter_map(char::from_u32) {
            let text = c.to_string();
            let bit = |yes: bool, bit: u8| if yes { bit } else { 0 };
            let want = bit(l.is_match(&text).unwrap(), LETTER)
                | bit(n.is_match(&text).unwrap(), NUMBER)
                | bit(s.is_match(&text).unwrap(), SPACE)
                | bit(c == '\r' || c == '\n', NEWLINE);
            assert_eq!(t.bits(c), want, "char {c:?} U+{:04X}", c as u32);
        }
    }

    /// A long whitespace run: the splitter gives the regex's answer (the run minus its last
    /// char, then that char with the word), also where fancy-regex itself gives up (measured
    /// with fancy-regex 0.20.2: fine at 300,000 spaces, RuntimeError::StackOverflow at 10^6).
    #[test]
    fn long_whitespace_run() {
        for n in [1_000, 300_000, 2_000_000] {
            let text = " ".repeat(n) + "x";
            let got = by_splitter(&text);
            assert_eq!(got, [&text[..n - 1], " x"]);
            let regex: Result<Vec<&str>, _> =
                regex().find_iter(&text).map(|m| m.map(|m| m.as_str())).collect();
            match regex {
                Ok(want) => assert_eq!(got, want),
                Err(e) => assert!(n > 300_000, "regex failed at {n}: {e}"),
            }
        }
    }

    /// Characters the pattern treats differently, weighted toward the tricky ones.
    fn interesting_char() -> impl Strategy<Value = char> {
        prop_oneof![
            6 => prop::sample::select(vec!['a', 'b', 'z', 'A', 'Q', 'Z', 'é', 'ß']),
            6 => prop::sample::select(vec![
                '\'', '\'', 's', 'S', 'd', 'D', 'm', 'M', 't', 'T', 'l', 'L', 'v', 'V', 'e', 'E',
                'r', 'R', '\u{17f}', '\u{212a}',
            ]),
            4 => prop::sample::select(vec!['0', '1', '5', '9']),
            4 => prop::sample::select(vec!['.', ',', '!', '-', '"', '(', '$', '_', '’', '—']),
            8 => prop::sample::select(vec![' ', ' ', ' ', '\n', '\r', '\t']),
            3 => prop::sample::select(vec![
                '\u{a0}', '\u{2028}', '\u{2029}', '\u{3000}', '\u{85}', '\u{b}', '\u{c}',
                '\u{1680}', '\u{2009}', '\u{200b}', '\u{feff}',
            ]),
            2 => prop::sample::select(vec!['\u{301}', '\u{308}', '\u{93f}', '\u{200d}']),
            2 => prop::sample::select(vec!['漢', '字', 'か', 'カ', '한', 'ㄱ']),
            2 => prop::sample::select(vec!['😀', '🎉', '👍', '\u{1f3fd}']),
            2 => prop::sample::select(vec![
                '٣', '٤', '०', '५', '\u{2160}', '\u{2167}', '\u{2178}', '½', '²', '\u{1d7d8}',
                '\u{10107}',
            ]),
            1 => prop::sample::select(vec!['\u{0}', '\u{7f}', '\u{fffd}', '\u{e000}']),
            1 => any::<char>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn splitter_matches_regex_on_interesting_strings(
            chars in prop::collection::vec(interesting_char(), 0..40)
        ) {
            let text: String = chars.into_iter().collect();
            prop_assert_eq!(by_splitter(&text), by_regex(&text), "text {:?}", text);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn splitter_matches_regex_on_any_string(text in any::<String>()) {
            prop_assert_eq!(by_splitter(&text), by_regex(&text));
        }
    }
}
