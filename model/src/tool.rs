//! The calculator tool (docs/reference.md §10). The model writes `<|python_start|> expr <|python_end|>`;
//! if `expr` is pure arithmetic (digits, `+-*/.()` and spaces after commas are removed, no `**`)
//! or a string `.count(...)` call, the engine forces `<|output_start|> result <|output_end|>`
//! into the stream. Results print as Python's `str()` would, since the model was trained on
//! what nanochat's `eval` printed. Nothing is ever executed: a small parser evaluates the two
//! accepted forms and anything else (or an error Python would raise) gives `None`.

use std::collections::VecDeque;

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// The calculator inside generation, for one row: watches the tokens a row produces and, when a
/// `<|python_start|> ... <|python_end|>` block closes on an expression the calculator accepts,
/// queues `<|output_start|> result <|output_end|>` to be forced in place of the next samples.
#[derive(Clone, Debug)]
pub struct ToolState {
    python_start: u32,
    python_end: u32,
    output_start: u32,
    output_end: u32,
    /// Tokens of the open python block, if one is open.
    expr: Option<Vec<u32>>,
    forced: VecDeque<u32>,
}

impl ToolState {
    pub fn new(tok: &Tokenizer) -> Result<ToolState> {
        Ok(ToolState {
            python_start: tok.special("<|python_start|>")?,
            python_end: tok.special("<|python_end|>")?,
            output_start: tok.special("<|output_start|>")?,
            output_end: tok.special("<|output_end|>")?,
            expr: None,
            forced: VecDeque::new(),
        })
    }

    /// Whether the next token is forced (the model's sample is then ignored).
    pub fn has_forced(&self) -> bool {
        !self.forced.is_empty()
    }

    /// The token that comes next: a queued tool token, else `sampled`. Feeds it to the state.
    pub fn next(&mut self, sampled: u32, tok: &Tokenizer) -> u32 {
        let t = self.forced.pop_front().unwrap_or(sampled);
        if t == self.python_start {
            self.expr = Some(Vec::new());
        } else if t == self.python_end {
            if let Some(expr) = self.expr.take()
                && !expr.is_empty()
                && let Some(result) = tok.decode(&expr).ok().and_then(|e| use_calculator(&e))
            {
                self.forced.push_back(self.output_start);
                self.forced.extend(tok.encode(&result));
                self.forced.push_back(self.output_end);
            }
        } else if let Some(expr) = &mut self.expr {
            expr.push(t);
        }
        t
    }
}

/// Evaluate what the model sent to the calculator; `None` when it is not an accepted form or
/// would fail (division by zero, syntax error, integer overflow).
pub fn use_calculator(expr: &str) -> Option<String> {
    let expr = expr.replace(',', "");
    if expr.chars().all(|c| "0123456789*+-/.() ".contains(c)) {
        if expr.contains("**") {
            return None;
        }
        let mut p = Parser { s: expr.as_bytes(), i: 0 };
        let v = p.expr()?;
        p.skip_spaces();
        return (p.i == p.s.len()).then(|| v.to_string());
    }
    string_count(&expr).map(|n| n.to_string())
}

/// `'text'.count('pattern')` (either quote style): non-overlapping occurrences, as Python.
fn string_count(expr: &str) -> Option<usize> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "'\"()._ ".contains(c);
    if !expr.chars().all(allowed) {
        return None;
    }
    let literal = |s: &str| -> Option<(String, usize)> {
        let s_trim = s.trim_start();
        let skipped = s.len() - s_trim.len();
        let q = s_trim.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let end = s_trim[1..].find(q)?;
        Some((s_trim[1..1 + end].to_string(), skipped + end + 2))
    };
    let (text, used) = literal(expr)?;
    let rest = expr[used..].trim_start().strip_prefix(".count")?.trim_start().strip_prefix('(')?;
    let (pattern, used) = literal(rest)?;
    if rest[used..].trim_start().strip_prefix(')')?.trim().is_empty() {
        Some(text.matches(pattern.as_str()).count())
    } else {
        None
    }
}

