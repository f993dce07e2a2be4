//! A small SQL lexer that finds the plain literals of a query string, so that queries
//! differing only in literal values (`WHERE user_id = 5` / `= 6`) share one cached
//! analysis without running PostgreSQL's parser again.
//!
//! It recognises only what it must to find literals safely: comments (nested `/* */`),
//! quoted identifiers, dollar-quoted strings, prefixed strings (`E'..'`, `B'..'`,
//! `X'..'`, `U&'..'`, `N'..'`), parameters (`$1`) and numbers. Only unprefixed `'...'`
//! strings and numbers become literals; everything else stays verbatim in the key. When
//! in doubt it declines (`None`), and the caller falls back to the exact-text cache.
//! It must never decide routing by itself: the analysis that the key shares was made by
//! PostgreSQL's grammar from a text with the same key.

/// One literal of the query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LitSpan {
    /// Byte offset of the literal's first byte (the quote, or the first digit).
    pub start: usize,
    /// Byte offset one past the literal.
    pub end: usize,
    /// `'...'` string (true) or number (false).
    pub string: bool,
}

/// A query string with its literals cut out.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Normalized {
    /// The text with every literal replaced by a marker naming its class.
    pub key: String,
    pub lits: Vec<LitSpan>,
}

/// Marker byte for a literal in `Normalized::key`; a query containing it is not
/// normalized, so a marker in the key always stands for a literal.
const MARK: u8 = 1;

/// Byte classes for the lexer's inner loops (a table lookup beats the chains of range
/// tests on every byte of every query string).
const IDENT_START: u8 = 1;
const IDENT_CHAR: u8 = 2;
/// Starts no token the lexer cares about (spaces, operators, parentheses, …).
const PLAIN: u8 = 4;
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            t[i] = IDENT_START | IDENT_CHAR;
        } else if b.is_ascii_digit() || b == b'$' {
            t[i] = IDENT_CHAR;
        } else if !matches!(b, b'-' | b'/' | b'"' | b'\'' | b'.' | 0 | MARK) {
            t[i] = PLAIN;
        }
        i += 1;
    }
    t
};

fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & IDENT_START != 0
}

fn is_ident_char(b: u8) -> bool {
    CLASS[b as usize] & IDENT_CHAR != 0
}

/// Lex `sql`; `None` when the text holds something the lexer will not vouch for.
#[cfg(test)]
pub(crate) fn normalize(sql: &str) -> Option<Normalized> {
    let (mut key, mut lits) = (Vec::new(), Vec::new());
    normalize_into(sql.as_bytes(), &mut key, &mut lits).then_some(())?;
    let key = String::from_utf8(key).expect("a key of a str is UTF-8");
    Some(Normalized { key, lits })
}

/// `normalize` into buffers the caller keeps (cleared first), so the hot path does not
/// allocate; `false` when the text holds something the lexer will not vouch for.
///
/// It works on bytes, so that a query string can be looked up before it is checked
/// for UTF-8: the key of a text that is not UTF-8 has no UTF-8 text's key, since every
/// byte outside literals is kept and literals that become markers are ASCII numbers and
/// `'...'` strings (a caller that relies on this must check the strings itself). For
/// the same reason a NUL byte, which PostgreSQL refuses in a query string, never gives a
/// checked text's key: outside quotes and comments it declines, inside them it stays in
/// the key.
pub(crate) fn normalize_into(sql: &[u8], key: &mut Vec<u8>, lits: &mut Vec<LitSpan>) -> bool {
    key.clear();
    lits.clear();
    normalize_inner(sql, key, lits).is_some()
}

fn normalize_inner(b: &[u8], key: &mut Vec<u8>, lits: &mut Vec<LitSpan>) -> Option<()> {
    key.reserve(b.len());
    let mut i = 0;
    let mut copied = 0; // bytes of `sql` already reflected in `key`
    while i < b.len() {
        let c = b[i];
        if CLASS[c as usize] & PLAIN != 0 {
            i += 1;
            continue;
        }
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            b'"' => i = skip_quoted(b, i, b'"')?,
            b'\'' => {
                let end = skip_quoted(b, i, b'\'')?;
                if continues_string(b, end) {
                    return None;
                }
                key.extend_from_slice(&b[copied..i]);
                key.extend_from_slice(&[MARK, b's']);
                lits.push(LitSpan {
                    start: i,
                    end,
                    string: true,
                });
                copied = end;
                i = end;
            }
            b'$' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                } else {
                    i = skip_dollar_quoted(b, i)?;
                }
            }
            _ if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                let start = i;
                i += 1;
                while i < b.len() {
                    let d = b[i];
                    let exponent_sign = (d == b'+' || d == b'-')
                        && matches!(b[i - 1], b'e' | b'E')
                        && b.get(i + 1).is_some_and(u8::is_ascii_digit);
                    if d.is_ascii_alphanumeric() || d == b'_' || d == b'.' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                key.extend_from_slice(&b[copied..start]);
                key.extend_from_slice(&[MARK, b'n']);
                lits.push(LitSpan {
                    start,
                    end: i,
                    string: false,
                });
                copied = i;
            }
            // The marker byte itself: a key holding it would be ambiguous.
            0 | MARK => return None,
            _ if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                let word = &b[start..i];
                if b.get(i) == Some(&b'\'') {
                    // A prefixed string constant: E'..' allows backslash escapes.
                    let end = if word.eq_ignore_ascii_case(b"e") {
                        skip_escape_string(b, i)?
                    } else {
                        skip_quoted(b, i, b'\'')?
                    };
                    if continues_string(b, end) {
                        return None;
                    }
                    i = end;
                } else if word.eq_ignore_ascii_case(b"u") && b.get(i) == Some(&b'&') {
                    // U&'..' or U&"..": verbatim.
                    match b.get(i + 1) {
                        Some(&q @ (b'\'' | b'"')) => i = skip_quoted(b, i + 1, q)?,
                        _ => i += 1,
                    }
                }
            }
            _ => i += 1,
        }
    }
    key.extend_from_slice(&b[copied..]);
    Some(())
}

