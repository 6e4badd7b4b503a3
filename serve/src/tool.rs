//! The calculator tool (docs/reference.md §10). The model writes `<|python_start|> expr <|python_end|>`;
//! if `expr` is pure arithmetic (digits, `+-*/.()` and spaces after commas are removed, no `**`)
//! or a string `.count(...)` call, the engine forces `<|output_start|> result <|output_end|>`
//! into the stream. Results print as Python's `str()` would, since the model was trained on
//! what nanochat's `eval` printed. Nothing is ever executed: a small parser evaluates the two
//! accepted forms and anything else (or an error Python would raise) gives `None`.

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