/// A Python number: int (bounded here, where Python's are not: overflow gives `None`) or float.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(x) => x,
        }
    }

    fn binary(self, op: &str, rhs: Num) -> Option<Num> {
        use Num::*;
        Some(match (op, self, rhs) {
            ("+", Int(a), Int(b)) => Int(a.checked_add(b)?),
            ("-", Int(a), Int(b)) => Int(a.checked_sub(b)?),
            ("*", Int(a), Int(b)) => Int(a.checked_mul(b)?),
            ("//", Int(a), Int(b)) => {
                if b == 0 {
                    return None;
                }
                // Python floors toward negative infinity.
                let (q, r) = (a.checked_div(b)?, a % b);
                Int(if r != 0 && ((r < 0) != (b < 0)) { q - 1 } else { q })
            }
            ("+", a, b) => Float(a.f() + b.f()),
            ("-", a, b) => Float(a.f() - b.f()),
            ("*", a, b) => Float(a.f() * b.f()),
            ("/", a, b) => {
                if b.f() == 0.0 {
                    return None;
                }
                Float(a.f() / b.f())
            }
            ("//", a, b) => {
                if b.f() == 0.0 {
                    return None;
                }
                Float((a.f() / b.f()).floor())
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for Num {
    /// Python's `str()`: ints in full; floats in the shortest form that round-trips, fixed
    /// notation for decimal exponents in [-4, 16), scientific (`1e+16`, `1.5e-05`) otherwise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = match *self {
            Num::Int(i) => return write!(f, "{i}"),
            Num::Float(x) => x,
        };
        if x.is_nan() {
            return write!(f, "nan");
        }
        if x.is_infinite() {
            return write!(f, "{}", if x > 0.0 { "inf" } else { "-inf" });
        }
        let sign = if x.is_sign_negative() { "-" } else { "" };
        // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr.
        let sci = format!("{:e}", x.abs());
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
        if !(-4..16).contains(&exp) {
            let frac = &digits[1..];
            let dot = if frac.is_empty() { String::new() } else { format!(".{frac}") };
            let esign = if exp < 0 { '-' } else { '+' };
            return write!(f, "{sign}{}{dot}e{esign}{:02}", &digits[..1], exp.abs());
        }
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            write!(f, "{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            write!(f, "{sign}{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            write!(f, "{sign}{a}.{b}")
        }
    }
}

/// Recursive descent over Python's precedence: expr = term (+|- term)*, term = unary
/// (*|/|// unary)*, unary = (+|-) unary | atom, atom = number | ( expr ).
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_spaces(&mut self) {
        while self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_spaces();
        self.s.get(self.i).copied()
    }

    fn expr(&mut self) -> Option<Num> {
        let mut v = self.term()?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            v = v.binary(if c == b'+' { "+" } else { "-" }, self.term()?)?;
        }
        Some(v)
    }

    fn term(&mut self) -> Option<Num> {
        let mut v = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(b'*') => "*",
                Some(b'/') if self.s.get(self.i + 1) == Some(&b'/') => "//",
                Some(b'/') => "/",
                _ => return Some(v),
            };
            self.i += op.len();
            v = v.binary(op, self.unary()?)?;
        }
    }

    fn unary(&mut self) -> Option<Num> {
        match self.peek()? {
            b'+' => {
                self.i += 1;
                self.unary()
            }
            b'-' => {
                self.i += 1;
                match self.unary()? {
                    Num::Int(i) => Some(Num::Int(i.checked_neg()?)),
                    Num::Float(x) => Some(Num::Float(-x)),
                }
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Option<Num> {
        if self.peek()? == b'(' {
            self.i += 1;
            let v = self.expr()?;
            if self.peek()? != b')' {
                return None;
            }
            self.i += 1;
            return Some(v);
        }
        let start = self.i;
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit() || *c == b'.') {
            self.i += 1;
        }
        let lit = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        if lit.is_empty() || lit == "." || lit.matches('.').count() > 1 {
            return None;
        }
        if lit.contains('.') {
            return lit.parse().ok().map(Num::Float);
        }
        // Python 3 rejects decimal ints with leading zeros (`007`), except all-zero ones.
        if lit.len() > 1 && lit.starts_with('0') && lit.bytes().any(|b| b != b'0') {
            return None;
        }
        lit.parse().ok().map(Num::Int)
    }
}

#[cfg(test)]
mod tests {
    use super::use_calculator as calc;

    #[test]
    fn arithmetic_prints_like_python() {
        for (expr, want) in [
            ("1+2", "3"),
            ("2 * (3 + 4)", "14"),
            ("1,000 * 3", "3000"),
            ("7/2", "3.5"),
            ("4/2", "2.0"),
            ("7//2", "3"),
            ("-7//2", "-4"),
            ("7.0//2", "3.0"),
            ("-(3)", "-3"),
            ("0.1+0.2", "0.30000000000000004"),
            ("1/3", "0.3333333333333333"),
            ("10000000000000000.0", "1e+16"),
            ("1234567890123456.0", "1234567890123456.0"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("0.000015", "1.5e-05"),
            ("3.", "3.0"),
            (".5*2", "1.0"),
            ("-0.0", "-0.0"),
            ("00", "0"),
        ] {
            assert_eq!(calc(expr).as_deref(), Some(want), "{expr}");
        }
    }

    #[test]
    fn rejects_what_python_would_not_evaluate_or_nanochat_refuses() {
        for expr in [
            "2**10",
            "1/0",
            "1//0",
            "",
            "()",
            "1 2",
            "(1",
            "1)",
            "007",
            "1..2",
            "1.2.3",
            "import os",
            "1+x",
            "5 % 2",
        ] {
            assert_eq!(calc(expr), None, "{expr}");
        }
    }

    #[test]
    fn string_count() {
        assert_eq!(calc("'strawberry'.count('r')").as_deref(), Some("3"));
        assert_eq!(calc("\"banana\".count(\"ana\")").as_deref(), Some("1"));
        assert_eq!(calc("'abc'.count('')").as_deref(), Some("4"));
        assert_eq!(calc("'abc'.upper()"), None);
        assert_eq!(calc("'a'.count('a') + 1"), None);
        assert_eq!(calc("'a;b'.count('a')"), None);
    }
}

#[cfg(test)]
mod state_tests {
    use super::ToolState;
    use crate::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, parse_tiktoken};

    fn tok() -> Tokenizer {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
        let text = std::fs::read_to_string(p).unwrap();
        Tokenizer::new(parse_tiktoken(&text).unwrap(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap()
    }

    /// A GSM8K-style call `<<7+11=18>>`: after `<|python_end|>` the tool forces
    /// `<|output_start|>18<|output_end|>`, whatever the model samples meanwhile.
    #[test]
    fn a_closed_python_block_forces_the_result() {
        let tok = tok();
        let sp = |s: &str| tok.special(s).unwrap();
        let mut st = ToolState::new(&tok).unwrap();
        let mut stream = vec![sp("<|python_start|>")];
        stream.extend(tok.encode("7+11"));
        stream.push(sp("<|python_end|>"));
        for &t in &stream {
            assert!(!st.has_forced());
            assert_eq!(st.next(t, &tok), t);
        }
        let mut forced = Vec::new();
        while st.has_forced() {
            forced.push(st.next(0, &tok));
        }
        let mut want = vec![sp("<|output_start|>")];
        want.extend(tok.encode("18"));
        want.push(sp("<|output_end|>"));
        assert_eq!(forced, want);
        // A block the calculator refuses forces nothing.
        for t in [sp("<|python_start|>")]
            .into_iter()
            .chain(tok.encode("2**8"))
            .chain([sp("<|python_end|>")])
        {
            st.next(t, &tok);
        }
        assert!(!st.has_forced());
    }
}
