//! Typed reading of a spanned TOML tree that collects every problem instead of stopping at the
//! first one. Each problem carries the byte span it is about; `Diagnostics` turns spans into
//! `file:line:col` when it is rendered.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub type Span = Range<usize>;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Collects diagnostics for one source file.
pub struct Diagnostics<'s> {
    file: PathBuf,
    src: &'s str,
    pub list: Vec<Diagnostic>,
}

impl<'s> Diagnostics<'s> {
    pub fn new(file: &Path, src: &'s str) -> Self {
        Diagnostics {
            file: file.to_path_buf(),
            src,
            list: Vec::new(),
        }
    }

    pub fn error(&mut self, span: &Span, message: impl Into<String>) {
        let (line, col) = line_col(self.src, span.start);
        self.list.push(Diagnostic {
            file: self.file.clone(),
            line,
            col,
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// A table being read: remembers its own span and a path for messages (`pool[2]`, `server`).
pub struct Table<'a, 'i> {
    pub inner: &'a DeTable<'i>,
    pub span: Span,
    pub path: String,
}

/// A value with the span it came from, kept so later checks can point at it.
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub span: Span,
}

impl<T> At<T> {
    pub fn new(value: T, span: Span) -> Self {
        At { value, span }
    }
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn new(inner: &'a DeTable<'i>, span: Span, path: impl Into<String>) -> Self {
        Table {
            inner,
            span,
            path: path.into(),
        }
    }

    fn key_name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    /// Reports every key not in `known`; `later` lists keys that are understood but belong to a
    /// feature that is not built yet: those are reported as such instead of as unknown.
    pub fn check_keys(&self, d: &mut Diagnostics, known: &[&str]) {
        for key in self.inner.keys() {
            let k: &str = key.get_ref();
            if !known.contains(&k) {
                d.error(
                    &key.span(),
                    format!(
                        "unknown key `{}` (expected one of: {})",
                        self.key_name(k),
                        known.join(", ")
                    ),
                );
            }
        }
    }

    pub fn raw(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.inner.get(key)
    }

    /// The span of a key itself (for "not supported yet" and similar messages about the key).
    pub fn key_span(&self, key: &str) -> Option<Span> {
        self.inner
            .keys()
            .find(|k| k.get_ref() == key)
            .map(|k| k.span())
    }

    pub fn has(&self, key: &str) -> bool {
        self.inner.contains_key(key)
    }

    fn type_error(&self, d: &mut Diagnostics, key: &str, v: &Spanned<DeValue>, want: &str) {
        d.error(
            &v.span(),
            format!(
                "`{}` must be {}, found {}",
                self.key_name(key),
                want,
                v.get_ref().type_str()
            ),
        );
    }

    pub fn string(&self, d: &mut Diagnostics, key: &str) -> Option<At<String>> {
        let v = self.raw(key)?;
        match v.get_ref().as_str() {
            Some(s) => Some(At::new(s.to_string(), v.span())),
            None => {
                self.type_error(d, key, v, "a string");
                None
            }
        }
    }

    pub fn boolean(&self, d: &mut Diagnostics, key: &str) -> Option<At<bool>> {
        let v = self.raw(key)?;
        match v.get_ref().as_bool() {
            Some(b) => Some(At::new(b, v.span())),
            None => {
                self.type_error(d, key, v, "true or false");
                None
            }
        }
    }

    pub fn integer(&self, d: &mut Diagnostics, key: &str, min: i64, max: i64) -> Option<At<i64>> {
        let v = self.raw(key)?;
        let parsed = v
            .get_ref()
            .as_integer()
            .and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok());
        self.in_range(d, key, v, parsed, min, max, "a whole number")
    }

    pub fn float(&self, d: &mut Diagnostics, key: &str, min: f64, max: f64) -> Option<At<f64>> {
        let v = self.raw(key)?;
        self.in_range(d, key, v, as_f64(v.get_ref()), min, max, "a number")
    }

    #[allow(clippy::too_many_arguments)]
    fn in_range<T: PartialOrd + std::fmt::Display>(
        &self,
        d: &mut Diagnostics,
        key: &str,
        v: &Spanned<DeValue>,
        parsed: Option<T>,
        min: T,
        max: T,
        want: &str,
    ) -> Option<At<T>> {
        match parsed {
            Some(n) if n >= min && n <= max => Some(At::new(n, v.span())),
            Some(n) => {
                d.error(
                    &v.span(),
                    format!(
                        "`{}` = {n} is out of range ({min}..={max})",
                        self.key_name(key)
                    ),
                );
                None
            }
            None => {
                self.type_error(d, key, v, want);
                None
            }
        }
    }

    pub fn duration(&self, d: &mut Diagnostics, key: &str) -> Option<At<Duration>> {
        let s = self.string(d, key)?;
        match parse_duration(&s.value) {
            Ok(dur) => Some(At::new(dur, s.span)),
            Err(e) => {
                d.error(
                    &s.span,
                    format!(
                        "`{}`: {} (e.g. \"250ms\", \"2s\", \"1m\")",
                        self.key_name(key),
                        e
                    ),
                );
                None
            }
        }
    }

    pub fn table(&self, d: &mut Diagnostics, key: &str) -> Option<Table<'a, 'i>> {
        let v = self.raw(key)?;
        match v.get_ref().as_table() {
            Some(t) => Some(Table::new(t, v.span(), self.key_name(key))),
            None => {
                self.type_error(d, key, v, "a table");
                None
            }
        }
    }

    /// An array of tables (`[[pool]]`); each element comes with its own path `key[i]`.
    pub fn tables(&self, d: &mut Diagnostics, key: &str) -> Vec<Table<'a, 'i>> {
        let Some(v) = self.raw(key) else {
            return Vec::new();
        };
        let Some(arr) = v.get_ref().as_array() else {
            self.type_error(d, key, v, "an array of tables");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in arr.iter().enumerate() {
            match item.get_ref().as_table() {
                Some(t) => out.push(Table::new(
                    t,
                    item.span(),
                    format!("{}[{}]", self.key_name(key), i),
                )),
                None => d.error(
                    &item.span(),
                    format!(
                        "`{}[{}]` must be a table, found {}",
                        self.key_name(key),
                        i,
                        item.get_ref().type_str()
                    ),
                ),
            }
        }
        out
    }

    pub fn array(&self, d: &mut Diagnostics, key: &str) -> Option<At<&'a [Spanned<DeValue<'i>>]>> {
        let v = self.raw(key)?;
        match v.get_ref().as_array() {
            Some(a) => Some(At::new(&a[..], v.span())),
            None => {
                self.type_error(d, key, v, "an array");
                None
            }
        }
    }

    pub fn strings(&self, d: &mut Diagnostics, key: &str) -> Option<At<Vec<At<String>>>> {
        let arr = self.array(d, key)?;
        let mut out = Vec::new();
        for item in arr.value {
            match item.get_ref().as_str() {
                Some(s) => out.push(At::new(s.to_string(), item.span())),
                None => d.error(
                    &item.span(),
                    format!(
                        "`{}` must hold strings, found {}",
                        self.key_name(key),
                        item.get_ref().type_str()
                    ),
                ),
            }
        }
        Some(At::new(out, arr.span))
    }
}

pub fn as_f64(v: &DeValue) -> Option<f64> {
    if let Some(f) = v.as_float() {
        return f.as_str().replace('_', "").parse().ok();
    }
    v.as_integer()
        .and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok())
        .map(|n| n as f64)
}

/// Parses "250ms", "2s", "1m", "1h" (also "1.5s"). A bare number is refused: units are required.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("bad duration \"{s}\": missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration \"{s}\": not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration \"{s}\": unknown unit \"{unit}\"")),
    };
    if !secs.is_finite() || secs > 1.0e9 {
        return Err(format!("bad duration \"{s}\": too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn line_and_column() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        // the column counts characters, not bytes
        assert_eq!(line_col(src, 9), (2, 3));
    }
}
