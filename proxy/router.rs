//! Host and path routing: the most specific host match (exact, then the longest `*.suffix`,
//! then `*`) that has a route whose `path_prefix` matches; among those, the longest prefix.
//!
//! Prefixes match on path-segment boundaries: `/api` matches `/api` and `/api/x`, not `/apix`.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Vec<Entry>>,
    /// `(".example.com", entries)` for `*.example.com`, longest suffix first.
    suffix: Vec<(String, Vec<Entry>)>,
    any: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    prefix: String,
    route: usize,
}

impl Router {
    /// `routes` yields `(route index, hosts, path_prefix)`.
    pub fn new<'a>(routes: impl IntoIterator<Item = (usize, &'a [String], &'a str)>) -> Self {
        let mut r = Router::default();
        let mut suffix: HashMap<String, Vec<Entry>> = HashMap::new();
        for (route, hosts, prefix) in routes {
            let e = Entry {
                prefix: prefix.to_string(),
                route,
            };
            for h in hosts {
                if h == "*" {
                    r.any.push(e.clone());
                } else if let Some(s) = h.strip_prefix('*') {
                    suffix.entry(s.to_string()).or_default().push(e.clone());
                } else {
                    r.exact.entry(h.clone()).or_default().push(e.clone());
                }
            }
        }
        let sort = |v: &mut Vec<Entry>| v.sort_by_key(|e| std::cmp::Reverse(e.prefix.len()));
        r.exact.values_mut().for_each(sort);
        sort(&mut r.any);
        r.suffix = suffix.into_iter().collect();
        r.suffix.iter_mut().for_each(|(_, v)| sort(v));
        r.suffix.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        r
    }

    /// `host` must already be lower-case without port.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        if let Some(hit) = self.exact.get(host).and_then(|v| best(v, path)) {
            return Some(hit);
        }
        for (s, v) in &self.suffix {
            if host.len() > s.len() && host.ends_with(s.as_str()) {
                if let Some(hit) = best(v, path) {
                    return Some(hit);
                }
            }
        }
        best(&self.any, path)
    }
}

fn best(entries: &[Entry], path: &str) -> Option<usize> {
    entries
        .iter()
        .find(|e| prefix_matches(&e.prefix, path))
        .map(|e| e.route)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Lower-cases a Host / :authority value and strips the port and a trailing dot.
pub fn normalize_host(raw: &str) -> String {
    Host::new(raw).as_str().to_string()
}

/// The host part of a Host / :authority value, as `normalize_host` makes it, kept inline: no
/// heap allocation per request for names up to 255 bytes (every DNS name).
pub struct Host {
    inline: [u8; 255],
    len: u8,
    /// Longer values (not host names, but they must still route and log).
    long: Option<String>,
}

impl Host {
    pub fn new(raw: &str) -> Host {
        let host = if raw.starts_with('[') {
            raw.split_once(']')
                .map_or(raw, |(h, _)| h)
                .trim_start_matches('[')
        } else {
            raw.rsplit_once(':').map_or(raw, |(h, _)| h)
        };
        let host = host.trim_end_matches('.');
        let mut h = Host {
            inline: [0; 255],
            len: 0,
            long: None,
        };
        match u8::try_from(host.len()) {
            Ok(len) if len < u8::MAX => {
                for (d, s) in h.inline.iter_mut().zip(host.bytes()) {
                    *d = s.to_ascii_lowercase();
                }
                h.len = len;
            }
            _ => h.long = Some(host.to_ascii_lowercase()),
        }
        h
    }

    pub fn empty() -> Host {
        Host::new("")
    }

    pub fn as_str(&self) -> &str {
        match &self.long {
            Some(s) => s,
            // ASCII lower-casing of a str keeps it UTF-8
            None => std::str::from_utf8(&self.inline[..usize::from(self.len)]).unwrap_or(""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let routes: Vec<(usize, Vec<String>, &str)> = vec![
            (0, vec!["shop.example.com".into()], "/"),
            (1, vec!["shop.example.com".into()], "/api"),
            (2, vec!["*.example.com".into()], "/"),
            (3, vec!["*.eu.example.com".into()], "/"),
            (4, vec!["*".into()], "/static/"),
            (5, vec!["api.example.com".into()], "/v1"),
        ];
        Router::new(routes.iter().map(|(i, h, p)| (*i, h.as_slice(), *p)))
    }

    #[test]
    fn host_then_longest_prefix() {
        let r = router();
        assert_eq!(r.route("shop.example.com", "/"), Some(0));
        assert_eq!(r.route("shop.example.com", "/api/x"), Some(1));
        assert_eq!(r.route("shop.example.com", "/api"), Some(1));
        assert_eq!(r.route("shop.example.com", "/apix"), Some(0));
        assert_eq!(r.route("a.example.com", "/x"), Some(2));
        assert_eq!(r.route("a.eu.example.com", "/x"), Some(3));
        assert_eq!(r.route("example.com", "/static/a.css"), Some(4));
        assert_eq!(r.route("other.org", "/"), None);
        // exact host without a matching path falls through to less specific hosts
        assert_eq!(r.route("api.example.com", "/v2"), Some(2));
        assert_eq!(r.route("api.example.com", "/v1/users"), Some(5));
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Shop.Example.COM:8443"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com."), "shop.example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("localhost"), "localhost");
        assert_eq!(normalize_host("Bücher.Example:1"), "bücher.example");
        let long = format!("{}.test", "a".repeat(300));
        assert_eq!(normalize_host(&long.to_uppercase()), long);
        assert_eq!(normalize_host(""), "");
    }
}