/// Skip a `q`-quoted token starting at `i` (doubled quotes escape); offset past it.
fn skip_quoted(b: &[u8], i: usize, q: u8) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return None,
            Some(&c) if c == q => {
                if b.get(j + 1) == Some(&q) {
                    j += 2;
                } else {
                    return Some(j + 1);
                }
            }
            Some(_) => j += 1,
        }
    }
}

fn skip_escape_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return None,
            Some(b'\\') => j += 2,
            Some(b'\'') => {
                if b.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else {
                    return Some(j + 1);
                }
            }
            Some(_) => j += 1,
        }
    }
}

fn skip_block_comment(b: &[u8], i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = i;
    while j + 1 < b.len() {
        if b[j] == b'/' && b[j + 1] == b'*' {
            depth += 1;
            j += 2;
        } else if b[j] == b'*' && b[j + 1] == b'/' {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return Some(j);
            }
        } else {
            j += 1;
        }
    }
    None
}

/// `$tag$ ... $tag$`; a `$` that starts no valid tag is an error for PostgreSQL too, so
/// decline.
fn skip_dollar_quoted(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() && b[j] != b'$' {
        if !(is_ident_char(b[j]) && b[j] != b'$') || (j == i + 1 && b[j].is_ascii_digit()) {
            return None;
        }
        j += 1;
    }
    if j >= b.len() {
        return None;
    }
    let tag = &b[i..=j];
    let body = j + 1;
    let mut k = body;
    while k + tag.len() <= b.len() {
        if &b[k..k + tag.len()] == tag {
            return Some(k + tag.len());
        }
        k += 1;
    }
    None
}

/// PostgreSQL joins two string constants separated by whitespace that contains a
/// newline (`'a'\n'b'` is `'ab'`). The lexer declines such text rather than model it.
fn continues_string(b: &[u8], mut j: usize) -> bool {
    loop {
        match b.get(j) {
            Some(c) if c.is_ascii_whitespace() => j += 1,
            Some(b'-') if b.get(j + 1) == Some(&b'-') => {
                while j < b.len() && b[j] != b'\n' {
                    j += 1;
                }
            }
            Some(b'/') if b.get(j + 1) == Some(&b'*') => match skip_block_comment(b, j) {
                Some(e) => j = e,
                None => return true,
            },
            Some(b'\'') => return true,
            _ => return false,
        }
    }
}

/// The value of a literal span: a string with doubled quotes undone, or a number's text.
pub(crate) fn literal_value(sql: &str, span: &LitSpan) -> String {
    let raw = sql.get(span.start..span.end).unwrap_or("");
    if span.string && raw.len() >= 2 {
        raw[1..raw.len() - 1].replace("''", "'")
    } else {
        raw.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_cut_out() {
        let n = normalize("SELECT * FROM users WHERE user_id = 42 AND name = 'o''k'").unwrap();
        assert_eq!(
            n.key,
            "SELECT * FROM users WHERE user_id = \u{1}n AND name = \u{1}s"
        );
        assert_eq!(n.lits.len(), 2);
        let sql = "SELECT * FROM users WHERE user_id = 42 AND name = 'o''k'";
        assert_eq!(literal_value(sql, &n.lits[1]), "o'k");
    }

    #[test]
    fn verbatim_tokens_stay() {
        let sql = "SELECT t1.a, $1, $$x 5$$, E'\\'5', \"c 7\" /* 8 /* 9 */ */ -- 10\n FROM t2";
        let n = normalize(sql).unwrap();
        assert!(n.lits.is_empty(), "{n:?}");
        assert_eq!(n.key, sql);
    }

    #[test]
    fn declines_what_it_cannot_vouch_for() {
        assert!(normalize("SELECT 'a'\n'b'").is_none());
        assert!(normalize("SELECT 'open").is_none());
        assert!(normalize("SELECT \u{1}").is_none());
        assert!(normalize("SELECT /* open").is_none());
    }

    #[test]
    fn numbers_with_exponents() {
        let n = normalize("SELECT 1e-5, 3.5, .5, 0x1F").unwrap();
        assert_eq!(n.lits.len(), 4);
        assert_eq!(n.key, "SELECT \u{1}n, \u{1}n, \u{1}n, \u{1}n");
    }
}
